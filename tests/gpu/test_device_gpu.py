"""The trainer's device path on CUDA end to end, without Ray (a small synth dataset as batch pieces
with prefetch through pinned memory and a side stream: train, checkpoint, restore bit for bit on
the same GPU, evaluate, export that `load_dictionary` loads), the kernel, decoder and encoder chosen
by measurement there, and `bench_train(..., device="cuda")` for each architecture."""

import numpy as np
import pytest
import torch

from dictsweep import load_dictionary
from dictsweep.config import TrainConfig
from dictsweep.sae import Member
from dictsweep.store.synth import SynthConfig, build_model, sample_rows
from dictsweep.train.bench import bench_train
from dictsweep.train.device import DeviceLoop, EnsembleSpec
from dictsweep.train.kernels import choose_path

pytestmark = pytest.mark.cuda

ROWS, STEPS, EVAL_STEPS, WINDOW = 512, 40, 4, 1000
SYNTH = SynthConfig(d_model=64, n_features=256, active=4, rows=ROWS * STEPS, eval_rows=ROWS * EVAL_STEPS)
SPECS = [
    EnsembleSpec("topk", 512, (Member(lr=2e-3, seed=1, k=8), Member(lr=2e-3, seed=2, k=12)), ("topk-a", "topk-b")),
    EnsembleSpec("batchtopk", 512, (Member(lr=2e-3, seed=3, k=8),), ("btk",)),
    EnsembleSpec("relu", 256, (Member(lr=2e-3, seed=4, l1_coef=0.3),), ("relu",)),
    EnsembleSpec("jumprelu", 256, (Member(lr=2e-3, seed=5, l1_coef=0.3),), ("jump",)),
]


def stream(rows: int, seed: int, dtype=np.float16) -> tuple[list[np.ndarray], np.ndarray]:
    """Synth rows as read-only windows (as the object store holds them) and the ground truth."""
    model = build_model(SYNTH)
    acts, _ = sample_rows(model, SYNTH, rows, np.random.default_rng(seed))
    data = acts.numpy().astype(dtype)
    windows = [data[start : start + WINDOW] for start in range(0, rows, WINDOW)]
    for window in windows:
        window.flags.writeable = False
    return windows, model.features.numpy()


def pieces(windows: list[np.ndarray], index: int) -> list[np.ndarray]:
    start, stop, out = index * ROWS, (index + 1) * ROWS, []
    for number, window in enumerate(windows):
        low, high = max(start, number * WINDOW), min(stop, (number + 1) * WINDOW)
        if low < high:
            out.append(window[low - number * WINDOW : high - number * WINDOW])
    return out


def device_loop(uri: str | None, config: TrainConfig) -> DeviceLoop:
    return DeviceLoop(SPECS, SYNTH.d_model, config, STEPS, 1.0 / np.sqrt(SYNTH.active), "float16", "cuda", uri)


