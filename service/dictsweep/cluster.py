"""Starting or joining Ray, once per process, and the devices a sweep finds on the cluster."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from dictsweep.errors import InputError, RunError

if TYPE_CHECKING:  # the spec is only read here: cluster.py sits below config.py, beside errors
    from dictsweep.config import SweepSpec


# Ray frees released objects in batches, by default once a second: a node's object store then
# held up to a second's worth of released windows beyond the stream's budget (6 of 67 MB where 3
# were allowed, measured); every 50 ms it holds the budget
LOCAL_RAY_CONFIG = {"free_objects_period_milliseconds": 50}


def start_ray(address: str | None, num_cpus: int | None = None, log_to_driver: bool = True) -> bool:
    """Connect to `address` (or $RAY_ADDRESS), or start a local Ray for this process ("local", or
    neither given) on `num_cpus` logical CPUs; nothing if connected already. True if this call did."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address != "local":
        try:
            ray.init(address=address, log_to_driver=log_to_driver)
        except Exception as error:  # ConnectionError, ValueError, Ray's own: all mean "not reachable"
            raise InputError(f"--address {address}: cannot connect to a Ray cluster there ({error})") from None
        return True
    # logical CPUs above the real cores: trainers thread themselves, readers mostly wait on I/O
    num_cpus = num_cpus or 2 * max(2, os.cpu_count() or 2)
    # Ray's own default for a cluster it starts (token auth) is right here; its note about it is noise
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    for attempt in range(2):
        try:
            # address="local" never joins a stale cluster named in Ray's temp folder (ENVIRONMENT.md)
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                log_to_driver=log_to_driver,
                logging_level="warning",
                _system_config=dict(LOCAL_RAY_CONFIG),  # a copy: ray.init adds its session's spilling settings to it
            )
            return True
        except Exception as error:  # Ray raises a bare Exception when its node misses the 30 s start-up
            ray.shutdown()
            if attempt:
                raise RunError(f"could not start a local Ray ({error}); is the machine overloaded?") from None
    return True


def cluster_devices(spec: SweepSpec) -> tuple[str, int, int]:
    """(device kind, device count, memory per device) from the Ray cluster and the spec."""
    import ray

    start_ray(None)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    return devices(spec, gpus, lambda: ray.get(ray.remote(num_gpus=1)(_gpu_memory).remote()), "the Ray cluster")


def local_devices(spec: SweepSpec) -> tuple[str, int, int]:
    """`cluster_devices` of a local Ray on this machine, without starting it: GPUs counted by torch."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return devices(
        spec,
        gpus,
        _gpu_memory,
        "this machine",
        " (pass --address to plan on a cluster's, or set "
        "resources.trainers and resources.device_memory_gb to plan for GPUs elsewhere)",
    )


def devices(spec: SweepSpec, gpus: int, gpu_memory, where: str, hint: str = "") -> tuple[str, int, int]:
    """(kind, count, memory per trainer) from the GPUs `where` has (`gpu_memory()`: one GPU's bytes)
    and the spec's resources."""
    device = spec.resources.device
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device == "cuda" and not gpus:
        raise InputError(f"resources.device: 'cuda' asked for, but {where} has no GPUs{hint}")
    share = spec.resources.gpus_per_trainer if device == "cuda" else 1.0
    count = spec.resources.trainers or (int(gpus / share) if device == "cuda" else 1)
    if spec.resources.device_memory_gb:
        memory = int(spec.resources.device_memory_gb * 2**30)
    elif device == "cuda":
        memory = gpu_memory()
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    return device, count, int(memory * share)  # a trainer plans with its share of the device


def _gpu_memory() -> int:
    import torch

    return torch.cuda.get_device_properties(0).total_memory


def given_devices(spec: SweepSpec) -> tuple[str, int, int] | None:
    """The devices the spec names outright (kind, count and memory), for planning without a cluster."""
    resources = spec.resources
    if resources.device != "auto" and resources.trainers and resources.device_memory_gb:
        return resources.device, resources.trainers, int(resources.device_memory_gb * 2**30)
    return None
