"""Real services for the tests that need them: a local Ray cluster and an MLflow tracking server
process on 127.0.0.1. Each starts once per session, on first use, and stops at the end."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture
def one_thread():
    """Tiny matmuls: a second thread only adds synchronisation (minutes on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run the `dictsweep` entry point on these arguments: (exit code, what it printed)."""
    from dictsweep import cli

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["dictsweep", *args])
        try:
            cli.main()
            code = 0
        except SystemExit as exit:
            code = exit.code
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    return run


def spec_file(folder: Path, base: dict, name: str, **changes) -> str:
    """Write the sweep spec `base` named `name` to `folder`, with `section__field=value` changes."""
    import json

    import yaml

    spec = json.loads(json.dumps(base))
    spec["name"] = name
    for key, value in changes.items():
        section, field = key.split("__")
        spec[section][field] = value
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, seconds: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {seconds} s")


def serve(
    launch: Callable[[], tuple[subprocess.Popen, str, Path]],
    seconds: float,
    stop: Callable[[subprocess.Popen], None],
) -> subprocess.Popen:
    """A server process answering at its health URL. `launch()` starts one on ports picked free just
    before and returns (process, health URL, its log file); another process may take such a port
    first, and the server then exits: it is launched again, twice at most (a server that is only
    slow is not). A last failure says what the server printed."""
    for attempt in range(3):
        process, url, log = launch()
        try:
            wait_for(url, seconds, process)
            return process
        except RuntimeError as error:
            exited = process.poll() is not None
            stop(process)
            if attempt == 2 or not exited:
                raise RuntimeError(f"{error}; it printed:\n{log.read_text()[-3000:]}") from None


S3_SECRET = "test-secret-key-value-7f3a9c"  # tests check that this never shows up in logs or MLflow


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto's server mode) on 127.0.0.1, reached through s3fs as AWS S3 is:
    the standard AWS environment variables point at it for this process and its children."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "test-key-id",
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
        }
    )
    yield endpoint
    server.stop()


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket for one test; its name is returned."""
    from dictsweep.store import fs

    name = "t-" + "".join(ch for ch in request.node.name.lower() if ch.isalnum())[:40]
    s3, _ = fs.resolve(f"s3://{name}")
    if not s3.exists(name):
        s3.mkdir(name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray cluster for this test session (logical CPUs above the 2 real cores, so that
    trainers, readers and broadcasters all fit, as in `dictsweep run`). Started after the S3
    server so that its workers see the same storage settings as the driver."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()


def mlflow_command(port: int, store: Path, artifacts: str) -> list[str]:
    """`mlflow server` on 127.0.0.1:`port`, one worker, a sqlite store at `store`, serving the
    artifacts it keeps at `artifacts` (a folder or an S3 URI)."""
    return [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{store}",
        "--artifacts-destination",
        artifacts,
    ]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server):
    """A real `mlflow server` process on 127.0.0.1 with a sqlite store, serving artifacts that it
    keeps in the S3 server (as a production server keeps them in S3 or MinIO)."""
    from dictsweep.store import fs

    root = tmp_path_factory.mktemp("mlflow-server")
    s3, _ = fs.resolve("s3://mlflow-artifacts")
    if not s3.exists("mlflow-artifacts"):
        s3.mkdir("mlflow-artifacts")

    def launch() -> tuple[subprocess.Popen, str, Path]:
        port = free_port()
        with open(root / "server.log", "w") as log:
            command = mlflow_command(port, root / "mlflow.db", "s3://mlflow-artifacts/served")
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        process.uri = f"http://127.0.0.1:{port}"
        return process, f"{process.uri}/health", root / "server.log"

    def stop(process: subprocess.Popen) -> None:
        process.terminate()
        process.wait(timeout=30)

    process = serve(launch, 120, stop)
    try:
        yield process.uri
    finally:
        stop(process)
