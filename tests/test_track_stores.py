"""The one module that talks to MLflow, against real stores: a fresh sqlite store that several
drivers open at once, and points sent again after a driver died sent once."""

import os
import signal
import subprocess
import sys

import pytest
from mlflow.entities import Metric

from dictsweep.errors import Interrupted, stopped_by_signals
from dictsweep.track import Tracker

OPEN = """
import sys
from dictsweep.track import Tracker
Tracker(sys.argv[1], sys.argv[2]).start_sweep(sys.argv[2], {"x": 1})
"""


def test_drivers_opening_a_fresh_sqlite_store_together_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path}/fresh.db"
    drivers = [
        subprocess.Popen([sys.executable, "-c", OPEN, uri, name], stderr=subprocess.PIPE, text=True)
        for name in ("a", "b", "a")
    ]  # two of them make the same experiment
    errors = [driver.communicate(timeout=600)[1] for driver in drivers]
    assert [driver.returncode for driver in drivers] == [0, 0, 0], errors
    tracker = Tracker(uri, "a")
    assert len(tracker.client.search_runs([tracker.experiment_id])) == 2


def test_log_missing_sends_only_what_the_run_lacks(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/m.db", "points")
    tracker.start_sweep("points", {})
    run = tracker.start_sae("sae", {})
    tracker.log_metrics(run, {"loss": 1.0, "l0": 5.0}, 100)
    tracker.flush()
    stored = {100: {"loss": 1.0, "l0": 5.0}, 200: {"loss": 0.5, "l0": 4.0}, 300: {"loss": 0.25, "l0": 3.0}}
    assert tracker.log_missing(run, stored) == 4
    tracker.flush()
    assert tracker.log_missing(run, stored) == 0
    for key in ("loss", "l0"):
        history = tracker.client.get_metric_history(run, key)
        assert sorted((m.step, m.value) for m in history) == [(step, stored[step][key]) for step in (100, 200, 300)]
    tracker.end_run(run, status="KILLED")
    tracker.flush()
    assert tracker.statuses()[run] == "KILLED"
    tracker.reopen(run)
    assert tracker.statuses()[run] == "RUNNING"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_during_a_write_lets_the_write_land_then_stops(tmp_path, signum):
    """MLflow's sqlite store turns any exception inside its session into an MlflowException: a stop
    raised there would come out as a crash (exit 1, a traceback) with the write half done."""
    tracker = Tracker(f"sqlite:///{tmp_path}/m.db", "stopped")
    tracker.start_sweep("stopped", {})
    run = tracker.start_sae("sae", {})

    def write_while_stopped():
        os.kill(os.getpid(), signum)  # delivered at once, in the middle of the write
        tracker.client.log_batch(run, metrics=[Metric("loss", 1.0, 0, 100)])

    tracker.later("the write", write_while_stopped)
    with stopped_by_signals(), pytest.raises(Interrupted) as stop:
        tracker.flush()
    assert stop.value.exit_code == 128 + signum
    assert [(m.step, m.value) for m in tracker.client.get_metric_history(run, "loss")] == [(100, 1.0)]
    assert not tracker.queue  # sent, so not sent again by the next flush


def test_registering_a_run_again_adds_no_version(tmp_path):
    """A driver stopped while finishing registers again on --resume: still one version per run."""
    tracker = Tracker(f"sqlite:///{tmp_path}/m.db", "registry")
    tracker.start_sweep("registry", {})
    first, second = tracker.start_sae("a", {}), tracker.start_sae("b", {})
    for run in (first, second, first):
        tracker.register("registry", run, {"l0": 5.0})
    tracker.flush()
    versions = tracker.client.search_model_versions("name = 'registry'")
    assert sorted(version.run_id for version in versions) == sorted([first, second])
