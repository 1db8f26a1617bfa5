"""The driver's side of the stream: one broadcaster per node and the batch references it hands out."""

from __future__ import annotations

from dictsweep.config import SweepSpec
from dictsweep.store.dataset import ActivationDataset


class Streams:
    """One broadcaster per node and the batch references handed out, kept while a trainer may need them."""

    def __init__(self, spec: SweepSpec, dataset: ActivationDataset):
        self.spec, self.dataset = spec, dataset
        self.broadcasters: dict[str, object] = {}
        self.refs: dict[tuple, object] = {}  # (node, split, index) -> batch reference

    def batch(self, node: str, split: str, index: int):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from dictsweep.stream.actors import Broadcaster

        if node not in self.broadcasters:
            stream = self.spec.stream
            self.broadcasters[node] = Broadcaster.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                max_restarts=-1, max_task_retries=-1).remote(
                self.dataset.uri, self.spec.train.batch_rows, stream.shuffle_shards, stream.seed, stream.readers_per_node)
        key = (node, split, index)
        if key not in self.refs:
            self.refs[key] = self.broadcasters[node].batch.remote(index, split)
        return self.refs[key]

    def forget(self, slowest_task: int) -> None:
        """Drop references to train batches every trainer has passed (the store can free them)."""
        for key in [k for k in self.refs if k[1] == "train" and k[2] < slowest_task - 1]:
            del self.refs[key]

    def stats(self) -> list[dict]:
        import ray

        return ray.get([b.stats.remote() for b in self.broadcasters.values()])

    def close(self) -> None:
        import ray

        for broadcaster in self.broadcasters.values():
            ray.kill(broadcaster, no_restart=True)
        self.refs.clear()

