import json
import mmap

import numpy as np
import pytest
import torch

from dictsweep.errors import DatasetError
from dictsweep.store import fs
from dictsweep.store.dataset import ActivationDataset, DatasetWriter, any_non_finite

from .conftest import edit_manifest


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_write_then_read_each_dtype(tmp_path, dtype):
    acts = torch.randn(23, 6, generator=torch.Generator().manual_seed(2)) * 10  # [23, 6]
    seq = np.arange(23, dtype=np.int64)
    with DatasetWriter(str(tmp_path), d_model=6, dtype=dtype, shard_rows=8, source={"model": "m"}) as writer:
        writer.add(acts, columns={"seq": seq})
        writer.add(acts[:3], split="eval")
    dataset = ActivationDataset.open(str(tmp_path))
    stored = acts.to(dataset.torch_dtype)
    assert dataset.dtype == dtype and dataset.d_model == 6 and dataset.n_rows == 23 and dataset.n_eval_rows == 3
    assert dataset.manifest.source == {"model": "m"}
    shards = [dataset.read_shard(i) for i in range(len(dataset.shards()))]
    assert all(shard.dtype == stored.dtype for shard in shards)
    assert torch.equal(torch.cat(shards), stored)
    assert torch.equal(dataset.read_shard(0, split="eval"), stored[:3])
    _, columns = dataset.read_shard(2, columns=True)
    np.testing.assert_array_equal(columns["seq"], seq[16:])
    expected_norm = float((stored.double() ** 2).sum(1).mean())
    assert dataset.mean_sq_norm() == pytest.approx(expected_norm, rel=1e-6)


def test_shards_hold_shard_rows_and_the_last_is_partial(small_dataset):
    prefix, train, evaluation = small_dataset
    dataset = ActivationDataset.open(str(prefix))
    assert [s.path for s in dataset.shards()] == ["train/00000.arrow", "train/00001.arrow", "train/00002.arrow"]
    assert [s.rows for s in dataset.shards()] == [10, 10, 5]
    assert [(s.path, s.rows) for s in dataset.shards("eval")] == [("eval/00000.arrow", 7)]
    assert [s.bytes for s in dataset.shards()] == [(prefix / s.path).stat().st_size for s in dataset.shards()]
    assert torch.equal(dataset.read_shard(1), train[10:20])
    assert dataset.shard_uri(dataset.shards()[0]) == f"{prefix}/train/00000.arrow"


def test_read_shard_bytes_then_decode_is_zero_copy(small_dataset):
    dataset = ActivationDataset.open(str(small_dataset[0]))
    data = dataset.read_shard_bytes(0)
    acts = dataset.decode(data, 0)
    base = np.frombuffer(data, dtype=np.uint8).ctypes.data
    assert isinstance(data, bytearray) and base <= acts.data_ptr() < base + len(data)


