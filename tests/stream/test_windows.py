"""Windows: read once, shuffled in stream order by the readers, handed out as pieces under a budget."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from dictsweep.errors import DatasetError
from dictsweep.store import fs
from dictsweep.store.dataset import ActivationDataset
from dictsweep.store.synth import SynthConfig, synth_dataset
from dictsweep.stream.actors import (
    ReaderMemory,
    WindowReader,
    as_numpy,
    as_words,
    batch_views,
    read_window,
    stream_orders,
    whole_batch,
)
from dictsweep.stream.windows import WindowStream

BATCH_ROWS = 96  # not a divisor of the shard rows: batches span shards, windows and epochs


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def dataset(request, tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("windows") / request.param)
    synth_dataset(
        uri,
        SynthConfig(
            d_model=8, n_features=16, active=2, rows=1000, eval_rows=300, shard_rows=200, dtype=request.param, seed=5
        ),
    )
    return ActivationDataset.open(uri)


def expected_batch(dataset, order, split, batch):
    """Batch rows reconstructed from whole shards and the order alone: [batch_rows, d_model]."""
    parts = []
    for piece in order.pieces(batch):
        rows = np.concatenate([as_numpy(dataset.read_shard(shard, split)) for shard in piece.window.shards])
        permutation = order.row_permutation(piece.window)
        parts.append((rows if permutation is None else rows[permutation])[piece.start : piece.stop])
    return np.concatenate(parts)


@pytest.mark.parametrize("threads", [0, 3])
def test_a_window_is_its_shards_rows_in_stream_order(dataset, threads):
    order = stream_orders(dataset, BATCH_ROWS, 3, seed=7)["train"]
    pool = ThreadPoolExecutor(threads) if threads else None
    memory = ReaderMemory() if threads else None  # buffers reused window after window
    for window in order.windows(1):  # the last window of an epoch holds the 2 shards left over
        rows, read = read_window(dataset, order, window, "train", pool, memory)
        shards = np.concatenate([as_numpy(dataset.read_shard(shard)) for shard in window.shards])
        assert rows.shape == (window.rows, 8) and rows.dtype == shards.dtype
        assert np.array_equal(rows, shards[order.row_permutation(window)])
        assert not np.array_equal(rows, shards)  # shuffled across the window
        assert read == sum(dataset.shards("train")[shard].bytes for shard in window.shards)
    if memory is not None:
        assert memory.shards == {}  # a local dataset's shards are mapped, never read into buffers


@pytest.mark.parametrize(
    "dtype, d_model, word",
    [(np.float16, 3, 2), (np.float16, 6, 4), (np.float16, 8, 8), (np.float32, 3, 4), (np.int16, 1, 2)],
)
def test_rows_move_as_the_widest_words_that_tile_them(dtype, d_model, word):
    rows = np.arange(10 * d_model).astype(dtype).reshape(10, d_model)  # [10, d_model]
    words = as_words(rows)
    assert words.itemsize == word and words.shape == (10, d_model * rows.itemsize // word)
    out = np.zeros_like(rows)
    as_words(out)[[9, 0, 5, 1, 2, 3, 4, 6, 7, 8]] = words  # a scatter of whole rows, bits untouched
    assert np.array_equal(out[[9, 0, 5, 1, 2, 3, 4, 6, 7, 8]], rows)


def test_a_corrupt_shard_fails_its_window_by_name(tmp_path):
    uri = str(tmp_path / "bad")
    synth_dataset(uri, SynthConfig(d_model=8, n_features=16, active=2, rows=400, eval_rows=0, shard_rows=200))
    dataset = ActivationDataset.open(uri)
    path = fs.join(uri, dataset.shards()[1].path)
    data = bytearray(fs.read_bytes(path))
    data[-100] ^= 0xFF
    fs.write_bytes(path, bytes(data))
    order = stream_orders(dataset, 100, 2, seed=0)["train"]
    memory = ReaderMemory()
    with pytest.raises(DatasetError, match="train/00001.arrow.*blake3 mismatch"):
        read_window(dataset, order, order.window(0), "train", memory=memory)
    fs.write_bytes(path, bytes(data[:-10]))  # truncated: read into the reused buffer all the same
    with pytest.raises(
        DatasetError, match=rf"train/00001.arrow.*{len(data) - 10} bytes, the manifest says {len(data)}"
    ):
        read_window(dataset, order, order.window(0), "train", memory=memory)


def test_pieces_cut_every_batch_from_shared_windows_under_a_budget(dataset, ray_local):
    orders = stream_orders(dataset, BATCH_ROWS, 2, seed=3)
    order = orders["train"]  # 5 shards of 200 rows: windows of 400, 400, 200 rows per epoch
    readers = [WindowReader.remote(dataset.uri, BATCH_ROWS, 2, 3) for _ in range(2)]
    batches = 2 * order.epoch_rows // BATCH_ROWS  # two epochs
    stream = WindowStream(readers, order, "train", batches, budget=2)
    stream.advance(0)
    assert sorted(stream.held) == [0, 1]  # the readers work ahead up to the budget, no further
    beyond = next(batch for batch in range(batches) if order.span(batch)[1] >= 2)
    assert stream.pieces(beyond) is None  # backpressure: its window would exceed the budget
    for batch in range(batches):
        pieces = stream.pieces(batch)
        assert pieces is not None
        got = np.concatenate(batch_views(pieces))
        assert np.array_equal(got, expected_batch(dataset, order, "train", batch)), batch
        stream.advance(batch)
        first, last = order.span(batch)
        assert min(stream.held) == first and len(stream.held) <= max(2, last - first + 1)
    assert stream.requested == 2 * order.windows_per_epoch  # each window read once
    stream.advance(batches)
    assert not stream.held  # past the end: nothing held, nothing read ahead
    # a consumer restarted from a checkpoint goes back: its windows are read again, the rest dropped
    stream.advance(3)
    assert np.array_equal(np.concatenate(batch_views(stream.pieces(3))), expected_batch(dataset, order, "train", 3))
    assert len(stream.held) <= 2
    reads = ray_local.get([reader.stats.remote() for reader in readers])
    assert sum(stats["bytes_read"] for stats in reads) > 0


def test_eval_windows_are_shards_in_order(dataset, ray_local):
    order = stream_orders(dataset, BATCH_ROWS, 2, seed=3)["eval"]
    stream = WindowStream([WindowReader.remote(dataset.uri, BATCH_ROWS, 2, 3)], order, "eval", 3, budget=1)
    eval_rows = np.concatenate([as_numpy(dataset.read_shard(index, "eval")) for index in range(2)])
    for batch in range(3):
        pieces = stream.pieces(batch)
        assert np.array_equal(whole_batch(pieces), eval_rows[batch * BATCH_ROWS : (batch + 1) * BATCH_ROWS])
        stream.advance(batch + 1)
