"""How busy a trainer's GPU was while it trained, from torch alone.

Two readings: the compute stream's own time per training step (a pair of CUDA timing events around
each step, read once the GPU has passed them, so the step never waits for them), and the GPU's
utilisation as NVML reports it (`torch.cuda.utilization`, sampled at most once a second), where
torch can read it (it needs the `nvidia-ml-py` package). On a CPU there is neither: the report
says so instead of giving zeros.
"""

from __future__ import annotations

import time
from collections import deque

import torch

SAMPLE_SECONDS = 1.0  # NVML's own sample period is 1/6 s to 1 s


class DeviceUsage:
    """GPU time of a trainer's training steps; `begin()` before a step, `end(mark)` after it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.pending: deque = deque()  # (start, end) CUDA events of steps the GPU may not have run yet
        self.busy_ms = 0.0
        self.utilization: list[int] = []  # percent, one sample a second at most
        self.last_sample = 0.0
        self.note = None if self.cuda else "no GPU: the trainer ran on the CPU"

    def begin(self):
        """A mark on the compute stream before a step (None on a CPU)."""
        if not self.cuda:
            return None
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start

    def end(self, start) -> None:
        """After a step is enqueued: its end mark, the steps the GPU has finished, an NVML sample."""
        if not self.cuda:
            return
        stop = torch.cuda.Event(enable_timing=True)
        stop.record()
        self.pending.append((start, stop))
        self.collect(wait=False)
        now = time.monotonic()
        if self.note is None and now - self.last_sample >= SAMPLE_SECONDS:
            self.last_sample = now
            try:
                self.utilization.append(int(torch.cuda.utilization(self.device)))
            except Exception as error:  # no nvidia-ml-py, no NVML driver library: no reading, and no retry
                why = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
                self.note = f"torch.cuda.utilization cannot read NVML here ({why})"

    def collect(self, wait: bool) -> None:
        """Add the GPU time of the steps the GPU has finished (all of them when `wait`)."""
        while self.pending and (wait or self.pending[0][1].query()):
            start, stop = self.pending.popleft()
            stop.synchronize()
            self.busy_ms += start.elapsed_time(stop)

    def report(self) -> dict:
        """GPU seconds of the steps, mean NVML utilisation (percent) and why a reading is missing."""
        self.collect(wait=True)
        return {
            "gpu_busy_seconds": self.busy_ms / 1000 if self.cuda else None,
            "gpu_utilization": sum(self.utilization) / len(self.utilization) if self.utilization else None,
            "gpu_note": self.note,
        }
