"""A local Ray started for a sweep greets the user with nothing they cannot act on."""

import json
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


CLUSTER_CONFIG = """
import json
import ray
from ray._private.state import GlobalState
from ray._raylet import GcsClientOptions
from dictsweep.cluster import start_ray
start_ray(None, num_cpus=1)
state = GlobalState()
state._initialize_global_state(GcsClientOptions.create(
    ray.get_runtime_context().gcs_address, None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False
))
print("config", json.dumps(state.get_system_config()))
ray.shutdown()
"""


def test_local_ray_runs_with_the_streams_freeing_period(tmp_path):
    """The cluster's own record of its system config (GCS's, which every node of it reads) holds
    LOCAL_RAY_CONFIG: released windows are freed every 50 ms, not once a second. What that does to
    the object store's peak is measured by `dictsweep bench stream` (object_store_peak_mb against
    windows_per_node x window_mb), not timed here."""
    from dictsweep.cluster import LOCAL_RAY_CONFIG

    env = {key: value for key, value in os.environ.items() if key not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["HOME"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", CLUSTER_CONFIG], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.loads(done.stdout.split("config", 1)[1])
    assert LOCAL_RAY_CONFIG.items() <= config.items(), config
