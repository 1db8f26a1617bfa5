"""What a sweep needs that can be checked in seconds, checked before Ray starts (which takes a
minute on a cluster): the storage it writes to, the tracking server, the dataset's manifest, and
the spec against the dataset. Each problem is one line and exit 2."""

from __future__ import annotations

import logging
import math

from dictsweep.config import SweepSpec
from dictsweep.spec_file import spec_warnings
from dictsweep.errors import InputError
from dictsweep.sae import ARCHITECTURES
from dictsweep.sae.transcoder import is_transcoder
from dictsweep.store import fs
from dictsweep.store.dataset import ActivationDataset
from dictsweep.track_server import check_tracking
from dictsweep.train.zero import ZERO_ARCHITECTURES

log = logging.getLogger(__name__)


def open_dataset(spec: SweepSpec) -> ActivationDataset:
    """The sweep's dataset (with `data.synth` set and none at `data.uri`, written first)."""
    if spec.data.synth is not None and not fs.exists(fs.join(spec.data.uri, "manifest.json")):
        from dictsweep.store.synth import synth_dataset
        from dictsweep.sweep.progress import step

        synth = spec.data.synth
        with step(f"writing {synth.rows:,} + {synth.eval_rows:,} synthetic rows to {spec.data.uri}"):
            synth_dataset(spec.data.uri, synth)
    return ActivationDataset.open(spec.data.uri)


def sweep_warnings(spec: SweepSpec, eval_rows: int) -> list[str]:
    """`spec_warnings` with the fewest optimizer steps the grid's architectures take (their largest step)."""
    rows = max(spec.train.rows_per_step(ARCHITECTURES[name].budget_steps) for name in spec.grid.architecture)
    return spec_warnings(spec, eval_rows, rows)


def warn(notes: list[str]) -> None:
    for note in notes:
        log.warning(note)


def preflight(spec: SweepSpec) -> ActivationDataset:
    """Check `spec` (its local paths made absolute) and return its dataset (written first when it is
    synthetic and absent); InputError naming the field at the first problem. A spec that passes gets
    a warning for each setting the dataset keeps from doing what it says."""
    for field, uri in (("data.uri", spec.data.uri), ("storage.dir", spec.storage_dir), ("export.dir", spec.export_dir)):
        try:
            fs.check_access(uri)
        except fs.StorageError as error:
            raise fs.StorageError(f"{field}: {error}") from None
    check_tracking(spec.tracking.uri)
    untrainable = sorted(set(spec.grid.architecture) - set(ZERO_ARCHITECTURES))
    if spec.resources.zero == "always" and untrainable:
        raise InputError(
            f"resources.zero: always, and ZeRO trains only {', '.join(ZERO_ARCHITECTURES)}, not {untrainable} "
            "(grid.architecture); set it to auto or never"
        )
    dataset = open_dataset(spec)
    rows = spec.train.batch_rows
    if spec.train.tokens < rows:
        raise InputError(f"train.tokens ({spec.train.tokens}) is less than one batch ({rows} rows, train.batch_rows)")
    eval_rows = min(spec.train.eval_tokens, dataset.n_eval_rows)
    if eval_rows < rows:
        raise InputError(
            f"{dataset.uri}: the eval split has {dataset.n_eval_rows} rows and train.eval_tokens is "
            f"{spec.train.eval_tokens}: fewer than one batch of {rows} (train.batch_rows); final "
            "metrics need held-out rows"
        )
    dataset.mean_sq_norm()  # the input scale: read now (first shards, when the manifest has no stats)
    transcoder_target(spec, dataset)
    warn(sweep_warnings(spec, dataset.n_eval_rows))  # a spec that passed: what it will not do as it says
    return dataset


def transcoder_target(spec: SweepSpec, dataset: ActivationDataset) -> tuple[int, float] | None:
    """(d_target, the target's training scale sqrt(d_target / E|y|^2)) when the grid trains transcoders,
    else None; InputError when the grid mixes transcoders and SAEs (they reconstruct different things,
    so selection could not rank them together), the dataset has no target, or baselines are asked
    for (they are SAEs of the input)."""
    transcoders = [name for name in spec.grid.architecture if is_transcoder(name)]
    if not transcoders:
        return None
    if len(transcoders) < len(spec.grid.architecture):
        others = sorted(set(spec.grid.architecture) - set(transcoders))
        raise InputError(
            f"grid.architecture: {others} with transcoders {transcoders}: train SAEs and transcoders in separate sweeps"
        )
    if not dataset.d_target:
        raise InputError(
            f"grid.architecture: {transcoders} need a transcoder dataset (a `target` column, manifest d_target); "
            f"{dataset.uri} has none: harvest it with --target-hook, or `dictsweep synth --d-target`"
        )
    if spec.baselines:  # PCA, ICA, ... reconstruct their input: none is a map to the target
        raise InputError(f"baselines: {spec.baselines} are SAE baselines; a transcoder sweep has none: remove the key")
    return dataset.d_target, math.sqrt(dataset.d_target / dataset.mean_sq_norm("target"))
