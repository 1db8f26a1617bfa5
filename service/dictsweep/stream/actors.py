"""Ray actors that move activations from storage to trainers, read once per node.

A reader produces a whole window (the shuffle buffer: `shuffle_shards` shards) at a time: it
fetches the window's shards concurrently, verifies and decodes each straight from its fetched
bytes, and scatters their rows into the window's stream order in one pass. The window it returns
lives once in the node's shared-memory object store; a batch is a list of `(window, start, stop)`
pieces (`BatchPieces`), so every trainer on the node cuts its batches from the same bytes without
a copy. bfloat16 travels as its 16-bit pattern (numpy has no bfloat16). For transcoders (`target`)
a window row is the shard row's `act` then its `target`, `[d_model + d_target]` wide: every trainer
still sees the same rows in the same order, and a window is as large as its shards' float columns.
"""

from __future__ import annotations

import resource
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import ray

from dictsweep.store import fs
from dictsweep.store.dataset import ActivationDataset
from dictsweep.stream.order import StreamOrder, Window

NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.int16}  # as stored in a window
BatchPieces = list  # [(window ObjectRef, start, stop)]: batch = the rows window[start:stop], piece after piece


def as_numpy(tensor) -> np.ndarray:
    """A shard tensor as numpy without a copy (bfloat16 as int16 bits)."""
    import torch

    return tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


def as_words(rows: np.ndarray) -> np.ndarray:
    """Rows `[n, d]` as rows of the widest integer words that tile them (same bytes): numpy moves
    a row of eight-byte words faster than one of two-byte floats."""
    row_bytes = rows.shape[1] * rows.itemsize
    word = next(size for size in (8, 4, 2, 1) if row_bytes % size == 0)
    return rows.view(np.dtype(f"u{word}"))


def stream_orders(
    dataset: ActivationDataset, batch_rows: int, shuffle_shards: int, seed: int
) -> dict[str, StreamOrder | None]:
    """The train order (shuffled windows) and the eval order (shards in order; None when the eval
    split has fewer rows than one batch) that every reader and the driver share."""
    return {
        "train": StreamOrder([s.rows for s in dataset.shards("train")], batch_rows, shuffle_shards, seed),
        "eval": StreamOrder([s.rows for s in dataset.shards("eval")], batch_rows, 1, seed, shuffle=False)
        if dataset.n_eval_rows >= batch_rows
        else None,
    }


class ReaderMemory:
    """The buffers a reader fills window after window: touching fresh pages costs more than
    copying into warm ones (a window and its shards' bytes are hundreds of MB). Shards of a local
    dataset are mapped, not read, so they need no buffers."""

    def __init__(self):
        self.window = np.empty(0, np.uint8)
        self.shards: dict[int, bytearray] = {}  # position in the window -> bytes buffer

    def reserve(self, dataset: ActivationDataset, shuffle_shards: int, width: int | None = None) -> None:
        """Take (and touch) the largest buffers the dataset's windows (rows `width` wide, default d_model)
        need, before the first window."""
        infos = dataset.shards("train") + dataset.shards("eval")
        largest = sorted((info.rows for info in infos), reverse=True)[:shuffle_shards]
        self.window_rows(sum(largest), width or dataset.d_model, NUMPY_DTYPES[dataset.dtype]).fill(0)
        if not fs.is_local(dataset.uri):
            for position in range(min(shuffle_shards, len(infos))):
                self.shard_bytes(position, max(info.bytes for info in infos))

    def window_rows(self, rows: int, d_model: int, dtype: np.dtype) -> np.ndarray:
        size = rows * d_model * np.dtype(dtype).itemsize
        if self.window.nbytes < size:
            self.window = np.empty(size, np.uint8)
        return self.window[:size].view(dtype).reshape(rows, d_model)

    def shard_bytes(self, position: int, size: int) -> bytearray:
        if len(self.shards.get(position, b"")) < size:
            self.shards[position] = bytearray(size)
        return self.shards[position]


