"""The driver's side of the stream: per node, its readers and the windows they hold; batches go out
as window pieces (references and row ranges), never as rows.

Every trainer on a node gets the same window references in the same order (`stream.order`), so a
window is read once per node and every trainer cuts its batches from the same shared memory. At
most `stream.windows_per_node` windows of a split are held per node, from the slowest trainer's on
(`advance`); a trainer that runs that far ahead waits (`pieces` says None) until the slowest moves.
"""

from __future__ import annotations

from dictsweep.config import SweepSpec
from dictsweep.sae.transcoder import trains_transcoders
from dictsweep.store.dataset import ActivationDataset
from dictsweep.stream.actors import BatchPieces, stream_orders
from dictsweep.stream.windows import WindowStream


class Streams:
    """The readers and window streams of every node that has trainers."""

    def __init__(self, spec: SweepSpec, dataset: ActivationDataset, train_batches: int, eval_batches: int):
        self.spec, self.dataset = spec, dataset
        stream = spec.stream
        self.orders = stream_orders(dataset, spec.train.batch_rows, stream.shuffle_shards, stream.seed)
        self.batches = {"train": train_batches, "eval": eval_batches}
        self.readers: dict[str, list] = {}  # node -> its reader actors
        self.windows: dict[tuple[str, str], WindowStream] = {}  # (node, split) -> its windows

    def pieces(self, node: str, split: str, index: int) -> BatchPieces | None:
        """Batch `index` of a split on `node` as window pieces; None while beyond the window budget."""
        return self._windows(node, split).pieces(index)

    def advance(self, node: str, split: str, slowest: int) -> None:
        """The slowest trainer on `node` still needs batch `slowest` of `split`: release what lies
        before it and read ahead from there."""
        if (node, split) in self.windows:
            self.windows[node, split].advance(slowest)

    def stats(self) -> list[dict]:
        """Per node: bytes its readers read, times each shard was read, seconds they spent. A node that
        left the cluster took its readers' counts with it: it is not listed."""
        import ray

        totals = []
        for node, readers in self.readers.items():
            try:
                stats = ray.get([reader.stats.remote() for reader in readers], timeout=60)
            except ray.exceptions.RayError:  # pinned to a node that is gone: dead, unschedulable, or waiting
                continue
            shard_reads: dict[str, int] = {}
            for reader in stats:
                for shard, reads in reader["shard_reads"].items():
                    shard_reads[shard] = shard_reads.get(shard, 0) + reads
            totals.append(
                {
                    "node": node,
                    "bytes_read": sum(s["bytes_read"] for s in stats),
                    "shard_reads": shard_reads,
                    "read_seconds": sum(s["read_seconds"] for s in stats),
                    "peak_rss_mb": max(s["peak_rss_mb"] for s in stats),
                }
            )
        return totals

    def close(self) -> None:
        import ray

        for windows in self.windows.values():
            windows.close()
        for actor in [reader for readers in self.readers.values() for reader in readers]:
            ray.kill(actor, no_restart=True)

    def _windows(self, node: str, split: str) -> WindowStream:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from dictsweep.stream.actors import WindowReader

        stream = self.spec.stream
        if node not in self.readers:
            # a reader that dies is restarted and its window read again: reads are idempotent
            self.readers[node] = [
                WindowReader.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                    max_restarts=-1,
                    max_task_retries=-1,
                ).remote(
                    self.dataset.uri,
                    self.spec.train.batch_rows,
                    stream.shuffle_shards,
                    stream.seed,
                    trains_transcoders(self.spec.grid.architecture),
                )
                for _ in range(stream.readers_per_node)
            ]
        if (node, split) not in self.windows:
            order = self.orders[split]
            if order is None:
                raise ValueError(f"the dataset's {split} split has fewer rows than one batch")
            self.windows[node, split] = WindowStream(
                self.readers[node], order, split, self.batches[split], stream.windows_per_node
            )
        return self.windows[node, split]
