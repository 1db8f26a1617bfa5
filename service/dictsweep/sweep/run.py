"""`run_sweep`, the entry point of a sweep: plan, train (`driver`), finish (`finish`)."""

from __future__ import annotations

import logging
import os
import secrets
import time

from dictsweep.cluster import cluster_devices, given_devices, local_devices, start_ray
from dictsweep.config import SweepSpec
from dictsweep.errors import InputError, Interrupted, RunError, first_line, stopped_by_signals
from dictsweep.store import fs
from dictsweep.store.dataset import ActivationDataset
from dictsweep.sweep.driver import Driver
from dictsweep.sweep.finish import finish
from dictsweep.sweep.lease import Lease
from dictsweep.sweep.ledger import is_complete, latest_run, mark_latest, saved_plan
from dictsweep.sweep.plan import Plan, plan_sweep
from dictsweep.sweep.preflight import open_dataset, preflight, sweep_warnings, warn
from dictsweep.sweep.results import SweepResult

log = logging.getLogger(__name__)


def absolute(uri: str) -> str:
    """Local paths made absolute (actors may run elsewhere); URIs with a scheme unchanged."""
    return uri if "://" in uri and not uri.startswith("file://") else os.path.abspath(uri.removeprefix("file://"))


def pin_paths(spec: SweepSpec) -> SweepSpec:
    """The spec with every local path absolute, taken from the working directory now."""
    spec = spec.model_copy(deep=True)
    spec.data.uri = absolute(spec.data.uri)
    spec.export.dir = absolute(spec.export_dir)
    spec.storage.dir = absolute(spec.storage_dir)
    return spec


def to_write(spec: SweepSpec) -> bool:
    """Whether the sweep writes its (synthetic) dataset first: `data.synth` set and none at `data.uri`."""
    return spec.data.synth is not None and not fs.exists(fs.join(spec.data.uri, "manifest.json"))


def plan_without_running(spec: SweepSpec, address: str | None, resume: bool) -> Plan:
    """The plan, without writing anything, and without Ray unless a cluster's address is given (and
    the spec does not settle the devices): the local machine is where a local Ray would run."""
    latest = latest_run(spec.storage_dir)
    if resume and latest and not is_complete(latest):
        return saved_plan(latest)
    if to_write(spec):
        d_model, d_target = spec.data.synth.d_model, spec.data.synth.d_target
        warn(sweep_warnings(spec, spec.data.synth.eval_rows))
    else:
        dataset = open_dataset(spec)
        d_model, d_target = dataset.d_model, dataset.d_target
        warn(sweep_warnings(spec, dataset.n_eval_rows))
    if given_devices(spec):  # planning for a cluster this machine need not be part of
        return plan_sweep(spec, d_model, *given_devices(spec), d_target)
    if spec.resources.device == "cpu" or not (address or os.environ.get("RAY_ADDRESS")):
        return plan_sweep(spec, d_model, *local_devices(spec), d_target)
    start_ray(address)
    return plan_sweep(spec, d_model, *cluster_devices(spec), d_target)


def run_sweep(
    spec: SweepSpec, address: str | None = None, plan_only: bool = False, resume: bool = False, force: bool = False
) -> SweepResult | Plan:
    """Run (or only plan, or resume) a sweep. Raises RunError, with what finished, if any SAE failed.

    Each run keeps its working files in `<storage.dir>/runs/<started>-<random>/`; `latest.json`
    names the newest, which `resume` continues unless it completed. Everything that can be checked
    in seconds is checked before Ray starts (`preflight`); the sweep's lease is taken before anything
    is written, so that one driver at a time writes a sweep (`force` takes a dead driver's).
    """
    spec = pin_paths(spec)
    if plan_only:
        return plan_without_running(spec, address, resume)
    dataset = preflight(spec)
    lease = Lease(spec.storage_dir).take(force)
    try:
        start_ray(address)
        warn_local_paths(spec)
        return run_under_lease(spec, dataset, resume, lease)
    finally:
        lease.release()


def run_under_lease(spec: SweepSpec, dataset: ActivationDataset, resume: bool, lease: Lease) -> SweepResult:
    latest = latest_run(spec.storage_dir)
    if resume and latest and not is_complete(latest):
        run_dir, plan = latest, saved_plan(latest)
    else:
        if resume:
            log.info(f"nothing to resume under {spec.storage_dir}: starting the sweep afresh")
        resume = False
        run_dir = fs.join(spec.storage_dir, "runs", run_id())
        plan = plan_sweep(spec, dataset.d_model, *cluster_devices(spec), dataset.d_target)
    if plan.unplaced:
        raise InputError(
            "grid: these SAEs fit no device: "
            + "; ".join(f"{name} {why}" for name, why in sorted(plan.unplaced.items()))
        )
    driver = Driver(spec, dataset, plan, run_dir, resume, lease)
    ledger = driver.ledger
    if not resume and latest and not is_complete(latest):
        ledger.close_abandoned(latest)  # a dead driver's run that this one replaces
    mark_latest(spec.storage_dir, run_dir)
    try:
        with stopped_by_signals():
            driver.run()
            finish(driver)
    except Interrupted as stop:
        ledger.stop("KILLED", f"the driver was stopped by {stop.name}")
        raise Interrupted(
            stop.signum,
            f"stopped by {stop.name}: {len(ledger.result.finished)} of "
            f"{len(ledger.points)} SAEs were finished and recorded, the others are "
            "marked KILLED in MLflow; every curve point taken so far is in "
            f"{run_dir}. Continue the sweep with --resume",
        ) from None
    except BaseException as error:
        if lease.taken_by is None:  # a driver that took over the sweep owns its runs now
            ledger.stop("FAILED", f"the driver stopped: {first_line(error)}")
        raise
    result = ledger.result
    if result.failed:
        raise RunError(
            f"{len(result.failed)} of {len(ledger.points)} SAEs failed: "
            + "; ".join(f"{name}: {why[:200]}" for name, why in sorted(result.failed.items()))
            + f". The {len(result.finished)} finished ones are exported and logged."
            + (
                f" The {len(result.resumable)} SAEs of trainers lost with their node continue from their "
                "checkpoints when the sweep is run again with --resume."
                if result.resumable
                else ""
            ),
            result=result,
        )
    return result


def warn_local_paths(spec: SweepSpec) -> None:
    """A warning when the Ray cluster has several nodes and the spec names local paths: each node's
    readers, trainers and checkpoints then use that path on their own disk, which holds the same files
    only on a shared file system (a trainer restarted on another node would not find its checkpoint)."""
    import ray

    nodes = sum(node["Alive"] for node in ray.nodes())
    local = [
        f"{key} {value}"
        for key, value in (
            ("data.uri", spec.data.uri),
            ("storage.dir", spec.storage_dir),
            ("export.dir", spec.export_dir),
        )
        if fs.is_local(value)
    ]
    if nodes > 1 and local:
        log.warning(
            f"the Ray cluster has {nodes} nodes and these paths are local: {', '.join(local)}; every node "
            "reads and writes them on its own disk, so they must be one shared file system (else use s3:// URIs)"
        )


def run_id() -> str:
    """A run folder's name: when it started (UTC, to the second) and a random part, so that two runs
    started in the same second never share a folder."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
