"""The stream order is a pure function of (seed, epoch) that covers every row once per epoch."""

import numpy as np
import pytest

from dictsweep.stream.order import StreamOrder

SHARDS = [100, 100, 100, 100, 100, 37]


def rows_of(order, batch):
    """Global (shard, row) ids of a batch, reconstructed from the order alone."""
    ids = []
    for piece in order.pieces(batch):
        window_ids = np.concatenate([[(shard, row) for row in range(SHARDS[shard])] for shard in piece.window.shards])
        permutation = order.row_permutation(piece.window)
        if permutation is not None:
            window_ids = window_ids[permutation]
        ids.extend(map(tuple, window_ids[piece.start : piece.stop]))
    return ids


def test_every_row_once_per_epoch_and_batches_span_windows():
    order = StreamOrder(SHARDS, batch_rows=64, shuffle_shards=2, seed=3)
    epoch_rows = sum(SHARDS)
    seen = []
    for batch in range(epoch_rows // 64):
        ids = rows_of(order, batch)
        assert len(ids) == 64
        seen.extend(ids)
    assert len(set(seen)) == len(seen)
    # the next batch spans the end of epoch 0 and the start of epoch 1
    spanning = order.pieces(epoch_rows // 64)
    assert {piece.window.epoch for piece in spanning} == {0, 1}
    assert sum(piece.stop - piece.start for piece in spanning) == 64


def test_order_is_a_pure_function_of_seed_and_epoch():
    first = StreamOrder(SHARDS, 64, 2, seed=3)
    again = StreamOrder(SHARDS, 64, 2, seed=3)
    other = StreamOrder(SHARDS, 64, 2, seed=4)
    assert rows_of(first, 5) == rows_of(again, 5)
    assert rows_of(first, 5) != rows_of(other, 5)
    assert first.windows(0) != first.windows(1)  # each epoch reshuffles
    # rows of a window are mixed across its shards
    shards_in_batch = {shard for shard, _ in rows_of(first, 0)}
    assert len(shards_in_batch) == 2


def test_unshuffled_order_for_eval():
    order = StreamOrder(SHARDS, 50, 1, seed=0, shuffle=False)
    assert rows_of(order, 0) == [(0, row) for row in range(50)]
    assert rows_of(order, 3)[-1] == (1, 99)


def test_too_small_dataset():
    with pytest.raises(ValueError, match="fewer than one batch"):
        StreamOrder([10], 64, 1, 0)