def test_device_path_trains_checkpoints_restores_and_exports(tmp_path):
    config = TrainConfig(
        tokens=ROWS * STEPS,
        batch_rows=ROWS,
        lr_warmup_steps=5,
        log_every_tokens=ROWS * 10,
        dead_window_tokens=ROWS * 8,
        resample_every_tokens=ROWS * 12,
        eval_tokens=ROWS * EVAL_STEPS,
        checkpoint_every_tokens=ROWS * 25,
        kernel="auto",
        decode="auto",
    )
    uri = str(tmp_path / "checkpoints" / "w0-t0.pt")
    train, features = stream(ROWS * STEPS, seed=1)
    trainer = device_loop(uri, config)
    records = []
    for index in range(25):
        records += trainer.step(index, pieces(train, index), lambda i=index + 1: pieces(train, i))
    assert sum("name" in record for record in records) == 2 * 5  # two logging points x 5 SAEs
    assert any("peak_device_bytes" in record for record in records) or trainer.device.type != "cuda"
    saved = trainer.state()  # a checkpoint was written after step 25
    restored = device_loop(uri, config)
    assert restored.restored and restored.position == 25
    assert_same_state(saved, restored.state())
    for index in range(25, STEPS):
        restored.step(index, pieces(train, index), lambda i=index + 1: pieces(train, i))
    evaluation, _ = stream(ROWS * EVAL_STEPS, seed=2)
    for index in range(EVAL_STEPS):
        restored.eval_step(index, pieces(evaluation, index))
    result = restored.finish(str(tmp_path), {name: {} for spec in SPECS for name in spec.names}, features)
    assert not result["failed"] and len(result["finished"]) == 5
    x = torch.from_numpy(np.concatenate(evaluation)).float()
    for name, done in result["finished"].items():
        assert done["metrics"]["fvu"] < 0.99, name  # it learned something in 40 steps
        dictionary = load_dictionary(done["uri"])
        reconstruction = dictionary.decode(dictionary.encode(x))
        fvu = ((reconstruction - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
        assert fvu == pytest.approx(done["metrics"]["fvu"], rel=0.05, abs=0.02), name


def assert_same_state(saved, again, path=""):
    if isinstance(saved, torch.Tensor):
        assert saved.dtype == again.dtype and torch.equal(saved.cpu(), again.cpu()), path
    elif isinstance(saved, dict):
        assert saved.keys() == again.keys(), path
        for key in saved:
            assert_same_state(saved[key], again[key], f"{path}.{key}")
    elif isinstance(saved, (list, tuple)):
        assert len(saved) == len(again), path
        for index, (mine, theirs) in enumerate(zip(saved, again)):
            assert_same_state(mine, theirs, f"{path}.{index}")
    else:
        assert saved == again, path


def test_auto_measures_kernel_decoder_and_encoder_and_drops_what_fails(monkeypatch, caplog):
    members = [Member(lr=1e-3, seed=seed, k=16) for seed in range(4)]
    kernel, decode, encode, timings = choose_path("topk", 256, 4096, members, 1024, "cuda", total_steps=100_000)
    assert decode in ("dense", "sparse") and encode in ("dense", "sparse", "sparse-chunked", "sparse-csr")
    assert {"bmm/dense/dense", "bmm/sparse/sparse", "bmm/sparse/sparse-chunked", "bmm/sparse/sparse-csr"} <= set(
        timings
    )
    from dictsweep.sae import ensemble

    def broken(*args):
        raise NotImplementedError("no sparse decoder here")

    monkeypatch.setattr(ensemble, "sparse_decode", broken)
    kernel, decode, encode, timings = choose_path("topk", 256, 4096, members, 1024, "cuda", candidates=("bmm",))
    assert (kernel, decode) == ("bmm", "dense") and not any(name.startswith("bmm/sparse/") for name in timings)
    assert "kernel choice: bmm/sparse/sparse dropped (NotImplementedError: no sparse decoder here)" in caplog.messages


@pytest.mark.parametrize("architecture", ["relu", "topk", "batchtopk", "jumprelu"])
def test_bench_train_on_cuda(architecture):
    decodes = ("dense", "sparse") if "topk" in architecture else ("auto",)
    result = bench_train(
        256,
        4096,
        1024,
        8,
        steps=5,
        architecture=architecture,
        kernels=("bmm", "compile"),
        device="cuda",
        decodes=decodes,
        rounds=2,
        k=32,
    )
    assert result["device"].startswith("cuda") and result["sae_samples_per_s"] > 0
    assert len(result["candidates"]) == 2 * len(decodes) and result["peak_gpu_mb"] > 0
    assert result["speedup_vs_reference"] > 0 and result["max_abs_weight_diff_vs_reference"] < 5e-2


def test_first_step_peak_is_the_step_not_the_kernel_measurement():
    """The peak a trainer reports after its first step (checked against the plan's memory model) is
    that of training: measuring the kernel candidates, several copies of the ensemble at once, is
    not counted (it made the plan look wrong for a trainer holding one large ensemble)."""
    import gc

    members = tuple(Member(lr=1e-3, seed=seed, k=32) for seed in range(4))
    spec = EnsembleSpec("topk", 8192, members, tuple(f"m{seed}" for seed in range(4)))
    config = TrainConfig(tokens=ROWS * 10, batch_rows=ROWS, lr_warmup_steps=1, log_every_tokens=ROWS * 10)
    batch = [np.random.default_rng(0).standard_normal((ROWS, 256)).astype(np.float16)]

    def first_step_peak(kernel: str, decode: str) -> tuple[int, tuple[str, str, str]]:
        chosen = DeviceLoop(
            [spec], 256, config.model_copy(update={"kernel": kernel, "decode": decode}), 10, 1.0, "float16", "cuda"
        )
        peak = next(r["peak_device_bytes"] for r in chosen.step(0, batch) if "peak_device_bytes" in r)
        path = chosen.chosen[0]
        del chosen
        gc.collect()
        torch.cuda.empty_cache()
        return peak, path

    measured, path = first_step_peak("auto", "auto")  # candidates measured first
    alone, _ = first_step_peak(*path[:2])  # the same path, nothing measured
    assert measured <= alone * 1.1, f"{measured / 2**20:.0f} MiB after measuring, {alone / 2**20:.0f} MiB alone"


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_bench_train_times_the_encoders_on_cuda(architecture):
    encodes = ("dense", "sparse", "sparse-chunked", "sparse-csr")
    result = bench_train(
        256, 4096, 1024, 4, steps=5, architecture=architecture, kernels=("bmm",), device="cuda",
        decodes=("sparse",), rounds=2, k=32, encodes=encodes,
    )  # fmt: skip
    assert set(result["candidates"]) == {f"bmm/sparse/{encode}" for encode in encodes}
    assert result["encode"] in encodes and result["max_abs_weight_diff_vs_reference"] < 5e-2
