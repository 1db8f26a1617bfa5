"""A data-parallel worker's share of a stream: its slice of every batch, read from the shards."""

from __future__ import annotations

import torch
from torch import Tensor

from dictsweep.store.dataset import ActivationDataset
from dictsweep.stream.order import StreamOrder


class WorkerSlices:
    """This worker's rows [w * B/G, (w + 1) * B/G) of batch j of one split's stream, read from the shards."""

    def __init__(self, dataset: ActivationDataset, split: str, order: StreamOrder, rank: int, workers: int):
        self.dataset, self.split, self.order = dataset, split, order
        self.rows = order.batch_rows // workers
        self.start = rank * self.rows  # within each batch
        self.windows: dict[tuple[int, int], Tensor] = {}  # (epoch, index) -> the window's shuffled rows

    def batch(self, index: int) -> Tensor:
        """`[B/G, d_model]` rows in the stored dtype."""
        parts, offset = [], 0  # offset: where the piece starts within the batch
        stop = self.start + self.rows
        for piece in self.order.pieces(index):
            length = piece.stop - piece.start
            begin, end = max(self.start, offset), min(stop, offset + length)
            if begin < end:
                rows = self.window_rows(piece.window)
                parts.append(rows[piece.start + begin - offset : piece.start + end - offset])
            offset += length
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def window_rows(self, window) -> Tensor:
        key = (window.epoch, window.index)
        if key not in self.windows:
            rows = torch.cat([self.dataset.read_shard(shard, self.split) for shard in window.shards])
            permutation = self.order.row_permutation(window)
            self.windows = {key: rows if permutation is None else rows[torch.from_numpy(permutation)]}
        return self.windows[key]
