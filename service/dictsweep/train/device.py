"""What a trainer does on its device, with torch alone (no Ray, MLflow or DeepSpeed): tests and a
GPU machine drive `DeviceLoop` directly; the Ray actor (`train/actor.py`) is a thin shell around it.

Batches arrive as pieces of host memory (numpy views of the node's shared windows, or one whole
array). `BatchStager` copies them once into a host buffer (pinned on GPUs) and, on GPUs, onto the
device on a side stream; the next batch is prepared by a thread while the current step computes.
The step itself never waits for the device: the host synchronises at logging points only.

It checkpoints to the sweep's storage (weights, optimizer, step, stream position, RNG, metric sums
not yet logged, failed members; safetensors + JSON, never a pickle), so a restarted trainer
continues exactly where the checkpoint was; a member whose weights stop being finite is frozen and
reported failed while its neighbours go on.
"""

from __future__ import annotations

import json
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from dictsweep.config import TrainConfig
from dictsweep.errors import InputError
from dictsweep.sae.ensemble import ENCODES, Member, build_ensemble
from dictsweep.sae.transcoder import is_transcoder
from dictsweep.store import fs
from dictsweep.train.checkpoint import checkpoint_bytes, read_checkpoint
from dictsweep.train.evaluate import Evaluator, export_member
from dictsweep.train.kernels import KERNELS, choose_path
from dictsweep.train.loop import DeviceTrainer, EnsembleTrainer
from dictsweep.train.usage import DeviceUsage

# a batch: one array, pieces whose rows concatenate to it, or a function giving the pieces (called
# by the prefetching thread, e.g. to resolve object-store references off the step's path)
Pieces = np.ndarray | Sequence[np.ndarray] | Callable[[], Sequence[np.ndarray]]
DECODES = ("auto", "dense", "sparse")


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


