"""The trainer's device path without Ray (`DeviceLoop`): batches as pieces with prefetching,
checkpoints in safetensors + JSON that restore bit for bit and never run code, and its imports."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from safetensors.torch import save

from dictsweep.config import TrainConfig
from dictsweep.errors import InputError
from dictsweep.sae import Member
from dictsweep.train.checkpoint import checkpoint_bytes, read_checkpoint
from dictsweep.train.device import DeviceLoop, EnsembleSpec

pytestmark = pytest.mark.usefixtures("one_thread")

D_MODEL, ROWS, STEPS = 16, 64, 12
CONFIG = TrainConfig(
    tokens=ROWS * STEPS,
    batch_rows=ROWS,
    lr_warmup_steps=2,
    dead_window_tokens=ROWS * 2,
    resample_every_tokens=ROWS * 3,
    log_every_tokens=ROWS * 5,
    eval_tokens=ROWS * 2,
    kernel="bmm",
    decode="sparse",
    auxk_k=8,
)
SPECS = [
    EnsembleSpec("topk", 64, (Member(lr=3e-3, seed=1, k=4), Member(lr=3e-3, seed=2, k=6)), ("a", "b")),
    EnsembleSpec("relu", 32, (Member(lr=3e-3, seed=3, l1_coef=1.0),), ("c",)),
]


def windows(dtype=np.float32) -> list[np.ndarray]:
    """The training stream as read-only windows of 40 rows (batches straddle them, as pieces do)."""
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((ROWS * STEPS, D_MODEL)) * (rng.random((ROWS * STEPS, 1)) < 0.7)).astype(dtype)
    parts = [data[start : start + 40] for start in range(0, len(data), 40)]
    for part in parts:
        part.flags.writeable = False
    return parts


def pieces(parts: list[np.ndarray], index: int) -> list[np.ndarray]:
    """Batch `index` as views of the windows (what the actor shell hands the loop)."""
    start, stop, out = index * ROWS, (index + 1) * ROWS, []
    for number, part in enumerate(parts):
        low, high = max(start, number * 40), min(stop, (number + 1) * 40)
        if low < high:
            out.append(part[low - number * 40 : high - number * 40])
    return out


def loop(checkpoint_uri=None, data_dtype="float32") -> DeviceLoop:
    return DeviceLoop(SPECS, D_MODEL, CONFIG, STEPS, 1.5, data_dtype, "cpu", checkpoint_uri)


def train(device_loop: DeviceLoop, start: int, stop: int, form: str) -> list[dict]:
    parts, records = windows(), []
    whole = np.concatenate(parts)
    for index in range(start, stop):
        if form == "whole":
            records += device_loop.step(index, whole[index * ROWS : (index + 1) * ROWS])
        else:
            upcoming = (lambda i=index + 1: pieces(parts, i)) if form == "prefetched" else None
            records += device_loop.step(index, pieces(parts, index), upcoming)
    return records


def weights(device_loop: DeviceLoop) -> list[torch.Tensor]:
    return [p.detach().clone() for t in device_loop.trainers for p in t.ensemble.parameters()]


def test_pieces_with_prefetch_train_as_whole_batches():
    whole, split, prefetched = loop(), loop(), loop()
    logged = [
        train(whole, 0, STEPS, "whole"),
        train(split, 0, STEPS, "pieces"),
        train(prefetched, 0, STEPS, "prefetched"),
    ]
    assert logged[0] == logged[1] == logged[2] and len(logged[0]) == 2 * 3  # 2 logging points x 3 SAEs
    for other in (split, prefetched):
        for mine, theirs in zip(weights(other), weights(whole)):
            assert torch.equal(mine, theirs)
    assert 0 <= prefetched.data_wait()["data_wait_fraction"] < 1


def test_bfloat16_pieces_are_read_as_bfloat16():
    parts = [part.astype(np.float32) for part in windows()]
    as_bits = [torch.from_numpy(part).to(torch.bfloat16).view(torch.int16).numpy() for part in parts]
    bits, floats = loop(data_dtype="bfloat16"), loop()
    for index in range(3):
        bits.step(index, pieces(as_bits, index))
        rounded = [torch.from_numpy(piece).view(torch.bfloat16).float().numpy() for piece in pieces(as_bits, index)]
        floats.step(index, rounded)
    for mine, theirs in zip(weights(bits), weights(floats)):
        assert torch.equal(mine, theirs)


def test_checkpoint_restores_bit_for_bit(tmp_path):
    uri = str(tmp_path / "w0-t0.pt")
    config_every = CONFIG.model_copy(update={"checkpoint_every_tokens": ROWS * 7})
    first = DeviceLoop(SPECS, D_MODEL, config_every, STEPS, 1.5, "float32", "cpu", uri)
    train(first, 0, 7, "pieces")  # checkpoint after step 7: two steps past a logging point
    first.failed["c"] = "diverged: planted to see it round-trip"
    first.checkpoint()
    assert open(uri, "rb").read(8) != pickle.dumps(0)[:8]  # safetensors, not a pickle
    saved = first.state()
    resumed = DeviceLoop(SPECS, D_MODEL, config_every, STEPS, 1.5, "float32", "cpu", uri)
    assert resumed.restored and resumed.position == 7 and resumed.failed == first.failed
    again = resumed.state()
    flat_saved, flat_again = {}, {}
    tree_saved = json.dumps(_plain(saved, "", flat_saved), sort_keys=True)
    assert tree_saved == json.dumps(_plain(again, "", flat_again), sort_keys=True)
    assert flat_saved.keys() == flat_again.keys()
    for key, tensor in flat_saved.items():
        assert tensor.dtype == flat_again[key].dtype and torch.equal(tensor, flat_again[key]), key
    assert any(".metrics.sums." in key for key in flat_saved)  # metric sums not yet logged came back
    # and it continues exactly as an uninterrupted trainer does
    whole = DeviceLoop(SPECS, D_MODEL, config_every, STEPS, 1.5, "float32", "cpu")
    train(whole, 0, 7, "pieces")
    assert [r for r in train(whole, 7, STEPS, "pieces") if r["name"] != "c"] == train(resumed, 7, STEPS, "pieces")
    for mine, theirs in zip(weights(resumed), weights(whole)):
        assert torch.equal(mine, theirs)


def test_restored_trainer_hands_back_the_points_of_its_checkpoint_step(tmp_path):
    """A driver that died between a trainer's checkpoint and storing that step's curve points gets
    them from the restarted trainer, which resumes after that step and never computes them again."""
    uri = str(tmp_path / "w0-t0.pt")
    config = CONFIG.model_copy(update={"checkpoint_every_tokens": CONFIG.log_every_tokens})  # a point per checkpoint
    first = DeviceLoop(SPECS, D_MODEL, config, STEPS, 1.5, "float32", "cpu", uri)
    at_checkpoint = train(first, 0, 5, "pieces")  # step 5 logs, then checkpoints
    assert {r["tokens"] for r in at_checkpoint} == {5 * ROWS} and len(at_checkpoint) == 3
    restarted = DeviceLoop(SPECS, D_MODEL, config, STEPS, 1.5, "float32", "cpu", uri)
    assert restarted.position == 5 and restarted.replay == at_checkpoint
    assert all(r["tokens"] > 5 * ROWS for r in train(restarted, 0, STEPS, "pieces"))  # step 5's are not made again
    fresh = DeviceLoop(SPECS, D_MODEL, config, STEPS, 1.5, "float32", "cpu", str(tmp_path / "none.pt"))
    assert fresh.replay == []


@pytest.mark.parametrize(
    "record",
    [
        {"name": "../../x", "tokens": 5 * ROWS, "metrics": {"loss": 1.0}},
        {"name": "a", "tokens": 7, "metrics": {"loss": 1.0}},
        {"name": "a", "tokens": 5 * ROWS, "metrics": {"loss": "1.0"}},
    ],
)
def test_checkpoint_points_that_are_not_this_trainers_name_the_file(tmp_path, record):
    uri = str(tmp_path / "w0-t0.pt")
    config = CONFIG.model_copy(update={"checkpoint_every_tokens": CONFIG.log_every_tokens})
    first = DeviceLoop(SPECS, D_MODEL, config, STEPS, 1.5, "float32", "cpu", uri)
    train(first, 0, 5, "pieces")
    first.checkpoint([record])
    with pytest.raises(InputError, match="w0-t0.pt: checkpoint does not fit this trainer .*curve point"):
        DeviceLoop(SPECS, D_MODEL, config, STEPS, 1.5, "float32", "cpu", uri)


def _plain(state, path, tensors):
    """State with tensors replaced by their paths (collected in `tensors`), for comparing."""
    if isinstance(state, torch.Tensor):
        tensors[path] = state.detach().cpu()
        return path
    if isinstance(state, dict):
        return {key: _plain(value, f"{path}.{key}", tensors) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return [_plain(value, f"{path}.{index}", tensors) for index, value in enumerate(state)]
    return state


class Planted:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_planted_pickle_runs_nothing_and_names_the_file(tmp_path, how):
    uri, marker = str(tmp_path / "w0-t0.pt"), tmp_path / "ran"
    with open(uri, "wb") as file:
        if how == "pickle":
            pickle.dump({"trainers": Planted(str(marker))}, file)
        else:
            torch.save({"trainers": Planted(str(marker))}, file)
    with pytest.raises(InputError, match=r"w0-t0\.pt: not a dictsweep checkpoint"):
        loop(uri)
    assert not marker.exists()


def test_checkpoint_that_does_not_fit_names_the_file(tmp_path):
    uri = str(tmp_path / "w0-t0.pt")
    state = loop().state()
    state["trainers"] = state["trainers"][:1]
    with open(uri, "wb") as file:
        file.write(checkpoint_bytes(state))
    with pytest.raises(InputError, match=r"w0-t0\.pt: checkpoint does not fit this trainer"):
        loop(uri)
    with pytest.raises(InputError, match=r"other\.safetensors: not a dictsweep checkpoint"):
        read_checkpoint(save({"W": torch.zeros(2)}), "other.safetensors")  # safetensors, not ours


def test_hostile_kernel_record_names_the_file(tmp_path):
    uri = str(tmp_path / "w0-t0.pt")
    with open(uri + ".kernels.json", "w") as file:
        json.dump([{"kernel": "os.system", "decode": "dense"}, "bmm"], file)
    with pytest.raises(InputError, match=r"w0-t0\.pt\.kernels\.json"):
        loop(uri)


def test_kernel_record_holds_the_encoder_and_older_records_read_as_dense(tmp_path):
    uri = str(tmp_path / "w0-t0.pt")
    assert [t.ensemble.encoding for t in loop(uri).trainers] == ["auto", "auto"]  # set kernel on a CPU: not measured
    with open(uri + ".kernels.json") as file:
        assert json.load(file) == [{"kernel": "bmm", "decode": "sparse", "encode": "auto"}] * 2
    with open(uri + ".kernels.json", "w") as file:  # written before the encoder was a choice: it trained dense
        json.dump([{"kernel": "bmm", "decode": "sparse"}, "loop"], file)
    assert [(t.ensemble.kernel, t.ensemble.encoding) for t in loop(uri).trainers] == [
        ("bmm", "dense"),
        ("loop", "dense"),
    ]
    with open(uri + ".kernels.json", "w") as file:
        json.dump([{"kernel": "bmm", "decode": "sparse", "encode": "__import__('os')"}, "bmm"], file)
    with pytest.raises(InputError, match=r"w0-t0\.pt\.kernels\.json: expected 2 entries .* encode"):
        loop(uri)


def test_auxk_on_gpus_starts_at_the_logging_point_after_latents_die():
    wide = [EnsembleSpec("topk", 512, (Member(lr=3e-3, seed=1, k=4),), ("a",))]  # 512 rows fire <= 512 x 4
    device_loop = DeviceLoop(wide, D_MODEL, CONFIG, STEPS, 1.5, "float32", "cpu")
    trainer = device_loop.trainers[0]
    trainer.check_dead_every_step = False  # as on a GPU: no host sync per step
    calls = []
    forward = trainer.forward
    trainer.forward = lambda x, warmup, dead, *rest: calls.append(dead is not None) or forward(x, warmup, dead, *rest)
    train(device_loop, 0, STEPS, "pieces")
    # a window passes after 2 batches, but the first logging point is after step 5: AuxK from step 6
    assert calls[:5] == [False] * 5 and calls[5:] == [True] * (STEPS - 5)


def test_device_path_imports_no_ray_mlflow_or_deepspeed():
    code = (
        "import sys, dictsweep.train.device, dictsweep.train.bench, dictsweep.sae.sparse_decode; "
        "sys.path.insert(0, 'tests'); import gpu.conftest, gpu.test_gpu, gpu.test_device_gpu, gpu.test_sparse_encode_gpu; "
        "print(sorted(m for m in ('ray', 'mlflow', 'deepspeed') if m in sys.modules))"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
