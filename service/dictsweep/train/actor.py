"""The trainer actor: a thin Ray shell around `DeviceLoop` (train/device.py), which owns one device
and the ensembles placed on it and does all the work with torch alone.

The driver hands it batch j either as one array (Ray resolves the reference to the node's
shared-memory copy) or as pieces `[(window, start, stop), ...]` whose window references stay
unresolved until here: the shell resolves them with `ray.get` (zero-copy read-only views) and
passes numpy views on; `upcoming` (batch j + 1, same form) is resolved by the loop's prefetching
thread while batch j computes.
"""

from __future__ import annotations

import numpy as np
import torch

from dictsweep.config import TrainConfig
from dictsweep.train.device import DeviceLoop, EnsembleSpec, Pieces, batch_tensor

__all__ = ["EnsembleSpec", "Trainer", "batch_tensor", "resolve"]


def resolve(pieces) -> Pieces:
    """A batch as the device loop takes it: a whole array as is; `(window, start, stop)` pieces as a
    function that gets each window from the object store (zero-copy) and slices it."""
    if pieces is None or isinstance(pieces, np.ndarray):
        return pieces

    def views() -> list[np.ndarray]:
        import ray

        windows = ray.get([window for window, _, _ in pieces])
        return [window[start:stop] for window, (_, start, stop) in zip(windows, pieces)]

    return views


class Trainer:
    """Every ensemble of one device (run as a Ray actor: `ray.remote(Trainer)`).

    `checkpoint_uri` names this trainer's checkpoint file; it is loaded at start when present.
    """

    def __init__(
        self,
        ensembles: list[EnsembleSpec],
        d_model: int,
        config: TrainConfig,
        total_steps: int,
        input_scale: float,
        data_dtype: str,
        device: str = "cpu",
        torch_threads: int = 0,
        checkpoint_uri: str | None = None,
        target: tuple[int, float] | None = None,
    ):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.loop = DeviceLoop(
            ensembles, d_model, config, total_steps, input_scale, data_dtype, device, checkpoint_uri, target
        )

    def status(self) -> dict:
        """Where this trainer is: steps done, restored from a checkpoint, node, process, memory, and
        the curve points of its checkpoint's step (for a driver that may not have stored them)."""
        import os

        import ray

        device = self.loop.device
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        return {
            "position": self.loop.position,
            "restored": self.loop.restored,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "peak_device_bytes": peak,
            "replay": self.loop.replay,
        }

    def step(self, index: int, pieces, upcoming=None) -> list[dict]:
        """Train every ensemble on batch `index`; at logging points, the metrics of every SAE."""
        return self.loop.step(index, resolve(pieces), resolve(upcoming))

    def eval_step(self, index: int, pieces, upcoming=None) -> None:
        """Accumulate final metrics on held-out batch `index` (index 0 starts afresh)."""
        self.loop.eval_step(index, resolve(pieces), resolve(upcoming))

    def data_wait(self) -> dict:
        return self.loop.data_wait()

    def usage(self) -> dict:
        """Data wait, GPU busy time and utilisation, and the ensembles with their kernels (`DeviceLoop.usage`)."""
        return self.loop.usage()

    def finish(self, storage_uri: str, metadata: dict[str, dict], ground_truth: np.ndarray | None) -> dict:
        return self.loop.finish(storage_uri, metadata, ground_truth)
