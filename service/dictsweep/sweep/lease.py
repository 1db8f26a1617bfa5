"""One writer per sweep: a lease in the sweep's storage (`<storage.dir>/lease.json`), taken before
anything of the sweep is written and renewed by a heartbeat while the driver runs.

A lease is live while its heartbeat is younger than STALE_SECONDS and, when its holder runs on
this host, while that process exists. Taking one writes it, waits CONFIRM_SECONDS and reads it
back: of two drivers that start together, the one whose write came last keeps it and the other
stops (storage reads see the latest write: local files and S3 alike). `force` takes a live lease;
its old holder sees that at its next heartbeat and stops writing.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from dictsweep.errors import InputError, RunError
from dictsweep.store import fs

LEASE_NAME = "lease.json"
HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 60.0
CONFIRM_SECONDS = 1.0


def read_lease(uri: str) -> dict | None:
    """The lease at `uri` (None when there is none; an unreadable one counts as none)."""
    try:
        holder = json.loads(fs.read_text(uri))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None  # a torn or foreign file holds nothing
    return holder if isinstance(holder, dict) and isinstance(holder.get("driver"), str) else None


def is_live(holder: dict, now: float | None = None) -> bool:
    """Whether the lease's holder may still be writing: a recent heartbeat, and its process alive
    if it ran on this host."""
    heartbeat = holder.get("heartbeat")
    if not isinstance(heartbeat, (int, float)) or (now or time.time()) - heartbeat > STALE_SECONDS:
        return False
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # someone else's process, alive
    return True


def describe(holder: dict) -> str:
    age = time.time() - holder["heartbeat"] if isinstance(holder.get("heartbeat"), (int, float)) else float("nan")
    return f"driver {holder.get('driver')} on {holder.get('host')} (pid {holder.get('pid')}, heartbeat {age:.0f} s ago)"


class Lease:
    """This driver's hold on a sweep's storage; `check()` raises once another driver has taken it."""

    def __init__(self, storage_dir: str, heartbeat_seconds: float = HEARTBEAT_SECONDS):
        self.uri = fs.join(storage_dir, LEASE_NAME)
        now = time.time()
        self.holder = {
            "driver": uuid.uuid4().hex[:12],
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": now,
            "heartbeat": now,
        }
        self.heartbeat_seconds = heartbeat_seconds
        self.taken_by: dict | None = None  # the driver that took the lease from this one
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def take(self, force: bool = False) -> Lease:
        """Hold the lease, or InputError naming the live driver that holds it."""
        current = read_lease(self.uri)
        if current is not None and not force and is_live(current):
            raise InputError(
                f"{self.uri}: this sweep is being run by {describe(current)}; wait for it to end, "
                f"or, if it is dead, pass --force (a lease without heartbeat for {STALE_SECONDS:.0f} s "
                "is taken over without)"
            )
        self.write()
        time.sleep(CONFIRM_SECONDS)  # a driver that started with us writes within this time
        current = read_lease(self.uri)
        if current is None or current["driver"] != self.holder["driver"]:
            raise InputError(
                f"{self.uri}: {describe(current) if current else 'another driver'} took this sweep "
                "at the same moment; it runs the sweep"
            )
        self.thread = threading.Thread(target=self.beat, name="dictsweep-lease", daemon=True)
        self.thread.start()
        return self

    def write(self) -> None:
        self.holder["heartbeat"] = time.time()
        fs.write_text(self.uri, json.dumps(self.holder))

    def beat(self) -> None:
        """Renew the heartbeat until released, unless another driver took the lease."""
        while not self.stopped.wait(self.heartbeat_seconds):
            try:
                current = read_lease(self.uri)
                if current is not None and current["driver"] != self.holder["driver"]:
                    self.taken_by = current
                    return
                self.write()
            except Exception:  # storage hiccup: the next beat tries again; staleness allows for it
                continue

    def check(self) -> None:
        """RunError once another driver has taken the lease (it was forced): stop writing."""
        if self.taken_by is not None:
            raise RunError(
                f"{self.uri}: {describe(self.taken_by)} took over this sweep (--force); this driver stops writing"
            )

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this driver's."""
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(timeout=30)
        current = read_lease(self.uri)
        if current is not None and current["driver"] == self.holder["driver"]:
            fs.remove(self.uri)
