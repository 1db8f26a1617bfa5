"""Transcoder datasets: a `target` column beside `act`, written, read and checked as `act` is, and
streamed after it in every window row."""

import json

import numpy as np
import pytest
import torch

from dictsweep.errors import DatasetError
from dictsweep.store.dataset import ActivationDataset, DatasetWriter, write_shard
from dictsweep.store.synth import SynthConfig, build_model, sample_rows, synth_dataset
from dictsweep.stream.actors import read_window, stream_orders


def pairs(rows=23, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 6, generator=generator) * 10, torch.randn(rows, 4, generator=generator)  # act, target


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_write_then_read_targets(tmp_path, dtype):
    acts, targets = pairs()
    source = {"model": "m", "hook": "a", "target_hook": "b"}
    with DatasetWriter(str(tmp_path), 6, dtype, shard_rows=8, source=source, d_target=4) as writer:
        writer.add(acts, columns={"seq": np.arange(23)}, target=targets)
        writer.add(acts[:3], split="eval", columns={"seq": np.arange(3)}, target=targets[:3])
    dataset = ActivationDataset.open(str(tmp_path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["d_target"] == 4 and manifest["source"]["target_hook"] == "b"
    assert dataset.d_target == 4
    read = [dataset.read_shard(i, columns=True) for i in range(3)]
    torch.testing.assert_close(torch.cat([a for a, _ in read]), acts.to(dataset.torch_dtype), rtol=0, atol=0)
    torch.testing.assert_close(
        torch.cat([c["target"] for _, c in read]), targets.to(dataset.torch_dtype), rtol=0, atol=0
    )
    np.testing.assert_array_equal(read[2][1]["seq"], np.arange(16, 23))
    stored = targets.to(dataset.torch_dtype).double()
    assert dataset.mean_sq_norm("target") == pytest.approx(float(stored.pow(2).sum(1).mean()), rel=1e-6)
    # a reader that wants act alone reads a transcoder dataset as any other
    assert torch.equal(dataset.read_shard(1), acts[8:16].to(dataset.torch_dtype))


def test_writer_needs_a_target_of_its_width(tmp_path):
    acts, targets = pairs()
    with pytest.raises(DatasetError, match=r"expected target \[23, 4\]"):
        DatasetWriter(str(tmp_path / "a"), 6, d_target=4).add(acts)
    with pytest.raises(DatasetError, match=r"expected target \[23, 4\].*got \[23, 3\]"):
        DatasetWriter(str(tmp_path / "b"), 6, d_target=4).add(acts, target=targets[:, :3])
    with pytest.raises(DatasetError, match="d_target=0"):
        DatasetWriter(str(tmp_path / "c"), 6).add(acts, target=targets)


def bad_dataset(tmp_path, shard_target):
    """A transcoder dataset (d_target 4) whose second shard was written with `shard_target`."""
    acts, targets = pairs(16)
    shards = [write_shard(str(tmp_path), "train/00000.arrow", acts[:8], "float32", target=targets[:8])]
    shards.append(write_shard(str(tmp_path), "train/00001.arrow", acts[8:], "float32", target=shard_target))
    from dictsweep.store.dataset import write_manifest

    write_manifest(str(tmp_path), 6, "float32", shards, [], d_target=4)
    return ActivationDataset.open(str(tmp_path))


@pytest.mark.parametrize(
    "target,words",
    [
        (None, "no column 'target'"),
        (torch.zeros(8, 3), "column 'target' holds 3 values per row, but the manifest says d_target=4"),
        (torch.zeros(8, 4).index_fill_(0, torch.tensor([5]), float("nan")), "row 5 holds nan (column 0 of target)"),
    ],
)
def test_a_bad_target_column_names_the_shard(tmp_path, target, words):
    dataset = bad_dataset(tmp_path, target)
    dataset.read_shard(0)  # the good shard reads
    with pytest.raises(DatasetError) as raised:
        dataset.read_shard(1)
    assert f"shard train/00001.arrow of {tmp_path}" in str(raised.value) and words in str(raised.value)


def test_synth_writes_a_sparse_map_and_its_target_features(tmp_path):
    config = SynthConfig(
        d_model=8, d_target=5, n_features=16, active=2, rows=3000, eval_rows=500, shard_rows=1000, seed=3
    )
    synth_dataset(str(tmp_path), config)
    dataset = ActivationDataset.open(str(tmp_path))
    model = build_model(config)
    truth = dataset.ground_truth("target_features")
    assert torch.equal(truth, model.target_features) and torch.equal(dataset.ground_truth(), model.features)
    acts, extra = dataset.read_shard(0, columns=True)
    # the same sparse code through both: the target is the code of its row times the target features
    rows, codes = sample_rows(model, config, 3000, np.random.default_rng([3, 1]))  # the train split's one chunk
    assert torch.equal(acts, rows[:1000])
    torch.testing.assert_close(extra["target"], torch.sparse.mm(codes, model.target_features)[:1000])
    # the input side is the same dataset as without a target
    plain = tmp_path / "plain"
    synth_dataset(str(plain), config.model_copy(update={"d_target": 0}))
    assert torch.equal(ActivationDataset.open(str(plain)).read_shard(0), acts)


def test_windows_carry_each_rows_target_after_its_act(tmp_path):
    acts, targets = pairs(64, seed=5)
    with DatasetWriter(str(tmp_path), 6, "float32", shard_rows=16, d_target=4) as writer:
        writer.add(acts, target=targets)
    dataset = ActivationDataset.open(str(tmp_path))
    order = stream_orders(dataset, 8, 2, seed=7)["train"]
    for sequence in range(order.windows_per_epoch):
        window = order.window(sequence)
        plain, _ = read_window(dataset, order, window, "train")
        paired, _ = read_window(dataset, order, window, "train", target=True)
        assert paired.shape == (window.rows, 10)
        np.testing.assert_array_equal(paired[:, :6], plain)  # the same rows in the same order
        # each row's target is the one written beside that act
        for row in paired[:5]:
            written = int(np.argmin(np.abs(acts.numpy() - row[:6]).sum(1)))
            np.testing.assert_array_equal(row[6:], targets[written].numpy())
