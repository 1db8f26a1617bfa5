"""The one shard encoder/decoder: an Arrow IPC file whose column `act` is FixedSizeList<d_model>.

bfloat16 has no Arrow type, so it is stored as its 16-bit pattern (uint16) with the field
metadata {"dictsweep.dtype": "bfloat16"}. Optional integer columns (`token_id`, `seq`, `pos`)
pass through. A transcoder dataset's shards have a second float column, `target`
(FixedSizeList<d_target> of the same dtype). Decoding makes the tensors views of the shard's bytes.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from dictsweep.errors import DatasetError
from dictsweep.store.manifest import TORCH_DTYPES

ARROW_TYPES = {"float16": pa.float16(), "bfloat16": pa.uint16(), "float32": pa.float32()}
ARROW_NAMES = {"halffloat": "float16", "float": "float32", "double": "float64"}  # for messages
DTYPE_KEY = b"dictsweep.dtype"


def float_column(values: torch.Tensor, dtype: str) -> pa.FixedSizeListArray:
    """`values` [rows, width] (cast to `dtype`) as a FixedSizeList<width> column."""
    flat = values.detach().to("cpu", TORCH_DTYPES[dtype]).contiguous().reshape(-1)  # [rows * width]
    flat = flat.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else flat.numpy()  # numpy: no bf16
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=ARROW_TYPES[dtype]), values.shape[1])


def encode_shard(
    acts: torch.Tensor, dtype: str, columns: dict[str, np.ndarray] | None = None, target: torch.Tensor | None = None
) -> bytes:
    """`acts` [rows, d_model] (cast to `dtype`), integer `columns` [rows] and a transcoder's `target`
    [rows, d_target] as an Arrow IPC file."""
    if dtype not in ARROW_TYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(ARROW_TYPES)}")
    if acts.ndim != 2:
        raise ValueError(f"acts must be [rows, d_model], got shape {list(acts.shape)}")
    rows = acts.shape[0]
    arrays, fields = [], []
    for name, values in (("act", acts), ("target", target)):
        if values is None:
            continue
        if values.ndim != 2 or values.shape[0] != rows:
            raise ValueError(f"{name} must be [{rows}, width], got shape {list(values.shape)}")
        arrays.append(float_column(values, dtype))
        fields.append(pa.field(name, arrays[-1].type, nullable=False, metadata={DTYPE_KEY: dtype.encode()}))
    for name, column in (columns or {}).items():
        column = np.asarray(column)
        if name in ("act", "target") or column.shape != (rows,) or column.dtype.kind not in "iu":
            raise ValueError(
                f"column {name!r} must be integers of shape [{rows}] named other than "
                f"'act', got {column.dtype} {list(column.shape)}"
            )
        arrays.append(pa.array(np.ascontiguousarray(column)))
        fields.append(pa.field(name, arrays[-1].type, nullable=False))
    batch = pa.record_batch(arrays, schema=pa.schema(fields))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, batch.schema) as writer:  # uncompressed by default
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def decode_shard(
    data: bytes | bytearray, d_model: int, dtype: str, name: str, d_target: int = 0
) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """The `act` tensor [rows, d_model] (a view of `data`) and the integer columns of one shard; with
    `d_target`, its `target` column too (under "target", a tensor [rows, d_target], also a view)."""
    if isinstance(data, bytes):
        data = bytearray(data)  # one copy; pass a bytearray to avoid it (tensors must be writable)
    try:
        reader = pa.ipc.open_file(pa.py_buffer(data))
        batch = _single_batch(reader)
        batch.validate()
    except (pa.ArrowException, OSError, ValueError) as error:
        raise DatasetError(
            f"shard {name}: not a readable Arrow IPC file ({error}); the object is "
            "truncated or is not a dictsweep shard: re-run its writer"
        ) from None

    tensor = _float_tensor(data, batch, "act", d_model, dtype, name)  # [rows, d_model]
    columns = {"target": _float_tensor(data, batch, "target", d_target, dtype, name)} if d_target else {}
    for field, column in zip(batch.schema, batch.columns):
        if field.name in ("act", "target") and pa.types.is_fixed_size_list(field.type):
            continue
        if not pa.types.is_integer(field.type) or column.null_count:
            raise DatasetError(
                f"shard {name}: column {field.name!r} is {field.type} with "
                f"{column.null_count} nulls; besides 'act' a shard holds only integer "
                "columns without nulls (token_id, seq, pos)"
            )
        columns[field.name] = _numpy_view(data, column)
    return tensor, columns


def _single_batch(reader: pa.ipc.RecordBatchFileReader) -> pa.RecordBatch:
    """The file's only record batch, or (from other writers) all batches concatenated (a copy)."""
    if reader.num_record_batches == 1:
        return reader.get_batch(0)
    table = reader.read_all()
    return pa.RecordBatch.from_arrays([column.combine_chunks() for column in table.columns], schema=table.schema)