def test_a_mapped_shard_is_the_files_bytes_private_to_the_process_and_checked_alike(small_dataset):
    """What readers do with a local dataset: the decoded rows view the page cache's bytes, a write
    to them stays in the process, and every check reads the same as for read bytes."""
    prefix, train = small_dataset[0], small_dataset[1]
    dataset = ActivationDataset.open(str(prefix))
    data = dataset.read_shard_bytes(0, mapped=True)
    acts = dataset.decode(data, 0)
    base = np.frombuffer(data, dtype=np.uint8).ctypes.data
    assert isinstance(data, mmap.mmap) and base <= acts.data_ptr() < base + len(data)
    assert torch.equal(acts, train[:10])
    acts.fill_(7.0)
    assert torch.equal(dataset.read_shard(0), train[:10])  # the file is as it was
    path = prefix / "train" / "00001.arrow"
    size = path.stat().st_size
    corrupt = bytearray(path.read_bytes())
    corrupt[size // 2] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    with pytest.raises(DatasetError, match=r"shard train/00001.arrow of .*: blake3 mismatch"):
        dataset.read_shard_bytes(1, mapped=True)
    path.write_bytes(bytes(corrupt[:100]))
    with pytest.raises(DatasetError, match=f"shard train/00001.arrow of .*: 100 bytes, the manifest says {size}"):
        dataset.read_shard_bytes(1, mapped=True)
    path.unlink()
    with pytest.raises(DatasetError, match="shard train/00001.arrow of .* is missing"):
        dataset.read_shard_bytes(1, mapped=True)


def test_crash_inside_the_writer_leaves_no_dataset(tmp_path):
    with pytest.raises(RuntimeError, match="harvest died"):
        with DatasetWriter(str(tmp_path), d_model=4, shard_rows=2) as writer:
            writer.add(torch.zeros(5, 4))  # two full shards are written before the crash
            raise RuntimeError("harvest died")
    assert (tmp_path / "train" / "00001.arrow").exists() and not (tmp_path / "manifest.json").exists()
    with pytest.raises(
        DatasetError, match="has no manifest.json: not a dictsweep dataset, or its writer did not finish"
    ):
        ActivationDataset.open(str(tmp_path))


def test_writer_refuses_an_existing_dataset_unless_overwrite(small_dataset):
    prefix = str(small_dataset[0])
    with pytest.raises(DatasetError, match="already holds a dataset"):
        DatasetWriter(prefix, d_model=4)
    with DatasetWriter(prefix, d_model=2, overwrite=True) as writer:
        assert not fs.exists(f"{prefix}/manifest.json")  # the old dataset is gone at once
        writer.add(torch.ones(3, 2))
    dataset = ActivationDataset.open(prefix)
    assert dataset.d_model == 2 and dataset.n_rows == 3 and dataset.mean_sq_norm() == 2.0


def test_add_checks_its_input(tmp_path):
    writer = DatasetWriter(str(tmp_path), d_model=4)
    with pytest.raises(DatasetError, match=r"expected a float tensor of shape \[n, 4\], got \[3, 5\] torch.float32"):
        writer.add(torch.zeros(3, 5))
    with pytest.raises(DatasetError, match=r"got \[3, 4\] torch.int64"):
        writer.add(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(DatasetError, match=r"column 'pos' must be integers of shape \[3\]"):
        writer.add(torch.zeros(3, 4), columns={"pos": np.zeros(2, dtype=np.int64)})
    writer.add(torch.zeros(3, 4), columns={"pos": np.zeros(3, dtype=np.int64)})
    with pytest.raises(DatasetError, match="columns \\[\\] differ from the earlier rows' \\['pos'\\]"):
        writer.add(torch.zeros(3, 4))
    with pytest.raises(DatasetError, match="dtype 'float64' is not one of float16, bfloat16, float32"):
        DatasetWriter(str(tmp_path / "other"), d_model=4, dtype="float64")
    with pytest.raises(DatasetError, match="no train rows were added"):
        DatasetWriter(str(tmp_path / "empty"), d_model=4).close()


def test_writer_copies_what_it_is_given(tmp_path):
    acts = torch.zeros(3, 4)
    with DatasetWriter(str(tmp_path), d_model=4) as writer:
        writer.add(acts)
        acts += 1  # a harvest loop reusing its buffer must not change buffered rows
    assert torch.equal(ActivationDataset.open(str(tmp_path)).read_shard(0), torch.zeros(3, 4))


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_flipped_byte_is_a_checksum_error_naming_the_shard(small_dataset, algorithm):
    """Readers check BLAKE3; a dataset written before manifests carried it (SHA-256 alone) is
    checked by SHA-256."""
    prefix = small_dataset[0]
    if algorithm == "sha256":
        manifest = json.loads((prefix / "manifest.json").read_text())
        for shard in manifest["shards"] + manifest["eval_shards"]:
            assert len(shard.pop("blake3")) == 64
        (prefix / "manifest.json").write_text(json.dumps(manifest))
        assert torch.equal(ActivationDataset.open(str(prefix)).read_shard(1), small_dataset[1][10:20])
    path = prefix / "train" / "00001.arrow"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    dataset = ActivationDataset.open(str(prefix))
    with pytest.raises(
        DatasetError,
        match=rf"shard train/00001.arrow of .*: {algorithm} mismatch \(expected [0-9a-f]{{12}}\.\., "
        r"got [0-9a-f]{12}\.\.\): the object is corrupt or was rewritten",
    ):
        dataset.read_shard(1)
    assert torch.equal(dataset.read_shard(0), small_dataset[1][:10])  # the others still read


def test_truncated_shard_names_its_sizes(small_dataset):
    prefix = small_dataset[0]
    path = prefix / "eval" / "00000.arrow"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(
        DatasetError,
        match=f"shard eval/00000.arrow of .*: 100 bytes, the manifest says {size}: the object is truncated",
    ):
        ActivationDataset.open(str(prefix)).read_shard(0, split="eval")


def test_missing_shard_file(small_dataset):
    prefix = small_dataset[0]
    (prefix / "train" / "00002.arrow").unlink()
    with pytest.raises(DatasetError, match="shard train/00002.arrow of .* is missing: the dataset is incomplete"):
        ActivationDataset.open(str(prefix)).read_shard(2)


def test_row_count_differing_from_the_manifest(small_dataset):
    prefix = small_dataset[0]

    def claim_eleven_rows(manifest):
        manifest["shards"][0]["rows"] = 11
        manifest["n_rows"] = 26

    edit_manifest(prefix, claim_eleven_rows)
    with pytest.raises(DatasetError, match="shard train/00000.arrow of .*: 10 rows, the manifest says 11"):
        ActivationDataset.open(str(prefix)).read_shard(0)


def test_manifest_dtype_differing_from_the_shards(small_dataset):
    prefix = small_dataset[0]
    edit_manifest(prefix, lambda m: m.update(dtype="float16"))
    with pytest.raises(
        DatasetError,
        match="shard train/00000.arrow of .*: column 'act' stores float32 values, but the manifest says dtype=float16",
    ):
        ActivationDataset.open(str(prefix)).read_shard(0)


def test_mean_sq_norm_is_computed_when_the_manifest_has_no_stats(small_dataset):
    prefix, train, _ = small_dataset
    recorded = ActivationDataset.open(str(prefix)).mean_sq_norm()
    edit_manifest(prefix, lambda m: m.pop("stats"))
    dataset = ActivationDataset.open(str(prefix))
    assert dataset.manifest.stats is None
    expected = float((train.double() ** 2).sum(1).mean())
    assert dataset.mean_sq_norm() == pytest.approx(expected, rel=1e-9) == pytest.approx(recorded, rel=1e-9)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("row, column", [(0, 0), (13, 2), (39, 5)])
def test_non_finite_value_names_the_shard_and_the_first_bad_row(tmp_path, dtype, value, row, column):
    acts = torch.randn(80, 6, generator=torch.Generator().manual_seed(4))  # [80, 6]; shards of 40
    acts[40 + row, column] = value
    if row < 39:
        acts[40 + row + 1, 0] = float("nan")  # a later bad row: the first one is named
    with DatasetWriter(str(tmp_path), d_model=6, dtype=dtype, shard_rows=40) as writer:
        writer.add(acts)
    dataset = ActivationDataset.open(str(tmp_path))
    assert torch.equal(dataset.read_shard(0), acts[:40].to(dataset.torch_dtype))  # the clean shard reads
    with pytest.raises(DatasetError) as raised:
        dataset.read_shard(1)
    assert str(raised.value).startswith(
        f"shard train/00001.arrow of {tmp_path}: row {row} holds {value} (column {column})"
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_bit_test_knows_every_16_bit_value(dtype):
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)  # [65536] each pattern
    finite = torch.isfinite(every.float())
    assert any_non_finite(every) and not any_non_finite(every[finite])
    for value in every[~finite].split(1):  # each NaN and infinity, alone among finite values
        assert any_non_finite(torch.cat([every[finite][:100], value, every[finite][-100:]]))


def test_the_bit_test_knows_float32_edges():
    edges = (
        torch.tensor([0x7F7FFFFF, 0xFF7FFFFF, 0x00000001, 0x80000001, 0, 0x80000000], dtype=torch.int64)
        .to(torch.int32)
        .view(torch.float32)
    )  # largest finite, tiniest, zeros
    assert not any_non_finite(edges)
    for bits in (0x7F800000, 0xFF800000, 0x7FC00000, 0xFFFFFFFF, 0x7F800001):  # +-inf, NaNs
        bad = torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32)
        assert any_non_finite(torch.cat([edges, bad, edges]))
    assert any_non_finite(torch.tensor([[1.0, float("nan")]]).t())  # not contiguous: the float path


@pytest.mark.parametrize("norm", [float("nan"), float("inf"), 0.0, -2.0])
def test_manifest_mean_sq_norm_must_be_finite_and_positive(small_dataset, norm):
    prefix = small_dataset[0]
    edit_manifest(prefix, lambda m: m.update(stats={"mean_sq_norm": norm}))
    with pytest.raises(DatasetError, match="field 'stats.mean_sq_norm'"):
        ActivationDataset.open(str(prefix)).mean_sq_norm()


def test_ground_truth_round_trip_and_errors(tmp_path):
    features = torch.nn.functional.normalize(torch.randn(7, 4, generator=torch.Generator().manual_seed(3)), dim=1)
    with DatasetWriter(str(tmp_path), d_model=4) as writer:
        writer.add(torch.randn(5, 4))
        manifest = writer.close(ground_truth=features, extra_stats={"note": 1})
    assert manifest.ground_truth == "ground_truth.safetensors" and manifest.stats["note"] == 1
    dataset = ActivationDataset.open(str(tmp_path))
    assert torch.equal(dataset.ground_truth(), features)
    (tmp_path / "ground_truth.safetensors").unlink()
    with pytest.raises(DatasetError, match="ground_truth.safetensors is missing"):
        dataset.ground_truth()
    (tmp_path / "ground_truth.safetensors").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="not a readable safetensors file"):
        dataset.ground_truth()
    assert ActivationDataset.open(str(tmp_path)).manifest.ground_truth is not None


def test_dataset_without_ground_truth_returns_none(small_dataset):
    assert ActivationDataset.open(str(small_dataset[0])).ground_truth() is None


def test_non_local_filesystem_round_trip():
    uri = "memory://store-test/dataset"  # any fsspec URI goes through fs.resolve, like s3://
    acts = torch.randn(9, 3, generator=torch.Generator().manual_seed(4))
    with DatasetWriter(uri, d_model=3, shard_rows=4, overwrite=True) as writer:
        writer.add(acts)
        writer.write_file("contexts/00000.arrow", b"extra")
    dataset = ActivationDataset.open(uri + "/")
    assert dataset.uri == uri and [s.rows for s in dataset.shards()] == [4, 4, 1]
    assert torch.equal(torch.cat([dataset.read_shard(i) for i in range(3)]), acts)
    assert fs.read_bytes(f"{uri}/contexts/00000.arrow") == b"extra"
