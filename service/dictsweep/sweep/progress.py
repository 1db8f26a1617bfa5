"""What the console shows while a sweep runs: a bar (or a spinner) for every step that takes more
than a moment, a time-left estimate that does not jump, and a line with the best and worst SAE.

It goes to stdout with the rest of the sweep's output, so `dictsweep logs` of a submitted sweep
shows the same (rich prints each bar's last state once when not on a terminal).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Column
from rich.text import Text

WARMUP_SECONDS = 5.0  # first batches include compiling and filling the stream: not the steady rate
HALF_LIFE_SECONDS = 20.0  # of the smoothed rate: a stall or a burst moves the estimate slowly


class RateEstimate:
    """Work per second smoothed over time (an exponential moving average with a half-life in
    seconds, started after a warm-up), and the time left at that rate."""

    def __init__(
        self,
        total: float,
        warmup_seconds: float = WARMUP_SECONDS,
        half_life_seconds: float = HALF_LIFE_SECONDS,
        now: float | None = None,
    ):
        self.total, self.warmup, self.half_life = total, warmup_seconds, half_life_seconds
        self.started = time.perf_counter() if now is None else now
        self.last: tuple[float, float] | None = None  # (time, done) at the last update after warm-up
        self.rate: float | None = None

    def update(self, done: float, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if now - self.started < self.warmup:
            return
        if self.last is None:
            self.last = (now, done)
            return
        seconds = now - self.last[0]
        if seconds <= 0:
            return
        rate = (done - self.last[1]) / seconds
        weight = 1 - math.exp(-seconds * math.log(2) / self.half_life)  # older rates count half per half-life
        self.rate = rate if self.rate is None else self.rate + weight * (rate - self.rate)
        self.last = (now, done)

    def seconds_left(self, done: float) -> float | None:
        """None until the rate is known (during the warm-up); 0 once everything is done."""
        if done >= self.total:
            return 0.0
        if not self.rate or self.rate <= 0:
            return None
        return max(self.total - done, 0) / self.rate


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class SaeBoard:
    """The latest training metrics of every SAE (from the trainers' records), summed up in a line:
    the best and worst by loss, with their L0 and dead fraction."""

    def __init__(self) -> None:
        self.latest: dict[str, dict] = {}  # name -> its newest metrics

    def add(self, records: list[dict]) -> None:
        for record in records:
            if isinstance(record.get("metrics"), dict):
                self.latest[record["name"]] = record["metrics"]

    def lines(self) -> list[str]:
        """`best  NAME  loss .. L0 .. dead ..%` and the same for the worst (one line with one SAE)."""
        ranked = sorted((metrics["loss"], name) for name, metrics in self.latest.items() if "loss" in metrics)
        if not ranked:
            return ["no SAE has logged yet"]

        def describe(name: str) -> str:
            metrics = self.latest[name]
            dead = metrics.get("dead_fraction")
            return f"{name}  loss {metrics['loss']:.4g}  L0 {metrics.get('l0', float('nan')):.1f}" + (
                f"  dead {dead:.0%}" if dead is not None else ""
            )

        best, worst = ranked[0][1], ranked[-1][1]
        return [f"best  {describe(best)}"] + ([f"worst {describe(worst)}"] if worst != best else [])


def console() -> Console:
    return Console()


class TrainingProgress(Progress):
    """The training bar (percentage, tokens/s, steady time left: task fields `rate` and `left`) with
    the best and worst SAE on the line under it."""

    def __init__(self, board: SaeBoard):
        self.board = board  # before Progress starts rendering
        super().__init__(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[rate]} tok/s"),
            TextColumn("{task.fields[left]} left"),
            console=console(),
        )

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        for line in self.board.lines():
            yield Text(line, no_wrap=True, overflow="ellipsis")


@contextmanager
def step(description: str, total: float | None = None) -> Iterator["Step"]:
    """A spinner (or, with `total`, a bar) and the elapsed time for one step of the sweep (writing
    the dataset, splicing, baselines, export); `advance` moves the bar."""
    columns = [SpinnerColumn(), TimeElapsedColumn(table_column=Column(no_wrap=True, min_width=7))]
    if total is not None:
        columns += [TextColumn("{task.completed:.0f}/{task.total:.0f}", table_column=Column(no_wrap=True))]
    what = TextColumn("{task.description}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis"))
    with Progress(*columns, what, console=console(), transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield Step(progress, task)
        if total is not None:
            progress.update(task, completed=total)


class Step:
    """One step's bar, as `step` yields it."""

    def __init__(self, progress: Progress, task) -> None:
        self.progress, self.task = progress, task

    def advance(self, amount: float = 1, description: str | None = None) -> None:
        self.progress.update(self.task, advance=amount, **({"description": description} if description else {}))