def _float_tensor(
    data: bytearray, batch: pa.RecordBatch, column: str, width: int, dtype: str, name: str
) -> torch.Tensor:
    """A float column (`act`, `target`) as a tensor [rows, width] viewing `data`, checked first."""
    _check_float_field(batch.schema, column, width, dtype, name)
    array = batch.column(column)
    flat = array.flatten()  # [rows * width]
    if array.null_count or flat.null_count:
        raise DatasetError(f"shard {name}: column {column!r} has null values; activations must all be set")
    values = _numpy_view(data, flat)
    tensor = (
        torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
        if dtype == "bfloat16"
        else torch.from_numpy(values)
    )
    return tensor.view(len(array), width)


def _check_float_field(schema: pa.Schema, column: str, width: int, dtype: str, name: str) -> None:
    """DatasetError unless `column` is FixedSizeList<width> of the manifest's dtype."""
    expected = pa.list_(ARROW_TYPES[dtype], width)
    wanted = f"expected {expected}" + (" (bfloat16 bit patterns)" if dtype == "bfloat16" else "")
    width_key = "d_model" if column == "act" else "d_target"
    if column not in schema.names:
        raise DatasetError(f"shard {name}: no column {column!r} (found columns {schema.names}); {wanted}")
    field = schema.field(column)
    if not pa.types.is_fixed_size_list(field.type):
        raise DatasetError(f"shard {name}: column {column!r} is {field.type}, {wanted}")
    if field.type.list_size != width:
        raise DatasetError(
            f"shard {name}: column {column!r} holds {field.type.list_size} values per row, "
            f"but the manifest says {width_key}={width}"
        )
    stored = (field.metadata or {}).get(DTYPE_KEY, b"").decode()
    if field.type.value_type != ARROW_TYPES[dtype] or (stored and stored != dtype):
        found = stored or ARROW_NAMES.get(str(field.type.value_type), str(field.type.value_type))
        raise DatasetError(
            f"shard {name}: column {column!r} stores {found} values, but the manifest says "
            f"dtype={dtype} ({wanted}); fix the manifest's dtype or rewrite the shard"
        )


def _numpy_view(data: bytearray, array: pa.Array) -> np.ndarray:
    """A primitive Arrow array as numpy, viewing `data` when its values lie there (else a copy)."""
    np_dtype = np.dtype(array.type.to_pandas_dtype())
    if len(array) == 0:
        return np.empty(0, dtype=np_dtype)
    base = np.frombuffer(data, dtype=np.uint8).ctypes.data
    start = array.buffers()[1].address + array.offset * np_dtype.itemsize - base
    if 0 <= start and start + len(array) * np_dtype.itemsize <= len(data):
        return np.frombuffer(data, dtype=np_dtype, count=len(array), offset=start)
    # compressed or multi-batch shards are decoded into Arrow's own memory
    return array.to_numpy(zero_copy_only=False).copy()
