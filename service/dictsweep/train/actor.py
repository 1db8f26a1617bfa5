"""The trainer actor: owns one device and the ensembles placed on it, and steps them all on each
shared batch. The driver hands it batch j as an object-store reference; Ray resolves it to the
node's shared-memory copy, so every trainer on a node reads the same bytes.

It checkpoints to the sweep's storage (weights, optimizer, step, stream position, RNG, kernel
choice), so when Ray restarts it after a crash it continues exactly where the checkpoint was; a
member whose weights stop being finite is frozen and reported failed while its neighbours go on.
"""

from __future__ import annotations

import io
import json
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from dictsweep.config import TrainConfig
from dictsweep.sae.ensemble import Member, build_ensemble
from dictsweep.store import fs
from dictsweep.train.evaluate import Evaluator, export_member
from dictsweep.train.kernels import choose_kernel
from dictsweep.train.loop import DeviceTrainer, EnsembleTrainer


@dataclass(frozen=True)
class EnsembleSpec:
    """One ensemble to build: an architecture, a width, and its members with their point names."""

    architecture: str
    n_latents: int
    members: tuple[Member, ...]
    names: tuple[str, ...]


def batch_tensor(batch: np.ndarray, data_dtype: str) -> torch.Tensor:
    """A broadcast batch as a tensor without a copy (it is read-only shared memory: never written)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the array is read-only
        tensor = torch.from_numpy(batch)
    return tensor.view(torch.bfloat16) if data_dtype == "bfloat16" else tensor


class Trainer:
    """Every ensemble of one device (run as a Ray actor: `ray.remote(Trainer)`).

    `checkpoint_uri` names this trainer's checkpoint file; it is loaded at start when present.
    """

    def __init__(self, ensembles: list[EnsembleSpec], d_model: int, config: TrainConfig, total_steps: int,
                 input_scale: float, data_dtype: str, device: str = "cpu", torch_threads: int = 0,
                 checkpoint_uri: str | None = None):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = torch.device("cuda" if device == "cuda" else "cpu")
        self.config, self.data_dtype, self.specs = config, data_dtype, ensembles
        self.total_steps, self.checkpoint_uri = total_steps, checkpoint_uri
        kernels = self.kernels(d_model)
        self.trainers = []
        for spec, kernel in zip(ensembles, kernels):
            ensemble = build_ensemble(spec.architecture, d_model, spec.n_latents, list(spec.members), kernel=kernel,
                                      decode=config.decode)
            ensemble.input_scale.fill_(input_scale)
            self.trainers.append(EnsembleTrainer(ensemble, config, total_steps, self.device))
        self.device_trainer = DeviceTrainer(self.trainers, self.device)
        self.evaluators: list[Evaluator] | None = None
        self.position = 0  # steps done = index of the next batch to train on
        self.failed: dict[str, str] = {}  # point name -> why it was stopped
        self.busy_seconds = self.wait_seconds = 0.0
        self.last_done: float | None = None
        self.restored = self.restore()

    # -- start and checkpoints -------------------------------------------------------------------------
    def kernels(self, d_model: int) -> list[str]:
        """Each ensemble's kernel: as recorded beside the checkpoint, else measured (and recorded)."""
        record = self.checkpoint_uri + ".kernels.json" if self.checkpoint_uri else None
        if record and fs.exists(record):
            return json.loads(fs.read_text(record))
        kernels = []
        for spec in self.specs:
            kernel = self.config.kernel
            if kernel == "auto":
                kernel, _ = choose_kernel(spec.architecture, d_model, spec.n_latents, list(spec.members),
                                          self.config.batch_rows, self.device, total_steps=self.total_steps)
            kernels.append(kernel)
        if record:  # a restarted trainer must compute exactly as before
            fs.write_text(record, json.dumps(kernels))
        return kernels

    def checkpoint(self) -> None:
        """Save everything a restart needs to continue exactly from `position`."""
        state = {"position": self.position, "failed": self.failed, "busy": self.busy_seconds,
                 "wait": self.wait_seconds,
                 "trainers": [(t.state_dict(), t.metrics) for t in self.trainers]}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        fs.write_bytes(self.checkpoint_uri, buffer.getvalue())

    def restore(self) -> bool:
        if not self.checkpoint_uri or not fs.exists(self.checkpoint_uri):
            return False
        state = torch.load(io.BytesIO(fs.read_bytes(self.checkpoint_uri)), map_location=self.device,
                           weights_only=False)
        for trainer, (trainer_state, metrics) in zip(self.trainers, state["trainers"]):
            trainer.load_state_dict(trainer_state)
            trainer.metrics = metrics
        self.position, self.failed = state["position"], state["failed"]
        self.busy_seconds, self.wait_seconds = state["busy"], state["wait"]
        return True

    def status(self) -> dict:
        """Where this trainer is: steps done, restored from a checkpoint, node, process, memory."""
        import os

        import ray

        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return {"position": self.position, "restored": self.restored, "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id(), "peak_device_bytes": peak}

    # -- training ------------------------------------------------------------------------------------
    def step(self, index: int, batch: np.ndarray) -> list[dict]:
        """Train every ensemble on batch `index`; at logging points, the metrics of every SAE."""
        if index < self.position:
            return []  # already trained on (sent again after a restart)
        if index > self.position:
            raise RuntimeError(f"batch {index} arrived while batch {self.position} is due")
        start = time.perf_counter()
        if self.last_done is not None:
            self.wait_seconds += start - self.last_done  # idle: the batch was not there yet
        self.device_trainer.step(batch_tensor(batch, self.data_dtype))
        self.position += 1
        tokens, rows = self.position * self.config.batch_rows, self.config.batch_rows
        records = []
        if self.position == 1 and self.device.type == "cuda":  # the measured step the plan is checked against
            records.append({"peak_device_bytes": torch.cuda.max_memory_allocated(self.device)})
        if tokens // self.config.log_every_tokens != (tokens - rows) // self.config.log_every_tokens:
            self.stop_diverged(tokens)
            records += self.log_records(tokens)
        self.last_done = time.perf_counter()
        self.busy_seconds += self.last_done - start
        every = self.config.checkpoint_every_tokens
        if self.checkpoint_uri and (self.position == self.total_steps
                                    or (every and tokens // every != (tokens - rows) // every)):
            self.checkpoint()
        return records

    @torch.no_grad()
    def stop_diverged(self, tokens: int) -> None:
        """Freeze members whose weights are no longer finite (lr 0, weights 0); neighbours go on."""
        for spec, trainer in zip(self.specs, self.trainers):
            ensemble = trainer.ensemble
            finite = torch.stack([p.flatten(1).isfinite().all(1) for p in ensemble.parameters()]).all(0)
            for member in (~finite).nonzero().flatten().tolist():
                name = spec.names[member]
                if name not in self.failed:
                    self.failed[name] = f"diverged: non-finite weights by {tokens} tokens (lower its lr?)"
                    ensemble.lr[member] = 0.0
                    for param in ensemble.parameters():
                        param[member] = 0.0

    def log_records(self, tokens: int) -> list[dict]:
        """One record per healthy SAE: its name, tokens seen, training metrics since the last record."""
        records = []
        for spec, trainer in zip(self.specs, self.trainers):
            metrics = trainer.log_metrics()
            for member, name in enumerate(spec.names):
                if name not in self.failed:
                    records.append({"name": name, "tokens": tokens,
                                    "metrics": {key: values[member] for key, values in metrics.items()}})
        return records

    def data_wait(self) -> dict:
        """Seconds spent training and waiting for batches, and the waiting fraction."""
        total = self.busy_seconds + self.wait_seconds
        return {"busy_seconds": self.busy_seconds, "wait_seconds": self.wait_seconds,
                "data_wait_fraction": self.wait_seconds / total if total else 0.0}

    # -- evaluation and export -------------------------------------------------------------------------
    def eval_step(self, index: int, batch: np.ndarray) -> None:
        """Accumulate final metrics on held-out batch `index` (index 0 starts afresh)."""
        if index == 0 or self.evaluators is None:
            self.evaluators = [Evaluator(trainer.ensemble) for trainer in self.trainers]
        x = batch_tensor(batch, self.data_dtype).to(self.device)
        for trainer, evaluator in zip(self.trainers, self.evaluators):
            evaluator.add(trainer.scale(x))

    def finish(self, storage_uri: str, metadata: dict[str, dict], ground_truth: np.ndarray | None) -> dict:
        """Eval metrics of every healthy SAE, each exported to `<storage_uri>/dictionaries/<name>/`;
        its feature-density and decoder-norm plot to `<storage_uri>/plots/<name>.png`;
        returns {"finished": {name: {"metrics", "uri", "plot"}}, "failed": {name: why}}."""
        features = torch.from_numpy(ground_truth).to(self.device) if ground_truth is not None else None
        finished = {}
        for spec, trainer, evaluator in zip(self.specs, self.trainers, self.evaluators or [None] * len(self.specs)):
            frequencies = trainer.firing.log10_frequency()
            metrics = evaluator.results() if evaluator else [{} for _ in spec.names]
            for member, name in enumerate(spec.names):
                if name in self.failed:
                    continue
                finished[name] = export_member(trainer.ensemble, member, frequencies[member], metrics[member],
                                               metadata[name], storage_uri, name, features)
        return {"finished": finished, "failed": dict(self.failed)}
