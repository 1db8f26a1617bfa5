"""Ray actors that move activations from storage to trainers, read once per node.

Readers (CPU) fetch and decode shards concurrently; one broadcaster per node mixes the rows of a
window of shards (the shuffle buffer) and returns fixed-size batches as numpy arrays. Returned
arrays live in the node's shared-memory object store, so every trainer on the node reads the same
batch without a copy. bfloat16 travels as its 16-bit pattern (numpy has no bfloat16).
"""

from __future__ import annotations

import time

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dictsweep.store.dataset import ActivationDataset
from dictsweep.stream.order import StreamOrder, Window


def as_numpy(tensor) -> np.ndarray:
    """A shard tensor as numpy without a copy (bfloat16 as uint16 bits)."""
    import torch

    return tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


@ray.remote(num_cpus=0.25)
class ShardReader:
    """Fetches, verifies and decodes shards of one dataset."""

    def __init__(self, uri: str):
        self.dataset = ActivationDataset.open(uri)
        self.bytes_read = 0
        self.seconds = 0.0

    def read(self, index: int, split: str = "train") -> np.ndarray:
        """Rows `[rows, d_model]` of shard `index` (checked against the manifest)."""
        start = time.perf_counter()
        data = self.dataset.read_shard_bytes(index, split)
        self.bytes_read += len(data)
        rows = as_numpy(self.dataset.decode(data, index, split))
        self.seconds += time.perf_counter() - start
        return rows

    def stats(self) -> dict:
        return {"bytes_read": self.bytes_read, "read_seconds": self.seconds}


@ray.remote(num_cpus=0.25)
class Broadcaster:
    """Produces batch j of the train or eval stream for every trainer on its node."""

    def __init__(self, uri: str, batch_rows: int, shuffle_shards: int, seed: int, readers: int):
        dataset = ActivationDataset.open(uri)
        self.orders = {
            "train": StreamOrder([s.rows for s in dataset.shards("train")], batch_rows, shuffle_shards, seed),
            "eval": StreamOrder([s.rows for s in dataset.shards("eval")], batch_rows, 1, seed, shuffle=False)
            if dataset.n_eval_rows >= batch_rows else None,
        }
        node = ray.get_runtime_context().get_node_id()
        here = NodeAffinitySchedulingStrategy(node, soft=False)
        # a reader that dies is restarted and its read retried: reads are idempotent
        self.readers = [ShardReader.options(scheduling_strategy=here, max_restarts=-1, max_task_retries=-1).remote(uri)
                        for _ in range(readers)]
        self.next_reader = 0
        self.pending: dict[tuple, list] = {}  # window key -> shard refs being read
        self.cache: dict[tuple, np.ndarray] = {}  # window key -> its shuffled rows

    def batch(self, index: int, split: str = "train") -> np.ndarray:
        """Batch `index` of a split, `[batch_rows, d_model]` in the stored dtype."""
        order = self.orders[split]
        if order is None:
            raise ValueError(f"the dataset's {split} split has fewer rows than one batch")
        pieces = order.pieces(index)
        self._prefetch(split, order, self._following(order, pieces[-1].window))
        parts = [self._rows(split, order, piece.window)[piece.start:piece.stop] for piece in pieces]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def stats(self) -> dict:
        """Bytes read from storage by this node's readers, and time spent reading."""
        totals = {"bytes_read": 0, "read_seconds": 0.0}
        for stats in ray.get([reader.stats.remote() for reader in self.readers]):
            for key in totals:
                totals[key] += stats[key]
        return totals

    # -- windows ---------------------------------------------------------------------------------
    @staticmethod
    def _following(order: StreamOrder, window: Window) -> Window:
        windows = order.windows(window.epoch)
        return windows[window.index + 1] if window.index + 1 < len(windows) else order.windows(window.epoch + 1)[0]

    def _prefetch(self, split: str, order: StreamOrder, window: Window) -> None:
        key = (split, window.epoch, window.index)
        if key in self.cache or key in self.pending:
            return
        refs = []
        for shard in window.shards:
            refs.append(self.readers[self.next_reader].read.remote(shard, split))
            self.next_reader = (self.next_reader + 1) % len(self.readers)
        self.pending[key] = refs

    def _rows(self, split: str, order: StreamOrder, window: Window) -> np.ndarray:
        key = (split, window.epoch, window.index)
        if key not in self.cache:
            self._prefetch(split, order, window)
            rows = np.concatenate(ray.get(self.pending.pop(key)))
            permutation = order.row_permutation(window)
            self.cache[key] = rows if permutation is None else rows[permutation]
            for old in [k for k in self.cache if k[0] == split and k != key][:-1]:
                del self.cache[old]  # keep this window and the one before it
        return self.cache[key]
