"""One writer per sweep: the lease in the sweep's storage, between real processes, locally and on S3."""

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from dictsweep.errors import InputError, RunError
from dictsweep.store import fs
from dictsweep.sweep.lease import STALE_SECONDS, Lease, read_lease

HOLD = """
import sys, time
from dictsweep.errors import InputError
from dictsweep.sweep.lease import Lease
try:
    lease = Lease(sys.argv[1]).take()
except InputError as error:
    print("REFUSED", error, flush=True)
    sys.exit(2)
print("TAKEN", lease.holder["driver"], flush=True)
time.sleep(float(sys.argv[2]))
lease.release()
"""


def holder(storage: str, seconds: float = 120) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD, storage, str(seconds)], stdout=subprocess.PIPE, text=True)


def storages(tmp_path, request):
    return (
        str(tmp_path / "sweeps" / "s")
        if request.param == "local"
        else f"s3://{request.getfixturevalue('bucket')}/sweeps/s"
    )


@pytest.fixture(params=["local", "s3"])
def storage(tmp_path, request):
    return storages(tmp_path, request)


def test_a_live_driver_keeps_its_sweep_and_a_dead_one_is_taken_over(storage):
    first = holder(storage)
    try:
        assert first.stdout.readline().startswith("TAKEN")
        with pytest.raises(InputError) as raised:
            Lease(storage).take()
        message = str(raised.value)
        assert f"on {socket.gethostname()} (pid {first.pid}" in message and "--force" in message
        first.send_signal(signal.SIGKILL)  # dies holding the lease, its heartbeat still fresh
        first.wait()
        lease = Lease(storage).take()  # its process is gone: no need to wait for the heartbeat to age
        assert read_lease(lease.uri)["driver"] == lease.holder["driver"]
        lease.release()
        assert read_lease(lease.uri) is None
    finally:
        first.kill()


def test_a_lease_from_another_host_is_live_until_its_heartbeat_ages(storage):
    uri = fs.join(storage, "lease.json")
    other = {"driver": "elsewhere1", "host": "other-host", "pid": 1, "started": time.time()}
    fs.write_text(uri, json.dumps({**other, "heartbeat": time.time() - 5}))
    with pytest.raises(InputError, match="driver elsewhere1 on other-host"):
        Lease(storage).take()
    fs.write_text(uri, json.dumps({**other, "heartbeat": time.time() - STALE_SECONDS - 1}))
    Lease(storage).take().release()
    fs.write_text(uri, json.dumps({**other, "heartbeat": time.time()}))
    Lease(storage).take(force=True).release()


def test_the_driver_whose_lease_was_forced_stops(tmp_path):
    storage = str(tmp_path / "s")
    lease = Lease(storage, heartbeat_seconds=0.2).take()
    lease.check()
    forced = Lease(storage).take(force=True)
    deadline = time.time() + 30
    while lease.taken_by is None and time.time() < deadline:
        time.sleep(0.1)
    with pytest.raises(RunError, match=f"driver {forced.holder['driver']} .* took over"):
        lease.check()
    lease.release()  # leaves the new holder's lease alone
    assert read_lease(forced.uri)["driver"] == forced.holder["driver"]
    forced.release()


def test_two_drivers_starting_together_one_wins(storage):
    drivers = [holder(storage, seconds=20) for _ in range(3)]
    outcomes = [driver.stdout.readline().split()[0] for driver in drivers]
    for driver in drivers:
        driver.wait(timeout=60)
    assert sorted(outcomes) == ["REFUSED", "REFUSED", "TAKEN"], outcomes
    assert read_lease(fs.join(storage, "lease.json")) is None  # the winner released it
