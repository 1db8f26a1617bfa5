"""The one module that talks to MLflow, against real stores: a fresh sqlite store that several
drivers open at once, points sent again after a driver died sent once, and a server that hangs up
in the middle of its answers."""

import os
import signal
import socket
import subprocess
import sys
import threading

import pytest
from mlflow.entities import Metric

from dictsweep.errors import Interrupted, stopped_by_signals
from dictsweep.track import Tracker
from dictsweep.track_server import unreachable

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
    tracker.set_tags(run, {"dictsweep.error": "node lost", "dictsweep.point": "sae"})
    tracker.end_run(run, status="KILLED")
    tracker.flush()
    assert tracker.statuses()[run] == "KILLED"
    tracker.reopen(run)
    assert tracker.statuses()[run] == "RUNNING"
    tags = tracker.client.get_run(run).data.tags
    assert "dictsweep.error" not in tags and tags["dictsweep.point"] == "sae"  # why it ended goes, the rest stays
    tracker.reopen(run)  # a run without those tags reopens too


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


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 in front of a real server. Each request goes through whole; the next
    `cuts` answers stop two bytes short and the connection closes, as when a server is killed while
    it answers (the request was served: what it wrote is stored)."""

    def __init__(self, upstream: str):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.cuts = 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            connection, _ = self.listener.accept()
            threading.Thread(target=self.answer, args=(connection,), daemon=True).start()

    @staticmethod
    def read_message(sock: socket.socket) -> bytes:
        """One HTTP message with a Content-Length (or none) body, whole."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
            0,
        )
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body

    def answer(self, client: socket.socket) -> None:
        with client:
            request = self.read_message(client)
            if not request:
                return
            head, body = request.split(b"\r\n\r\n", 1)
            lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
            with socket.create_connection(self.upstream) as server:
                server.sendall(b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + body)
                reply = self.read_message(server)
            head, body = reply.split(b"\r\n\r\n", 1)
            lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
            reply = b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + body
            with self.lock:
                cut, self.cuts = self.cuts > 0, max(self.cuts - 1, 0)
            client.sendall(reply[:-2] if cut else reply)


def test_a_server_that_hangs_up_mid_answer_is_an_outage_and_a_resent_write_adds_nothing(mlflow_server):
    """The tracking server killed while it answers: the client reads a broken answer (IncompleteRead).
    That is an outage like a refused connection: the writes stay queued, training goes on, and sent
    again they leave each point in the run once; a run whose creation was answered so is made once."""
    from mlflow.exceptions import MlflowException

    proxy = CuttingProxy(mlflow_server)
    tracker = Tracker(proxy.uri, "hang-up", patience=30.0)
    tracker.start_sweep("hang-up", {})
    run = tracker.start_sae("sae", {})
    proxy.cuts = 1
    with pytest.raises(MlflowException) as broken:
        tracker.client.log_batch(run, metrics=[Metric("loss", 9.0, 0, 1)])
    assert "IncompleteRead" in str(broken.value) and unreachable(broken.value)
    with pytest.raises(MlflowException) as refused:  # an answer of the server's own: not an outage
        Tracker(mlflow_server, "hang-up").client.get_run("0" * 32)
    assert not unreachable(refused.value)

    for step in (100, 200):
        tracker.log_metrics(run, {"loss": step / 100}, step)
    proxy.cuts = 1_000_000
    assert tracker.flush() is False  # the first batch reached the store; its answer did not come back
    assert len(tracker.queue) == 2
    proxy.cuts, tracker.retry_at = 0, 0.0
    assert tracker.flush() is True
    history = tracker.client.get_metric_history(run, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 9.0), (100, 1.0), (200, 2.0)]

    proxy.cuts = 1  # the answer to the creation is lost, then the server is back
    second = tracker.start_sae("second", {"lr": 0.1})
    named = tracker.client.search_runs([tracker.experiment_id], "attributes.run_name = 'second'")
    assert [found.info.run_id for found in named] == [second]
    assert tracker.client.get_run(second).data.params == {"lr": "0.1"}
