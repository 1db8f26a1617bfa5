"""`run_sweep`, the entry point of a sweep: plan, train (`driver`), finish (`finish`)."""

from __future__ import annotations

import os
import time

from dictsweep.cluster import cluster_devices, given_devices, start_ray
from dictsweep.config import SweepSpec
from dictsweep.errors import InputError, RunError
from dictsweep.store import fs
from dictsweep.store.dataset import ActivationDataset
from dictsweep.sweep.driver import Driver
from dictsweep.sweep.finish import finish
from dictsweep.sweep.ledger import is_complete, latest_run, mark_latest, saved_plan
from dictsweep.sweep.plan import Plan, plan_sweep
from dictsweep.sweep.results import SweepResult


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


def open_dataset(spec: SweepSpec) -> ActivationDataset:
    """The sweep's dataset; with `data.synth` set, write it first if the prefix holds none."""
    if spec.data.synth is not None and not fs.exists(fs.join(spec.data.uri, "manifest.json")):
        from dictsweep.store.synth import synth_dataset

        print(f"writing synthetic dataset to {spec.data.uri} ...", flush=True)
        synth_dataset(spec.data.uri, spec.data.synth)
    return ActivationDataset.open(spec.data.uri)


def run_sweep(spec: SweepSpec, address: str | None = None, plan_only: bool = False,
              resume: bool = False) -> SweepResult | Plan:
    """Run (or only plan, or resume) a sweep. Raises RunError, with what finished, if any SAE failed.

    Each run keeps its working files in `<storage.dir>/runs/<started>/`; `latest.json` names the
    newest, which `resume` continues unless it completed.
    """
    spec = pin_paths(spec)
    dataset = open_dataset(spec)
    if plan_only and given_devices(spec):  # planning for a cluster this machine is not part of
        return plan_sweep(spec, dataset.d_model, *given_devices(spec))
    start_ray(address)
    latest = latest_run(spec.storage_dir)
    if resume and latest and not is_complete(latest):
        run_dir, plan = latest, saved_plan(latest)
    else:
        if resume:
            print(f"nothing to resume under {spec.storage_dir}: starting the sweep afresh", flush=True)
        resume = False
        run_dir = fs.join(spec.storage_dir, "runs", time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
        plan = plan_sweep(spec, dataset.d_model, *cluster_devices(spec))
    if plan_only:
        return plan
    if plan.unplaced:
        raise InputError("grid: these SAEs fit no device: " + "; ".join(
            f"{name} {why}" for name, why in sorted(plan.unplaced.items())))
    driver = Driver(spec, dataset, plan, run_dir, resume)
    mark_latest(spec.storage_dir, run_dir)
    ledger = driver.ledger
    try:
        driver.run()
        finish(driver)
    except BaseException:
        ledger.tracker.flush()
        raise
    result = ledger.result
    if result.failed:
        raise RunError(f"{len(result.failed)} of {len(ledger.points)} SAEs failed: "
                       + "; ".join(f"{name}: {why[:200]}" for name, why in sorted(result.failed.items()))
                       + f". The {len(result.finished)} finished ones are exported and logged.", result=result)
    return result
