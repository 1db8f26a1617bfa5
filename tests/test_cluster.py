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
    done = subprocess.run([sys.executable, "-c", START_AND_STOP], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0 and "started" in done.stdout, done.stderr[-2000:]
    assert "Token authentication" not in done.stderr + done.stdout
    assert (tmp_path / ".ray" / "auth_token").exists()  # Ray's token auth is still on: only the note is gone
