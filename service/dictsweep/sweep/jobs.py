"""Sweeps as Ray jobs: `dictsweep submit|status|logs|stop` through the Ray Jobs API.

A submitted job carries the dictsweep package and the spec (with its --set overrides applied) as
its runtime environment and runs `dictsweep run` as the job's driver on the cluster. Paths in the
spec are read on the cluster: use object-store URIs (or paths every node can see).
"""

from __future__ import annotations

import os
import tempfile
import time

import yaml

import dictsweep
from dictsweep.spec_file import load_spec
from dictsweep.errors import InputError, RunError

SPEC_NAME = "sweep.yaml"


def client(address: str):
    """A Jobs API client for `address` (http://HEAD:8265); InputError when nothing answers there."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as error:  # the SDK raises ConnectionError or RuntimeError, depending on the failure
        raise InputError(f"--address {address}: no Ray Jobs API answers there ({error})") from None


def submit(spec_path: str, address: str, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """Validate the spec here, submit it as a Ray job, return the job id."""
    spec = load_spec(spec_path, overrides)
    job_id = f"dictsweep-{spec.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    package = os.path.dirname(dictsweep.__file__)
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, SPEC_NAME), "w") as file:
            yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True), file, sort_keys=False)
        jobs, deadline = client(address), time.time() + 120
        while True:
            try:
                return jobs.submit_job(
                    entrypoint=f"python -m dictsweep.cli run {SPEC_NAME}",
                    submission_id=job_id,
                    runtime_env={
                        "working_dir": folder,
                        "py_modules": [package],
                        "env_vars": {"DICTSWEEP_JOB_ID": job_id},
                    },
                    metadata={"dictsweep.sweep": spec.name},
                )
            except RuntimeError as error:  # a cluster that just started has no job agent for a while
                if "No available agent" not in str(error) or time.time() > deadline:
                    raise RunError(f"{address} did not take the job: {error}") from None
                time.sleep(2)


def status(job_id: str, address: str) -> dict:
    """The job's status and message."""
    info = _info(job_id, address)
    return {
        "job_id": job_id,
        "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "message": info.message or "",
        "sweep": (info.metadata or {}).get("dictsweep.sweep", ""),
    }


def logs(job_id: str, address: str) -> str:
    """Everything the job's driver printed so far."""
    _info(job_id, address)
    return client(address).get_job_logs(job_id)


def stop(job_id: str, address: str) -> bool:
    """Ask the cluster to stop the job; True if it was running."""
    _info(job_id, address)
    return client(address).stop_job(job_id)


def wait(job_id: str, address: str, timeout: float) -> str:
    """Block until the job ends (or `timeout`); returns its final status."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = status(job_id, address)["status"]
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            return state
        time.sleep(1)
    raise RunError(f"job {job_id} did not end within {timeout:.0f} s")


def _info(job_id: str, address: str):
    try:
        return client(address).get_job_info(job_id)
    except RuntimeError as error:
        if "does not exist" in str(error) or "404" in str(error):
            raise InputError(f"no job {job_id!r} at {address}") from None
        raise
