"""A local Ray started for a sweep greets the user with nothing they cannot act on."""

import os
import subprocess
import sys

START_AND_STOP = """
from dictsweep.cluster import start_ray
import ray
start_ray(None, num_cpus=1)
ray.shutdown()
print("started")
"""


def test_local_ray_starts_without_the_token_auth_note(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["HOME"] = str(tmp_path)  # Ray keeps the token it makes for its cluster under ~/.ray
    done = subprocess.run(
        [sys.executable, "-c", START_AND_STOP], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0 and "started" in done.stdout, done.stderr[-2000:]
    assert "Token authentication" not in done.stderr + done.stdout
    assert (tmp_path / ".ray" / "auth_token").exists()  # Ray's token auth is still on: only the note is gone


RELEASE_AND_WATCH = """
import time
import numpy as np
import ray
from ray._private.internal_api import get_memory_info_reply, get_state_from_address
from dictsweep.cluster import start_ray
start_ray(None, num_cpus=1)
state = get_state_from_address(ray.get_runtime_context().gcs_address)
used = lambda: get_memory_info_reply(state).store_stats.object_store_bytes_used
freed = 0
for trial in range(5):
    window = ray.put(np.ones(8 << 20, np.uint8))  # a window of 8 MB in the object store
    assert used() >= 8 << 20
    del window
    time.sleep(0.3)
    freed += used() < 8 << 20
ray.shutdown()
print("freed", freed)
"""


def test_local_ray_frees_released_windows_within_a_fraction_of_a_second(tmp_path):
    # Ray's default frees once a second: a released window would be gone within 0.3 s about 3 times in 10
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["HOME"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", RELEASE_AND_WATCH], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split("freed")[-1]) >= 4, done.stdout