def read_window(
    dataset: ActivationDataset,
    order: StreamOrder,
    window: Window,
    split: str,
    pool: ThreadPoolExecutor | None = None,
    memory: ReaderMemory | None = None,
    target: bool = False,
) -> tuple[np.ndarray, int]:
    """A window's rows in stream order `[window.rows, d_model]` (stored dtype) and the bytes read;
    with `target`, `[window.rows, d_model + d_target]`: each row's act, then its target.

    Each shard is fetched (a local one mapped, not copied), checked (size, checksum, rows, finite
    values) and decoded as a view of its bytes, then scattered to its rows' places in the window:
    one copy per row. With `pool`,
    the shards of the window are handled concurrently (hashing, reads and numpy scatters release
    the GIL). With `memory`, the result lives in its buffers until the next call.
    """
    shards, local = dataset.shards(split), fs.is_local(dataset.uri)
    starts = np.cumsum([0] + [shards[shard].rows for shard in window.shards])
    permutation = order.row_permutation(window)

    def fetch(position: int) -> tuple[list[np.ndarray], int]:
        """The shard's float columns (act, and target with `target`), views of its bytes, and the bytes read."""
        shard = window.shards[position]
        buffer = memory.shard_bytes(position, shards[shard].bytes) if memory is not None and not local else None
        data = dataset.read_shard_bytes(shard, split, buffer, mapped=True)  # local: the page cache's bytes
        acts, extra = dataset.decode(data, shard, split, columns=True)  # [shard rows, d_model], a view of `data`
        return [as_numpy(acts)] + ([as_numpy(extra["target"])] if target else []), len(data)

    if permutation is None and len(window.shards) == 1:
        parts, read = fetch(0)
        return (parts[0] if len(parts) == 1 else np.concatenate(parts, 1)), read  # one shard alone: no copy of act
    place = np.arange(window.rows) if permutation is None else np.empty_like(permutation)
    if permutation is not None:
        place[permutation] = np.arange(window.rows)  # where each row of the concatenated shards goes
    dtype, width = NUMPY_DTYPES[dataset.dtype], dataset.d_model + (dataset.d_target if target else 0)
    # [window rows, d_model (+ d_target)]
    rows_out = (
        memory.window_rows(window.rows, width, dtype) if memory is not None else np.empty((window.rows, width), dtype)
    )

    def fill(position: int) -> int:
        parts, read = fetch(position)
        column = 0
        for part in parts:  # act, then target: each into its columns of the window
            columns = rows_out[:, column : column + part.shape[1]]
            as_words(columns)[place[starts[position] : starts[position + 1]]] = as_words(part)
            column += part.shape[1]
        return read

    positions = range(len(window.shards))
    read = sum(pool.map(fill, positions) if pool is not None else map(fill, positions))
    return rows_out, read


def batch_views(pieces: BatchPieces) -> list[np.ndarray]:
    """The read-only views of a batch's rows, piece after piece (resolves the window references)."""
    windows = ray.get([window for window, _, _ in pieces])
    return [rows[start:stop] for rows, (_, start, stop) in zip(windows, pieces)]


def whole_batch(pieces: BatchPieces) -> np.ndarray:
    """A batch as one array `[batch_rows, d_model]`: a read-only view when it is one piece, else a copy."""
    views = batch_views(pieces)
    return views[0] if len(views) == 1 else np.concatenate(views)


def peak_rss_mb() -> float:
    """This process's peak resident memory (shared object-store pages it touched included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# no CPU of its own: a node's readers must start wherever its trainers landed, and trainers whose
# bundles take every CPU of their node would otherwise wait for ever for their first window
@ray.remote(num_cpus=0)
class WindowReader:
    """Produces whole windows of one dataset's stream, each read, checked and shuffled once."""

    def __init__(self, uri: str, batch_rows: int, shuffle_shards: int, seed: int, target: bool = False):
        self.dataset = ActivationDataset.open(uri)
        self.orders = stream_orders(self.dataset, batch_rows, shuffle_shards, seed)
        self.pool = ThreadPoolExecutor(shuffle_shards)
        self.target = target  # windows carry each row's target after its act (transcoders)
        self.memory = ReaderMemory()  # a returned window is copied into the object store: reuse is safe
        self.memory.reserve(self.dataset, shuffle_shards, self.dataset.d_model + self.dataset.d_target * target)
        self.bytes_read = 0
        self.shard_reads: dict[str, int] = {}  # "split/shard" -> times read (once per epoch per node)
        pa.float16().to_pandas_dtype()  # decoding's dtype lookup imports pandas: now, not in the first window
        self.seconds = 0.0

    def window(self, split: str, sequence: int) -> np.ndarray:
        """The rows `[window rows, d_model]` of window `sequence` of a split's stream, in stream order."""
        start = time.perf_counter()
        order = self.orders[split]
        window = order.window(sequence)
        rows, read = read_window(self.dataset, order, window, split, self.pool, self.memory, self.target)
        self.bytes_read += read
        for shard in window.shards:
            self.shard_reads[f"{split}/{shard}"] = self.shard_reads.get(f"{split}/{shard}", 0) + 1
        self.seconds += time.perf_counter() - start
        return rows

    def stats(self) -> dict:
        return {
            "node": ray.get_runtime_context().get_node_id(),
            "bytes_read": self.bytes_read,
            "shard_reads": dict(self.shard_reads),
            "read_seconds": self.seconds,
            "peak_rss_mb": peak_rss_mb(),
            "cpu_seconds": time.process_time(),
            # pages that came from the disk, not the page cache (a dataset larger than the cache)
            "major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt,
        }
