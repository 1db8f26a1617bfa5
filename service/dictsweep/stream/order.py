"""The order in which a sweep sees its rows: a pure function of (seed, epoch).

Each epoch permutes the shards, cuts the permutation into windows of `shuffle_shards`
shards, and permutes the rows of each window (the shuffle buffer). The stream is the epochs one
after another; batch j is rows [j * B, (j + 1) * B) of it. Anyone can compute where batch j comes
from, so a restarted trainer or reader resumes at its exact position.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class Window:
    """One shuffle buffer: some shards, read together and mixed."""

    epoch: int
    index: int
    shards: tuple[int, ...]  # shard indices, in the order their rows are concatenated
    rows: int


@dataclass(frozen=True)
class Piece:
    """A run of rows of one window that belongs to a batch: window rows [start, stop)."""

    window: Window
    start: int
    stop: int


class StreamOrder:
    """Where every batch of the stream comes from, for a list of shard row counts."""

    def __init__(self, shard_rows: list[int], batch_rows: int, shuffle_shards: int, seed: int, shuffle: bool = True):
        self.shard_rows, self.batch_rows = list(shard_rows), batch_rows
        self.shuffle_shards, self.seed, self.shuffle = shuffle_shards, seed, shuffle
        self.epoch_rows = sum(self.shard_rows)
        if self.epoch_rows < batch_rows:
            raise ValueError(f"the dataset has {self.epoch_rows} rows, fewer than one batch of {batch_rows}")

    @lru_cache(maxsize=4)
    def windows(self, epoch: int) -> tuple[Window, ...]:
        """The windows of one epoch, in stream order."""
        count = len(self.shard_rows)
        order = np.random.default_rng([self.seed, epoch]).permutation(count) if self.shuffle else np.arange(count)
        groups = [
            tuple(int(s) for s in order[i : i + self.shuffle_shards]) for i in range(0, len(order), self.shuffle_shards)
        ]
        return tuple(
            Window(epoch, index, group, sum(self.shard_rows[s] for s in group)) for index, group in enumerate(groups)
        )

    @property
    def windows_per_epoch(self) -> int:
        return -(-len(self.shard_rows) // self.shuffle_shards)

    def window(self, sequence: int) -> Window:
        """The window at position `sequence` of the whole stream (epoch after epoch)."""
        epoch, index = divmod(sequence, self.windows_per_epoch)
        return self.windows(epoch)[index]

    def sequence(self, window: Window) -> int:
        """A window's position in the whole stream: windows are read and released in this order."""
        return window.epoch * self.windows_per_epoch + window.index

    def span(self, batch: int) -> tuple[int, int]:
        """The first and last window (stream positions) that batch `batch` takes rows from."""
        pieces = self.pieces(batch)
        return self.sequence(pieces[0].window), self.sequence(pieces[-1].window)

    def row_permutation(self, window: Window) -> np.ndarray | None:
        """The shuffle of one window's concatenated rows (None: keep them in order)."""
        if not self.shuffle:
            return None
        return np.random.default_rng([self.seed, window.epoch, window.index, 1]).permutation(window.rows)

    def pieces(self, batch: int) -> list[Piece]:
        """The window row ranges that make up batch `batch`, in order."""
        start, stop = batch * self.batch_rows, (batch + 1) * self.batch_rows
        pieces = []
        epoch = start // self.epoch_rows
        position = epoch * self.epoch_rows
        while position < stop:
            for window in self.windows(epoch):
                begin, end = max(start, position), min(stop, position + window.rows)
                if begin < end:
                    pieces.append(Piece(window, begin - position, end - position))
                position += window.rows
                if position >= stop:
                    break
            epoch += 1
        return pieces