class BatchStager:
    """Host pieces to one batch tensor on the device, one batch ahead.

    Two slots alternate: while the step computes on one, the other is filled. On GPUs a slot is a
    pinned host buffer and a device buffer; the copy runs on a side stream, the compute stream
    waits for it on the device (an event, no host wait), and the next copy into a slot waits on the
    device until the step that read it is done. On CPUs a single whole array is used in place
    (zero-copy); pieces are concatenated into the slot's buffer.
    """

    def __init__(self, data_dtype: str, device: torch.device):
        self.data_dtype, self.device = data_dtype, device
        self.cuda = device.type == "cuda"
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="batch-prefetch")
        self.pending: dict[tuple[str, int], Future] = {}
        self.host: list[torch.Tensor | None] = [None, None]  # [B, d_model] each, stored dtype
        self.on_device: list[torch.Tensor | None] = [None, None]  # [B, d_model] each, on the GPU
        self.copied: list = [None, None]  # CUDA events: the slot's host-to-device copy is done
        self.consumed: list = [None, None]  # CUDA events: the step that read the slot is done
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.next_slot = 0

    def prefetch(self, key: tuple[str, int], pieces: Pieces) -> None:
        """Start preparing the batch `key` (split, index) in the background."""
        if key not in self.pending:
            self.pending[key] = self.pool.submit(self.prepare, pieces, self.take_slot())

    def take(self, key: tuple[str, int], pieces: Pieces) -> tuple[torch.Tensor, int | None]:
        """The batch `key` on the device (prefetched, or prepared now) and its slot, for `release`."""
        future = self.pending.pop(key, None)
        batch, slot = future.result() if future is not None else self.prepare(pieces, self.take_slot())
        if self.cuda and slot is not None:
            torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
        return batch, slot

    def release(self, slot: int | None) -> None:
        """After the step that read `slot` is enqueued: the slot may be refilled once it is done."""
        if self.cuda and slot is not None:
            self.consumed[slot] = torch.cuda.current_stream(self.device).record_event()

    def take_slot(self) -> int:
        slot, self.next_slot = self.next_slot, 1 - self.next_slot
        return slot

    def prepare(self, pieces: Pieces, slot: int) -> tuple[torch.Tensor, int | None]:
        pieces = pieces() if callable(pieces) else pieces
        pieces = [pieces] if isinstance(pieces, np.ndarray) else list(pieces)
        if not self.cuda and len(pieces) == 1:
            return batch_tensor(pieces[0], self.data_dtype), None  # zero-copy
        rows, width = sum(len(piece) for piece in pieces), pieces[0].shape[1]
        host = self.host[slot]
        if host is None or host.shape != (rows, width):
            if self.cuda and self.copied[slot] is not None:
                self.copied[slot].synchronize()  # the old buffer's last copy must finish first
            dtype = torch.from_numpy(np.empty(0, pieces[0].dtype)).dtype
            host = self.host[slot] = torch.empty(rows, width, dtype=dtype, pin_memory=self.cuda)  # [B, d_model]
            if self.cuda:
                self.on_device[slot] = torch.empty(rows, width, dtype=dtype, device=self.device)  # [B, d_model]
        elif self.cuda and self.copied[slot] is not None:
            self.copied[slot].synchronize()  # the slot's previous copy (two batches ago) has left the buffer
        np.concatenate(pieces, axis=0, out=host.numpy())  # the one host copy
        if not self.cuda:
            return (host.view(torch.bfloat16) if self.data_dtype == "bfloat16" else host), slot
        with torch.cuda.stream(self.copy_stream):
            if self.consumed[slot] is not None:
                self.copy_stream.wait_event(self.consumed[slot])  # on the device: the step reading it is done
            self.on_device[slot].copy_(host, non_blocking=True)
            self.copied[slot] = self.copy_stream.record_event()
        batch = self.on_device[slot]
        return (batch.view(torch.bfloat16) if self.data_dtype == "bfloat16" else batch), slot

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class DeviceLoop:
    """Every ensemble of one device: build (kernel and decoder measured or as recorded), step,
    log, checkpoint and restore, evaluate and export. `checkpoint_uri` names this trainer's
    checkpoint file; it is loaded at start when present."""

    def __init__(
        self,
        ensembles: list[EnsembleSpec],
        d_model: int,
        config: TrainConfig,
        total_steps: int,
        input_scale: float,
        data_dtype: str,
        device: str = "cpu",
        checkpoint_uri: str | None = None,
        target: tuple[int, float] | None = None,
    ):
        """`target`: (d_target, target_scale) of a transcoder dataset, whose batches are `[B, d_model +
        d_target]` (act, then target); transcoder ensembles read both, the others act alone."""
        self.device = torch.device("cuda" if device == "cuda" else "cpu")
        self.config, self.data_dtype, self.specs = config, data_dtype, ensembles
        self.total_steps, self.checkpoint_uri = total_steps, checkpoint_uri
        d_target, target_scale = target or (0, 1.0)
        self.trainers = []
        self.chosen = self.paths(d_model, d_target)  # each ensemble's (kernel, decode, encode)
        for spec, (kernel, decode, encode) in zip(ensembles, self.chosen):
            options = {"d_out": d_target} if is_transcoder(spec.architecture) else {}
            ensemble = build_ensemble(
                spec.architecture,
                d_model,
                spec.n_latents,
                list(spec.members),
                kernel=kernel,
                decode=decode,
                encode=encode,
                **options,
            )
            ensemble.input_scale.fill_(input_scale)
            if options:
                ensemble.target_scale.fill_(target_scale)
            self.trainers.append(EnsembleTrainer(ensemble, config, total_steps, self.device))
        self.device_trainer = DeviceTrainer(self.trainers, self.device)
        self.stager = BatchStager(data_dtype, self.device)
        self.evaluators: list[Evaluator] | None = None
        self.position = 0  # steps done = index of the next batch to train on
        self.failed: dict[str, str] = {}  # point name -> why it was stopped
        self.busy_seconds = self.wait_seconds = 0.0
        self.checkpoint_seconds = 0.0  # writing checkpoints from the step (this process)
        self.last_done: float | None = None
        self.gpu = DeviceUsage(self.device)  # this process's GPU time of its training steps
        self.replay: list[dict] = []  # the curve points of the checkpoint's own step, once restored
        self.restored = self.restore()

    # -- start and checkpoints -------------------------------------------------------------------------
    def paths(self, d_model: int, d_target: int = 0) -> list[tuple[str, str, str]]:
        """Each ensemble's kernel, decoder and encoder: as recorded beside the checkpoint, else measured
        on this device at the sweep's shapes (and recorded: a restarted trainer computes as before)."""
        record = self.checkpoint_uri + ".kernels.json" if self.checkpoint_uri else None
        if record and fs.exists(record):
            return read_paths(record, len(self.specs))
        paths = []
        for spec in self.specs:
            kernel, decode, encode = self.config.kernel, self.config.decode, "auto"
            if kernel == "auto" or self.device.type == "cuda":  # on GPUs the top-k family's encoder is measured
                kernel, decode, encode, _ = choose_path(
                    spec.architecture,
                    d_model,
                    spec.n_latents,
                    list(spec.members),
                    self.config.batch_rows,
                    self.device,
                    candidates=None if kernel == "auto" else (kernel,),
                    total_steps=self.total_steps,
                    decode=decode,
                    d_target=d_target if is_transcoder(spec.architecture) else 0,
                )
            paths.append((kernel, decode, encode))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the measured candidates' memory
            torch.cuda.reset_peak_memory_stats(self.device)  # the first step's peak is checked against the plan
        if record:
            fs.write_text(record, json.dumps([dict(zip(("kernel", "decode", "encode"), path)) for path in paths]))
        return paths

    def state(self, records: list[dict] | None = None) -> dict:
        """Everything a restart needs to continue exactly from `position` (tensors and plain data),
        with the curve points of the step just done (`records`): a driver that dies before storing
        them gets them from the restarted trainer (`replay`), which never computes them again."""
        return {
            "position": self.position,
            "failed": dict(self.failed),
            "busy": self.busy_seconds,
            "wait": self.wait_seconds,
            "records": [r for r in records or [] if "name" in r],
            "trainers": [{"state": t.state_dict(), "metrics": t.metrics.state_dict()} for t in self.trainers],
        }

    def checkpoint(self, records: list[dict] | None = None) -> None:
        fs.write_bytes(self.checkpoint_uri, checkpoint_bytes(self.state(records)))

    def restore(self) -> bool:
        if not self.checkpoint_uri or not fs.exists(self.checkpoint_uri):
            return False
        self.load_state(read_checkpoint(fs.read_bytes(self.checkpoint_uri), self.checkpoint_uri), self.checkpoint_uri)
        return True

    def load_state(self, state: dict, name: str) -> None:
        """Restore a `state()`; an InputError naming `name` when it does not fit these ensembles."""
        try:
            if len(state["trainers"]) != len(self.trainers):
                raise ValueError(f"{len(state['trainers'])} ensembles, this trainer has {len(self.trainers)}")
            for trainer, saved in zip(self.trainers, state["trainers"]):
                trainer.load_state_dict(saved["state"])
                trainer.metrics.load_state_dict(saved["metrics"], self.device)
            position, failed = int(state["position"]), state["failed"]
            if not all(isinstance(key, str) and isinstance(why, str) for key, why in failed.items()):
                raise ValueError("failed members must map names to reasons")
            busy, wait = float(state["busy"]), float(state["wait"])
            replay = checked_records(
                state.get("records", []),
                {n for spec in self.specs for n in spec.names},
                position * self.config.batch_rows,
            )
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, IndexError) as error:
            why = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            raise InputError(f"{name}: checkpoint does not fit this trainer ({why})") from None
        self.position, self.failed, self.busy_seconds, self.wait_seconds = position, dict(failed), busy, wait
        self.replay = replay

    # -- training ------------------------------------------------------------------------------------
    def step(self, index: int, pieces: Pieces, upcoming: Pieces | None = None) -> list[dict]:
        """Train every ensemble on batch `index` (prefetching batch index + 1 from `upcoming`); at
        logging points, the metrics of every SAE."""
        if index < self.position:
            return []  # already trained on (sent again after a restart)
        if index > self.position:
            raise RuntimeError(f"batch {index} arrived while batch {self.position} is due")
        start = time.perf_counter()
        if self.last_done is not None:
            self.wait_seconds += start - self.last_done  # idle: the batch was not there yet
        batch, slot = self.stager.take(("train", index), pieces)
        if upcoming is not None and index + 1 < self.total_steps:
            self.stager.prefetch(("train", index + 1), upcoming)
        computing = time.perf_counter()
        self.wait_seconds += computing - start  # the batch's copy that had not finished
        mark = self.gpu.begin()
        self.device_trainer.step(batch)
        self.gpu.end(mark)
        self.stager.release(slot)
        self.position += 1
        tokens, rows = self.position * self.config.batch_rows, self.config.batch_rows
        records = []
        if self.position == 1 and self.device.type == "cuda":  # the measured step the plan is checked against
            records.append({"peak_device_bytes": torch.cuda.max_memory_allocated(self.device)})
        if tokens // self.config.log_every_tokens != (tokens - rows) // self.config.log_every_tokens:
            self.stop_diverged(tokens)  # a logging point: the host reads the device here, and only here
            records += self.log_records(tokens)
        self.last_done = time.perf_counter()
        self.busy_seconds += self.last_done - computing
        every = self.config.checkpoint_every_tokens
        if self.checkpoint_uri and (
            self.position == self.total_steps or (every and tokens // every != (tokens - rows) // every)
        ):
            self.checkpoint(records)
            written = time.perf_counter()  # writing it is neither training nor waiting for data
            self.checkpoint_seconds += written - self.last_done
            self.last_done = written
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
                    records.append(
                        {
                            "name": name,
                            "tokens": tokens,
                            "metrics": {key: values[member] for key, values in metrics.items()},
                        }
                    )
        return records

    def data_wait(self) -> dict:
        """Seconds spent training and waiting for batches, and the waiting fraction."""
        total = self.busy_seconds + self.wait_seconds
        return {
            "busy_seconds": self.busy_seconds,
            "wait_seconds": self.wait_seconds,
            "data_wait_fraction": self.wait_seconds / total if total else 0.0,
        }

    def usage(self) -> dict:
        """`data_wait` with the GPU's busy time and utilisation (`DeviceUsage`) and what this device
        trains: each ensemble's shape and the kernel, decoder and encoder it steps with."""
        return {
            **self.data_wait(),
            "checkpoint_seconds": self.checkpoint_seconds,
            **self.gpu.report(),
            "device": self.device.type,
            "ensembles": [
                {
                    "architecture": spec.architecture,
                    "d_model": trainer.ensemble.d_model,
                    "d_target": trainer.ensemble.d_out if is_transcoder(spec.architecture) else 0,
                    "n_latents": spec.n_latents,
                    "members": len(spec.members),
                    "k": max(member.k for member in spec.members),  # the largest; 0 for relu, jumprelu
                    "batch_rows": self.config.batch_rows,
                    "kernel": kernel,
                    "decode": decode,
                    "encode": encode,
                }
                for spec, trainer, (kernel, decode, encode) in zip(self.specs, self.trainers, self.chosen)
            ],
        }

    # -- evaluation and export -------------------------------------------------------------------------
    def eval_step(self, index: int, pieces: Pieces, upcoming: Pieces | None = None) -> None:
        """Accumulate final metrics on held-out batch `index` (index 0 starts afresh)."""
        if index == 0 or self.evaluators is None:
            self.evaluators = [Evaluator(trainer.ensemble) for trainer in self.trainers]
        x, slot = self.stager.take(("eval", index), pieces)
        if upcoming is not None:
            self.stager.prefetch(("eval", index + 1), upcoming)
        x = x.to(self.device)
        for trainer, evaluator in zip(self.trainers, self.evaluators):
            evaluator.add(trainer.scale(x))
        self.stager.release(slot)

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
                finished[name] = export_member(
                    trainer.ensemble,
                    member,
                    frequencies[member],
                    metrics[member],
                    metadata[name],
                    storage_uri,
                    name,
                    features,
                )
        return {"finished": finished, "failed": dict(self.failed)}


def checked_records(records, names: set[str], tokens: int) -> list[dict]:
    """The curve points a checkpoint carries (untrusted): each names one of this trainer's SAEs, at
    the checkpoint's own tokens, with numeric metrics; a ValueError otherwise."""
    if not isinstance(records, list):
        raise ValueError("records must be a list")
    for record in records:
        if not (
            isinstance(record, dict)
            and record.get("name") in names
            and record.get("tokens") == tokens
            and isinstance(record.get("metrics"), dict)
            and all(
                isinstance(key, str) and isinstance(value, (int, float)) and not isinstance(value, bool)
                for key, value in record["metrics"].items()
            )
        ):
            raise ValueError(f"a curve point that is not one of this trainer's at {tokens} tokens: {str(record)[:120]}")
    return records


def read_paths(record: str, count: int) -> list[tuple[str, str, str]]:
    """The kernels, decoders and encoders recorded beside a checkpoint (untrusted: checked; older
    forms: a list of kernel names reads as decode auto, an entry without encode as the dense encoder
    it trained with)."""
    try:
        entries = json.loads(fs.read_text(record))
        paths = [
            (entry, "auto", "dense")
            if isinstance(entry, str)
            else (entry["kernel"], entry["decode"], entry.get("encode", "dense"))
            for entry in entries
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise InputError(f"{record}: not a kernel record ({error})") from None
    if len(paths) != count or any(
        kernel not in KERNELS or decode not in DECODES or encode not in ENCODES for kernel, decode, encode in paths
    ):
        raise InputError(
            f"{record}: expected {count} entries of kernel {KERNELS}, decode {DECODES} and encode {ENCODES},"
            f" got {str(entries)[:200]}"
        )
    return paths
