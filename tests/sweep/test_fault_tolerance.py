"""Crashes lose nothing: a killed trainer or reader, a dead driver, a diverging SAE, an MLflow outage."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from dictsweep import load_dictionary
from dictsweep.spec_file import load_spec
from dictsweep.errors import RunError
from dictsweep.sweep.run import run_sweep

from tests import conftest

SPEC = {
    "data": {
        "uri": "data/toy",
        "synth": {
            "d_model": 16,
            "n_features": 32,
            "active": 3,
            "rows": 16_384,
            "eval_rows": 1024,
            "shard_rows": 2048,
            "seed": 2,
        },
    },
    "grid": {
        "architecture": ["relu", "topk"],
        "n_latents": [32],
        "l1_coef": [1.0, 3.0],
        "k": [3],
        "lr": [0.003],
        "seed": [0],
    },
    "train": {
        "tokens": 65_536,
        "batch_rows": 256,
        "lr_warmup_steps": 5,
        "log_every_tokens": 8192,
        "eval_tokens": 1024,
        "kernel": "bmm",
        "checkpoint_every_tokens": 4096,
    },
    "stream": {"shuffle_shards": 2, "batches_in_flight": 4},
    "resources": {"torch_threads": 1},
    "export": {"registry": False},
}


def spec_file(folder, name, **changes):
    return conftest.spec_file(folder, SPEC, name, **changes)


def weights(result):
    return {name: load_dictionary(done.uri) for name, done in result.finished.items()}


def assert_same_dictionaries(first, second):
    assert set(first) == set(second)
    for name in first:
        for weight in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(first[name], weight), getattr(second[name], weight)), (name, weight)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, ray_local):
    folder = tmp_path_factory.mktemp("straight")
    os.chdir(folder)
    result = run_sweep(load_spec(spec_file(folder, "straight")))
    return weights(result)


class Killer(threading.Thread):
    """Once `ready()` holds, SIGKILL the process `find_pid()` names; `killed` says whether it did
    (a test whose process was never killed proves nothing)."""

    def __init__(self, ray, find_pid, ready, seconds=180):
        super().__init__(daemon=True)
        self.ray, self.find_pid, self.ready, self.seconds = ray, find_pid, ready, seconds
        self.killed: int | None = None
        self.start()

    def run(self):
        deadline = time.time() + self.seconds
        while time.time() < deadline:
            try:
                if self.ready():
                    pid = self.find_pid()
                    os.kill(pid, signal.SIGKILL)
                    self.killed = pid
                    return
            except (ValueError, IndexError, self.ray.exceptions.RayError):
                pass  # not started yet, or between a wave's trainers
            time.sleep(0.2)


def test_killed_trainer_resumes_bit_for_bit(tmp_path, monkeypatch, ray_local, uninterrupted):
    monkeypatch.chdir(tmp_path)
    name = "killtrainer"

    def trainer():
        return ray_local.get_actor(f"{name}-w0-t0")

    def checkpointed():
        return ray_local.get(trainer().status.remote())["position"] >= 40  # past a few checkpoints

    killer = Killer(ray_local, lambda: ray_local.get(trainer().status.remote())["pid"], checkpointed)
    result = run_sweep(load_spec(spec_file(tmp_path, name)))
    killer.join()
    assert killer.killed, "the trainer was never killed"
    assert not result.failed
    assert_same_dictionaries(weights(result), uninterrupted)
    checkpoints = list((tmp_path / "sweeps" / name).glob("runs/*/checkpoints/w0-t0.pt"))
    assert checkpoints  # the checkpoint the restart resumed from


def test_killed_reader_skips_and_repeats_nothing(tmp_path, monkeypatch, ray_local, uninterrupted):
    monkeypatch.chdir(tmp_path)
    from ray._private.state import actors  # from the GCS: the state API needs a dashboard, which tests run without

    def reader_pid():
        readers = [
            actor
            for actor in actors().values()
            if actor["ActorClassName"] == "WindowReader" and actor["State"] == "ALIVE"
        ]
        return int(readers[0]["Pid"])

    def training():
        trainer = ray_local.get_actor("killreader-w0-t0")
        return ray_local.get(trainer.status.remote())["position"] >= 20

    killer = Killer(ray_local, reader_pid, training)
    result = run_sweep(load_spec(spec_file(tmp_path, "killreader")))
    killer.join()
    assert killer.killed, "no reader was ever killed"
    assert not result.failed
    assert_same_dictionaries(weights(result), uninterrupted)


def test_diverging_sae_is_isolated(tmp_path, monkeypatch, ray_local, uninterrupted):
    monkeypatch.chdir(tmp_path)
    path = spec_file(tmp_path, "diverge", grid__architecture=["relu"], grid__lr=[0.003, 1e30])
    with pytest.raises(RunError) as raised:
        run_sweep(load_spec(path))
    result = raised.value.result
    assert set(result.failed) == {"relu-n32-l1_1-lr1e+30-s0", "relu-n32-l1_3-lr1e+30-s0"}
    assert all(why.startswith("diverged") for why in result.failed.values())
    # the healthy members shared the ensemble with the diverging ones and trained as if alone
    healthy = weights(result)
    assert set(healthy) == {"relu-n32-l1_1-lr0.003-s0", "relu-n32-l1_3-lr0.003-s0"}
    for name, dictionary in healthy.items():
        torch.testing.assert_close(dictionary.W_dec, uninterrupted[name].W_dec, rtol=1e-5, atol=1e-6)


def test_dead_driver_resumes(tmp_path, ray_local, uninterrupted):
    """The driver process is killed mid-sweep; `run --resume` finishes from the checkpoints."""
    path = spec_file(tmp_path, "resumed", grid__architecture=["relu"])
    command = [sys.executable, "-m", "dictsweep.cli", "run", path]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    driver = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    checkpoints = tmp_path / "sweeps" / "resumed"
    while time.time() < deadline and not list(checkpoints.glob("runs/*/checkpoints/w0-t0.pt")):
        assert driver.poll() is None, driver.stderr.read().decode()
        time.sleep(0.2)
    time.sleep(1.0)
    driver.kill()
    driver.wait()
    assert not list(checkpoints.glob("runs/*/complete.json"))
    resumed = subprocess.run(command + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    run_dir = json.loads((checkpoints / "latest.json").read_text())["run"]
    assert len(list(checkpoints.glob("runs/*"))) == 1  # the same run, continued
    index = json.loads((tmp_path / "dictionaries/resumed/index.json").read_text())
    for entry in index:
        resumed_dictionary = load_dictionary(os.path.join(run_dir, "dictionaries", entry["path"]))
        for weight in ("W_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(resumed_dictionary, weight), getattr(uninterrupted[entry["path"]], weight))


def test_mlflow_outage_loses_no_metric(tmp_path, monkeypatch, ray_local):
    """The tracking server goes away mid-sweep and comes back: training never stops, and every
    metric and artifact reaches it in the end."""
    from mlflow import MlflowClient

    from tests.conftest import free_port, mlflow_command, wait_for

    monkeypatch.chdir(tmp_path)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    command = mlflow_command(port, tmp_path / "outage.db", str(tmp_path / "artifacts"))

    def start():
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(uri + "/health", 180, server)
        return server

    servers = [start()]

    def outage():
        client = MlflowClient(uri)
        deadline = time.time() + 300
        while time.time() < deadline:  # wait until training metrics are flowing
            try:
                experiment = client.get_experiment_by_name("outage")
                runs = client.search_runs([experiment.experiment_id]) if experiment else []
                if any("loss" in run.data.metrics for run in runs):
                    break
            except Exception:
                pass
            time.sleep(0.5)
        os.killpg(servers[0].pid, signal.SIGKILL)
        servers[0].wait()
        time.sleep(15)  # the sweep goes on without MLflow
        servers.append(start())

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    try:
        result = run_sweep(
            load_spec(
                spec_file(
                    tmp_path,
                    "outage",
                    grid__architecture=["relu"],
                    train__tokens=262_144,
                    train__log_every_tokens=8192,
                    train__checkpoint_every_tokens=0,
                ),
                [f"tracking.uri={uri}"],
            )
        )
        thread.join()
        assert len(servers) == 2  # there was an outage, and the sweep outlived it
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("outage")
        for name, done in result.finished.items():
            history = client.get_metric_history(done.run_id, "loss")
            assert [m.step for m in history] == list(range(8192, 262_144 + 1, 8192)), name
            assert [a.path for a in client.list_artifacts(done.run_id)] == ["dictionary", "plots"]
            assert client.get_run(done.run_id).info.status == "FINISHED"
        assert experiment is not None
    finally:
        for server in servers:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
