"""The console during a sweep: a time-left estimate that stays steady, the best and worst SAE line,
and step bars."""

import io

import pytest
from rich.console import Console

from dictsweep.sweep import progress as progress_module
from dictsweep.sweep.progress import RateEstimate, SaeBoard, TrainingProgress, clock, step


def test_time_left_is_steady_through_a_stall_and_a_burst():
    """1000 tokens/s with a 3 s stall and a catch-up burst: the naive estimate (what is left over
    the last interval's rate) swings far; the smoothed one stays within 25% of the truth."""
    total, estimate = 200_000, RateEstimate(200_000, warmup_seconds=5, now=0.0)
    done, lefts, naive = 0.0, [], []
    for second in range(1, 150):
        rate = 0 if 60 <= second < 63 else 4000 if 63 <= second < 64 else 1000
        previous, done = done, done + rate
        estimate.update(done, now=float(second))
        left = estimate.seconds_left(done)
        if second >= 10:
            truth = (total - done) / 1000
            lefts.append(left / truth if truth > 20 else 1.0)
            naive.append((total - done) / max(done - previous, 1) / truth if truth > 20 else 1.0)
    assert max(abs(ratio - 1) for ratio in lefts) < 0.25
    assert max(abs(ratio - 1) for ratio in naive) > 10  # what a per-interval estimate would show


def test_no_estimate_during_warm_up():
    estimate = RateEstimate(1000, warmup_seconds=5, now=0.0)
    estimate.update(500, now=2.0)
    assert estimate.seconds_left(500) is None and clock(None) == "-:--:--"
    estimate.update(500, now=6.0)
    estimate.update(600, now=7.0)
    assert estimate.seconds_left(600) == pytest.approx(4.0)
    assert clock(3725.4) == "1:02:05"


def test_nothing_left_once_done_even_before_a_rate():
    """A sweep shorter than the warm-up ends its bar at 0:00:00 left, not at an unknown time."""
    estimate = RateEstimate(1000, warmup_seconds=5, now=0.0)
    estimate.update(1000, now=1.0)
    assert estimate.seconds_left(999) is None and clock(estimate.seconds_left(1000)) == "0:00:00"


def test_board_names_best_and_worst():
    board = SaeBoard()
    assert board.lines() == ["no SAE has logged yet"]
    board.add(
        [
            {"name": "relu-a", "tokens": 10, "metrics": {"loss": 0.5, "l0": 12.0, "dead_fraction": 0.25}},
            {"name": "topk-b", "tokens": 10, "metrics": {"loss": 0.2, "l0": 8.0, "dead_fraction": 0.0}},
            {"name": "relu-a", "tokens": 20, "metrics": {"loss": 0.9, "l0": 30.0, "dead_fraction": 0.5}},
        ]
    )
    assert board.lines() == ["best  topk-b  loss 0.2  L0 8.0  dead 0%", "worst relu-a  loss 0.9  L0 30.0  dead 50%"]


def test_bars_print_what_they_did(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(progress_module, "console", lambda: Console(file=out, width=80))
    with step("splicing 3 dictionaries", total=3) as bar:
        for _ in range(3):
            bar.advance()
    board = SaeBoard()
    board.add([{"name": "relu-a", "tokens": 10, "metrics": {"loss": 0.5, "l0": 12.0, "dead_fraction": 0.25}}])
    with TrainingProgress(board) as bars:
        bars.add_task("wave 1/1 training", total=10, completed=10, rate="1,000", left="0:00:00")
    with step("writing 1,048,576 + 65,536 synthetic rows to /a/path/long/enough/to/pass/the/edge/of/the/console"):
        pass
    printed = out.getvalue()
    assert "splicing 3 dictionaries" in printed and "3/3" in printed
    [writing] = [line for line in printed.splitlines() if "writing" in line]
    assert "0:00:00 writing 1,048,576" in writing and "console" not in writing  # the time stays, the path is cut
    assert "wave 1/1 training" in printed and "1,000 tok/s" in printed and "0:00:00 left" in printed
    assert "best  relu-a  loss 0.5  L0 12.0  dead 25%" in printed and "worst" not in printed
    assert all(len(line) <= 80 for line in printed.splitlines())
