"""The sweep's own throughput, summed over its waves: what the stream read, how long the trainers
waited for data, the training phase's SAE-samples/s and how busy the GPUs were; and the same
ensembles timed by `bench train` on this device, for comparison.

The training phase of a wave runs from the first batch sent to its trainers to the last trainer's
last training step; its SAE-samples are, per trainer, its SAEs (members of its ensembles) x the
training rows it stepped in this run (a resumed trainer counts from its checkpoint). The trainers'
own counters (`DeviceLoop.usage`) give the data wait and the GPU readings.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# what makes two ensembles the same for `bench train`
SHAPE_KEYS = (
    "architecture",
    "d_model",
    "d_target",
    "n_latents",
    "members",
    "k",
    "batch_rows",
    "kernel",
    "decode",
    "encode",
)


def trainer_entry(key: str, usage: dict, steps: int, rows: int, seconds: float, share: float) -> dict:
    """One trainer's part of a wave: its counters (`usage`), the SAE-samples of the `steps` batches of
    `rows` it trained in this run, its compute stream's share of the wave's training phase
    (`seconds`), and `share`, the part of a device it had (a GPU fraction; 1 / trainers on a CPU)."""
    members = sum(ensemble["members"] for ensemble in usage["ensembles"])
    busy = usage.get("gpu_busy_seconds")
    return {
        "key": key,
        **usage,
        "steps": steps,
        "sae_samples": members * steps * rows,
        "device_share": share,
        "gpu_busy_fraction": busy / seconds if busy is not None and seconds > 0 else None,
    }


def merge_stream_stats(total: dict, readers: list[dict], trainers: list[dict], seconds: float) -> dict:
    """`total` with one more wave: bytes read per node (and by node ID), the trainers' data wait, SAE-samples and the
    seconds of its training phase (and of it, writing checkpoints), and the GPU readings (means over
    the trainers that have them)."""
    total = dict(total) or {
        "bytes_read_per_node": [],
        "reads_by_node": {},
        "wait_seconds": 0.0,
        "busy_seconds": 0.0,
        "train_seconds": 0.0,
        "checkpoint_seconds": 0.0,
        "sae_samples": 0,
        "trainers": [],
    }
    total["bytes_read_per_node"] = total["bytes_read_per_node"] + [r["bytes_read"] for r in readers]
    for reader in readers:  # by node ID, with the reads of each shard
        node = total["reads_by_node"].setdefault(reader["node"], {"bytes_read": 0, "shard_reads": {}})
        node["bytes_read"] += reader["bytes_read"]
        for shard, reads in reader["shard_reads"].items():
            node["shard_reads"][shard] = node["shard_reads"].get(shard, 0) + reads
    total["wait_seconds"] += sum(t["wait_seconds"] for t in trainers)
    total["busy_seconds"] += sum(t["busy_seconds"] for t in trainers)
    waited = total["wait_seconds"] + total["busy_seconds"]
    total["data_wait_fraction"] = total["wait_seconds"] / waited if waited else 0.0
    total["train_seconds"] += seconds
    # trainers write their checkpoints side by side: the wave's slowest is what its phase lost
    total["checkpoint_seconds"] += max((t["checkpoint_seconds"] for t in trainers), default=0.0)
    total["sae_samples"] += sum(t["sae_samples"] for t in trainers)
    total["sae_samples_per_s"] = total["sae_samples"] / total["train_seconds"] if total["train_seconds"] else None
    total["trainers"] = total["trainers"] + trainers
    everyone = total["trainers"]
    total["device"] = "cuda" if any(t["device"] == "cuda" for t in everyone) else "cpu"
    for key in ("gpu_busy_fraction", "gpu_utilization"):
        values = [t[key] for t in everyone if t.get(key) is not None]
        total[key] = sum(values) / len(values) if values else None
    notes = sorted({t["gpu_note"] for t in everyone if t.get("gpu_note")})
    total["gpu_note"] = "; ".join(notes) or None
    return total


def summary(stream: dict) -> dict[str, float]:
    """The parent run's metrics of the stream and the training phase (readings that exist only)."""
    metrics = {
        "data_wait_fraction": stream["data_wait_fraction"],
        "bytes_read_per_node": sum(stream["bytes_read_per_node"]) / max(1, len(stream["bytes_read_per_node"])),
    }
    for key in ("sae_samples_per_s", "train_seconds", "checkpoint_seconds", "gpu_busy_fraction", "gpu_utilization"):
        if stream.get(key) is not None:
            metrics[key] = float(stream[key])
    return metrics


