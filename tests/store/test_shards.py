import numpy as np
import pyarrow as pa
import pytest
import torch

from dictsweep.errors import DatasetError
from dictsweep.store.shards import decode_shard, encode_shard


def _acts(rows: int = 6, d_model: int = 5) -> torch.Tensor:
    return torch.randn(rows, d_model, generator=torch.Generator().manual_seed(1)) * 3  # [rows, d_model]


def _arrow_file(batch: pa.RecordBatch) -> bytearray:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return bytearray(sink.getvalue().to_pybytes())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_keeps_the_stored_values_exactly(dtype):
    acts = _acts()
    columns = {"seq": np.arange(6, dtype=np.int64), "pos": np.array([0, 1, 2, 0, 1, 2], dtype=np.int32)}
    decoded, decoded_columns = decode_shard(bytearray(encode_shard(acts, dtype, columns)), 5, dtype, "t")
    expected = acts.to(getattr(torch, dtype))
    assert decoded.dtype == expected.dtype and decoded.shape == (6, 5)
    assert torch.equal(decoded, expected)
    assert set(decoded_columns) == {"seq", "pos"}
    np.testing.assert_array_equal(decoded_columns["pos"], columns["pos"])
    assert decoded_columns["pos"].dtype == np.int32


def test_bfloat16_is_stored_as_its_bit_pattern_with_metadata():
    acts = _acts()
    table = pa.ipc.open_file(pa.py_buffer(encode_shard(acts, "bfloat16"))).read_all()
    field = table.schema.field("act")
    assert field.type == pa.list_(pa.uint16(), 5)
    assert field.metadata[b"dictsweep.dtype"] == b"bfloat16"
    bits = table.column("act").combine_chunks().flatten().to_numpy()
    assert np.array_equal(bits, acts.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).ravel())


def test_decode_is_zero_copy_and_writable():
    data = bytearray(encode_shard(_acts(64, 8), "float32", {"token_id": np.arange(64)}))
    acts, columns = decode_shard(data, 8, "float32", "t")
    base = np.frombuffer(data, dtype=np.uint8).ctypes.data
    assert base <= acts.data_ptr() and acts.data_ptr() + acts.nbytes <= base + len(data)
    assert base <= columns["token_id"].ctypes.data < base + len(data)
    acts[0, 0] = 123.0  # writes through to the buffer: no copy was made
    assert decode_shard(data, 8, "float32", "t")[0][0, 0] == 123.0


def test_bytes_input_is_accepted():
    acts, _ = decode_shard(encode_shard(_acts(), "float16"), 5, "float16", "t")
    assert torch.equal(acts, _acts().half())


def test_several_record_batches_are_concatenated():
    first = encode_shard(_acts(), "float32")
    batch = pa.ipc.open_file(pa.py_buffer(first)).get_batch(0)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
        writer.write_batch(batch)
    acts, _ = decode_shard(bytearray(sink.getvalue().to_pybytes()), 5, "float32", "t")
    assert torch.equal(acts, torch.cat([_acts(), _acts()]))


@pytest.mark.parametrize(
    "data, found",
    [
        (bytearray(b"definitely not an arrow file"), "not a readable Arrow IPC file"),
        (bytearray(encode_shard(_acts(), "float32")[:-100]), "not a readable Arrow IPC file"),
    ],
)
def test_unreadable_bytes_name_the_shard(data, found):
    with pytest.raises(DatasetError, match=f"shard train/00007.arrow: {found}"):
        decode_shard(data, 5, "float32", "train/00007.arrow")


def test_wrong_list_size_names_both_sizes():
    with pytest.raises(
        DatasetError, match="shard s: column 'act' holds 5 values per row, but the manifest says d_model=6"
    ):
        decode_shard(bytearray(encode_shard(_acts(), "float32")), 6, "float32", "s")


@pytest.mark.parametrize(
    "stored, expected, found",
    [
        ("float16", "float32", "stores float16 values, but the manifest says dtype=float32"),
        ("bfloat16", "float16", "stores bfloat16 values, but the manifest says dtype=float16"),
        ("float32", "bfloat16", "stores float32 values, but the manifest says dtype=bfloat16"),
    ],
)
def test_wrong_dtype_names_what_was_found(stored, expected, found):
    with pytest.raises(DatasetError, match=f"shard s: column 'act' {found}"):
        decode_shard(bytearray(encode_shard(_acts(), stored)), 5, expected, "s")


def test_wrong_column_type_and_missing_column():
    values = pa.array(np.zeros(10, dtype=np.float32))
    variable = pa.ListArray.from_arrays(pa.array([0, 5, 10], type=pa.int32()), values)
    with pytest.raises(DatasetError, match=r"column 'act' is list<item: float>, expected fixed_size_list"):
        decode_shard(_arrow_file(pa.record_batch({"act": variable})), 5, "float32", "s")
    with pytest.raises(DatasetError, match=r"shard s: no column 'act' \(found columns \['x'\]\)"):
        decode_shard(_arrow_file(pa.record_batch({"x": values})), 5, "float32", "s")
    act = pa.FixedSizeListArray.from_arrays(values, 5)
    strings = pa.array(["a", "b"])
    with pytest.raises(DatasetError, match="column 'word' is string"):
        decode_shard(_arrow_file(pa.record_batch({"act": act, "word": strings})), 5, "float32", "s")


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError, match="rows, d_model"):
        encode_shard(torch.zeros(3), "float32")
    with pytest.raises(ValueError, match="dtype 'float64'"):
        encode_shard(_acts(), "float64")
    with pytest.raises(ValueError, match="column 'seq' must be integers of shape \\[6\\]"):
        encode_shard(_acts(), "float32", {"seq": np.arange(5)})


def test_shards_of_other_writers_need_no_metadata():
    values = pa.array(_acts().numpy().ravel().astype(np.float16))
    data = _arrow_file(pa.record_batch({"act": pa.FixedSizeListArray.from_arrays(values, 5)}))
    assert torch.equal(decode_shard(data, 5, "float16", "s")[0], _acts().half())
    with pytest.raises(DatasetError, match="stores float16 values, but the manifest says dtype=float32"):
        decode_shard(data, 5, "float32", "s")
