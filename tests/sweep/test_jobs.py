"""Sweeps as Ray jobs on a real cluster started with `ray start --head` on 127.0.0.1:
submit, status, logs and stop through the CLI."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, serve

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A one-node Ray cluster with its Jobs API, as `ray start --head` makes it. `ray start` exits 1
    both when a port picked free is taken before Ray binds it and when the node misses Ray's 30 s
    start-up on a loaded machine: `serve` starts it again on fresh ports."""
    # the cluster's nodes run the Python that has dictsweep's dependencies, as a cluster image does
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }

    def launch() -> tuple[subprocess.Popen, str, Path]:
        temp = tmp_path_factory.mktemp("rayhead")
        port, dashboard = free_port(), free_port()
        # --block keeps `ray start` in the foreground, heading a process group of its own: stopping that
        # group stops this cluster alone (`ray stop` would also stop the session's other local cluster,
        # and with it every test process connected to it)
        with open(temp / "ray-start.log", "w") as log:
            head = subprocess.Popen(
                [
                    RAY,
                    "start",
                    "--head",
                    "--block",
                    "--node-ip-address",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--dashboard-host",
                    "127.0.0.1",
                    "--dashboard-port",
                    str(dashboard),
                    "--num-cpus",
                    "4",
                    "--temp-dir",
                    str(temp),
                    "--disable-usage-stats",
                    *own_ports(),
                ],
                env=env,
                start_new_session=True,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        head.address = f"http://127.0.0.1:{dashboard}"
        return head, head.address + "/api/version", temp / "ray-start.log"

    head = serve(launch, 120, stop_group)
    try:
        yield head.address
    finally:
        stop_group(head)


def own_ports() -> list[str]:
    """Free ports for the head's agents: their defaults (52365, ...) are taken by another local
    cluster when one runs (the session's `ray_local`), and a head without its agent takes no jobs."""
    options = [
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--metrics-export-port",
        "--runtime-env-agent-port",
        "--ray-client-server-port",
        "--node-manager-port",
        "--object-manager-port",
    ]
    return [part for option in options for part in (option, str(free_port()))]


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group `process` heads, SIGKILL to what is left after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def cli(*args, check=True):
    out = subprocess.run(
        [sys.executable, "-m", "dictsweep.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    if check and out.returncode != 0:
        raise AssertionError(out.stderr)
    return out


def job_spec(folder: Path, name: str, tokens: int) -> str:
    spec = {
        "name": name,
        "data": {
            "uri": str(folder / "data"),
            "synth": {
                "d_model": 16,
                "n_features": 32,
                "active": 3,
                "rows": 8192,
                "eval_rows": 1024,
                "shard_rows": 2048,
            },
        },
        "grid": {"architecture": ["relu"], "n_latents": [32], "l1_coef": [1.0, 3.0], "lr": [0.003]},
        "train": {"tokens": tokens, "batch_rows": 256, "log_every_tokens": 4096, "eval_tokens": 1024, "kernel": "bmm"},
        "select": {"l0": [0.5, 16], "max_fvu": 2.0, "max_dead_fraction": 1.0},  # a few thousand tokens: lenient bounds
        "tracking": {"uri": f"sqlite:///{folder}/mlflow.db"},
        "storage": {"dir": str(folder / "sweeps" / name)},
        "export": {"dir": str(folder / "dictionaries" / name)},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def wait_status(job_id: str, address: str, wanted: set[str], seconds: float = 600) -> str:
    deadline = time.time() + seconds
    while time.time() < deadline:
        state = cli("status", job_id, "--address", address).stdout.split(":")[1].split()[0]
        if state in wanted:
            return state
        time.sleep(1)
    raise AssertionError(f"{job_id} never reached {wanted}")


def test_submit_status_logs(tmp_path, ray_head):
    spec = job_spec(tmp_path, "jobbed", tokens=8192)
    job_id = cli("submit", spec, "--address", ray_head, "--set", "train.tokens=16384").stdout.strip()
    assert job_id.startswith("dictsweep-jobbed-")
    assert wait_status(job_id, ray_head, {"SUCCEEDED", "FAILED"}) == "SUCCEEDED", cli(
        "logs", job_id, "--address", ray_head
    ).stdout
    logs = cli("logs", job_id, "--address", ray_head).stdout
    assert "sweep results" in logs and "relu" in logs
    index = json.loads((tmp_path / "dictionaries/jobbed/index.json").read_text())
    assert index and all(entry["selected"] for entry in index)

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("jobbed").experiment_id])
    parent = [r for r in runs if r.data.tags.get("dictsweep.role") == "sweep"][0]
    assert parent.data.tags["dictsweep.job_id"] == job_id
    assert parent.data.params["train.tokens"] == "16384"  # the --set override travelled with the spec


def test_stop_and_unknown_job(tmp_path, ray_head):
    spec = job_spec(tmp_path, "stopped", tokens=4_000_000)
    job_id = cli("submit", spec, "--address", ray_head).stdout.strip()
    wait_status(job_id, ray_head, {"RUNNING"})
    assert "stopping" in cli("stop", job_id, "--address", ray_head).stdout
    assert wait_status(job_id, ray_head, {"STOPPED", "FAILED", "SUCCEEDED"}) == "STOPPED"
    missing = cli("status", "no-such-job", "--address", ray_head, check=False)
    assert missing.returncode == 2 and "no job 'no-such-job'" in missing.stderr
    nowhere = cli("status", job_id, "--address", f"http://127.0.0.1:{free_port()}", check=False)
    assert nowhere.returncode == 2 and "no Ray Jobs API answers there" in nowhere.stderr