def report_lines(stream: dict) -> list[str]:
    """What the console says about the stream and the training phase at the end of a sweep."""
    lines = [
        f"stream: {summary(stream)['bytes_read_per_node'] / 1e6:,.1f} MB read per node; trainers waited for "
        f"data {stream['data_wait_fraction']:.1%} of the time"
    ]
    if stream.get("sae_samples_per_s") is None:
        return lines
    line = (
        f"training: {stream['sae_samples_per_s']:,.0f} SAE-samples/s ({stream['sae_samples']:,} in "
        f"{stream['train_seconds']:.1f} s on {stream['device']}, {stream['checkpoint_seconds']:.1f} s of it writing "
        "checkpoints)"
    )
    if stream["gpu_busy_fraction"] is not None:
        line += f"; GPU busy {stream['gpu_busy_fraction']:.0%} of it (CUDA events)"
    if stream["gpu_utilization"] is not None:
        line += f", utilisation {stream['gpu_utilization']:.0f}% (NVML)"
    if stream["gpu_note"]:
        line += f"; {stream['gpu_note']}"
    return lines + [line]


def sweep_report(stream: dict) -> dict:
    """`bench sweep`'s JSON: the training phase's figures, the data wait, the GPU readings and
    each trainer's ensembles (the shapes to time with `bench train`)."""
    keys = (
        "device",
        "sae_samples_per_s",
        "sae_samples",
        "train_seconds",
        "checkpoint_seconds",
        "data_wait_fraction",
        "wait_seconds",
        "busy_seconds",
        "gpu_busy_fraction",
        "gpu_utilization",
        "gpu_note",
    )
    return {
        **{key: stream[key] for key in keys},
        "bytes_read_per_node": stream["bytes_read_per_node"],
        "trainers": [{key: value for key, value in t.items() if key != "ensembles"} for t in stream["trainers"]],
        "ensembles": [{"trainer": t["key"], **e} for t in stream["trainers"] for e in t["ensembles"]],
    }


def bench_train_equivalent(stream: dict, steps: int = 10, rounds: int = 3) -> dict:
    """The sweep's ensembles timed by `bench train` in this process (on the trainers' device kind,
    with the kernel, decoder and encoder each trainer chose), and the rate the sweep would have had at those
    speeds: in each wave, every trainer steps its ensembles in turn on every batch and the wave's
    devices run in parallel (trainers sharing a GPU share its time)."""
    from dictsweep.train.bench import bench_train

    rates: dict[tuple, float] = {}
    shapes = []
    for trainer in stream["trainers"]:
        for ensemble in trainer["ensembles"]:
            shape = tuple(ensemble[key] for key in SHAPE_KEYS)
            if shape not in rates:
                measured = bench_train(
                    ensemble["d_model"],
                    ensemble["n_latents"],
                    ensemble["batch_rows"],
                    ensemble["members"],
                    steps,
                    ensemble["architecture"],
                    (ensemble["kernel"],),
                    reference=False,
                    device=trainer["device"],
                    decodes=(ensemble["decode"],),
                    encodes=(ensemble["encode"],),
                    rounds=rounds,
                    k=ensemble["k"],
                    d_target=ensemble["d_target"],
                )
                rates[shape] = measured["sae_samples_per_s"]
                shapes.append({**dict(zip(SHAPE_KEYS, shape)), "sae_samples_per_s": measured["sae_samples_per_s"]})
                log.info(f"bench train {shape}: {measured['sae_samples_per_s']:,.0f} SAE-samples/s")
    seconds: dict[str, float] = {}  # per wave: its ensembles' time at bench speed over its devices
    devices: dict[str, float] = {}
    for trainer in stream["trainers"]:
        wave = trainer["key"].split("-")[0]
        devices[wave] = devices.get(wave, 0.0) + trainer["device_share"]
        for ensemble in trainer["ensembles"]:
            samples = ensemble["members"] * ensemble["batch_rows"] * trainer["steps"]
            seconds[wave] = seconds.get(wave, 0.0) + samples / rates[tuple(ensemble[key] for key in SHAPE_KEYS)]
    total = sum(seconds[wave] / devices[wave] for wave in seconds)
    equivalent = stream["sae_samples"] / total if total else None
    return {
        "bench_train": shapes,
        "bench_train_sae_samples_per_s": equivalent,
        "fraction_of_bench_train": stream["sae_samples_per_s"] / equivalent if equivalent else None,
    }
