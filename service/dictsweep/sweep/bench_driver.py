"""`dictsweep bench driver`: the most batches per second one sweep driver hands out, and the MLflow
writes per second it makes.

Per batch and trainer the driver submits one actor task (the batch as window pieces: references and
row ranges) and takes its result, in the loop of `Driver.drive` (at most `batches_in_flight` queued
per trainer, `ray.wait` on the oldest of each). Timed here against trainers that do no work, the
rate is the driver's ceiling: a sweep whose trainers together step faster waits for its driver.
Each training-curve point is one MLflow `log_batch` per SAE, sent from the same loop.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from dictsweep.cluster import start_ray


class IdleTrainer:
    """A trainer that takes its batches and does nothing with them (a step between logging points)."""

    def step(self, index: int, pieces, upcoming=None) -> list:
        return []


def bench_driver(trainers: int, steps: int, in_flight: int, address: str | None = None) -> dict:
    """Batches per second that one driver hands `trainers` idle trainers, `steps` each."""
    import ray

    start_ray(address, log_to_driver=False)  # the JSON alone on stdout
    window = ray.put(np.zeros((4096, 16), np.float16))  # a window: the tasks carry a reference to it
    actors = [ray.remote(num_cpus=0)(IdleTrainer).remote() for _ in range(trainers)]
    ray.get([actor.step.remote(-1, []) for actor in actors])  # started
    queues: list[deque] = [deque() for _ in actors]
    sent, done = [0] * trainers, 0
    started, cpu = time.perf_counter(), time.process_time()
    while done < trainers * steps:
        for index, actor in enumerate(actors):
            while sent[index] < steps and len(queues[index]) < in_flight:
                batch = sent[index]
                queues[index].append(actor.step.remote(batch, [(window, 0, 256)], [(window, 256, 512)]))
                sent[index] += 1
        ray.wait([queue[0] for queue in queues if queue], num_returns=1, timeout=5.0)
        for queue in queues:
            while queue and ray.wait([queue[0]], timeout=0)[0]:
                ray.get(queue.popleft())
                done += 1
    seconds = time.perf_counter() - started
    for actor in actors:
        ray.kill(actor)
    return {
        "trainers": trainers,
        "steps": steps,
        "batches_in_flight": in_flight,
        "batches_per_s": round(trainers * steps / seconds, 1),
        "driver_cpu_fraction": round((time.process_time() - cpu) / seconds, 3),
        "seconds": round(seconds, 2),
    }


def bench_tracking(uri: str, writes: int, metrics: int = 6) -> dict:
    """`log_batch` writes per second to the MLflow at `uri`, each `metrics` values of one run."""
    from dictsweep.track import Tracker

    tracker = Tracker(uri, "dictsweep-bench-driver")
    tracker.start_sweep("bench-driver", {})
    run = tracker.start_sae("bench-driver-sae", {})
    started = time.perf_counter()
    for step in range(writes):
        tracker.log_metrics(run, {f"metric_{i}": float(step + i) for i in range(metrics)}, step)
        tracker.flush()
    seconds = time.perf_counter() - started
    tracker.end_run(run)
    tracker.end_run(tracker.parent_id)
    tracker.flush(patience=60)
    return {"log_batch_per_s": round(writes / seconds, 1), "metrics_per_write": metrics}
