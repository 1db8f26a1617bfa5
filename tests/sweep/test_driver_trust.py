"""A sweep's driver as a user meets it when things go wrong: killed mid-sweep (kill -9, SIGTERM,
Ctrl-C), started twice, fed a corrupt shard; and the checks that stop a bad sweep before Ray starts.
Real drivers (`dictsweep run` processes), a real local Ray, real MLflow stores."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from mlflow import MlflowClient

from dictsweep.errors import Interrupted, stopped_by_signals
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
    "grid": {"architecture": ["relu"], "n_latents": [32], "l1_coef": [1.0, 3.0], "lr": [0.003], "seed": [0]},
    "train": {
        "tokens": 65_536,
        "batch_rows": 256,
        "lr_warmup_steps": 5,
        "log_every_tokens": 2048,
        "eval_tokens": 1024,
        "kernel": "bmm",
        "checkpoint_every_tokens": 8192,
    },
    "stream": {"shuffle_shards": 2, "batches_in_flight": 4},
    "resources": {"torch_threads": 1},
    "export": {"registry": False},
}
KEYS = ("loss", "mse", "fvu", "l0", "dead_fraction")


def spec_file(folder, name, **changes):
    return conftest.spec_file(folder, SPEC, name, **changes)


def driver(folder, ray_local, *args, wait=False):
    """`dictsweep run ARGS` in its own process, joined to the test's Ray cluster."""
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "dictsweep.cli", "run", *args]
    if wait:
        return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    return subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_until(process, ready, seconds=300):
    deadline = time.time() + seconds
    while not ready():
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline, "the sweep never got there"
        time.sleep(0.2)


def curves(uri, sweep) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Every SAE's training curves in MLflow: point name -> metric -> [(step, value)] in step order."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(sweep)
    runs = client.search_runs([experiment.experiment_id], "tags.`dictsweep.role` = 'sae'")
    return {
        run.data.tags["dictsweep.point"]: {
            key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)) for key in KEYS
        }
        for run in runs
    }


def statuses(uri, sweep) -> dict[str, str]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(sweep)
    return {
        run.data.tags.get("dictsweep.point", "sweep"): run.info.status
        for run in client.search_runs([experiment.experiment_id])
    }


def stored_points(folder, sweep) -> int:
    return len(list((folder / "sweeps" / sweep).glob("runs/*/points/*/*.json")))


def test_killed_driver_then_resume_loses_no_curve_point(tmp_path, ray_local):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    straight = driver(tmp_path, ray_local, spec_file(tmp_path, "straight"), wait=True)
    assert straight.returncode == 0, straight.stderr
    expected = curves(uri, "straight")
    assert all(
        [step for step, _ in curve["loss"]] == list(range(2048, 65_536 + 1, 2048)) for curve in expected.values()
    )

    path = spec_file(tmp_path, "killed")
    first = driver(tmp_path, ray_local, path)
    checkpoints = tmp_path / "sweeps" / "killed"
    wait_until(
        first, lambda: stored_points(tmp_path, "killed") >= 12 and list(checkpoints.glob("runs/*/checkpoints/*"))
    )
    first.kill()  # SIGKILL: no handler runs; what it held in memory is gone
    first.wait()
    assert not list(checkpoints.glob("runs/*/complete.json"))
    assert statuses(uri, "killed")["sweep"] == "RUNNING"
    resumed = driver(tmp_path, ray_local, path, "--resume", wait=True)
    assert resumed.returncode == 0, resumed.stderr
    got = curves(uri, "killed")
    assert set(got) == set(expected)
    for name, curve in expected.items():
        for key in KEYS:
            assert [step for step, _ in got[name][key]] == [step for step, _ in curve[key]], (name, key)
            assert [value for _, value in got[name][key]] == pytest.approx(
                [value for _, value in curve[key]], rel=1e-5, abs=1e-7
            ), (name, key)
    assert set(statuses(uri, "killed").values()) == {"FINISHED"}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_ray_blocks_is_the_signals_stop(ray_local, signum):
    """The driver waits in ray.wait and ray.get most of the time. A signal that arrives there is
    handled when Ray returns to Python, inside Ray's own code, which turns the handler's exception
    into a SystemError or KeyboardInterrupt; the sweep must still stop as that signal (exit 143 /
    130, runs KILLED, the --resume hint), not as a crash or Click's "Aborted!" (exit 1)."""

    @ray_local.remote(num_cpus=0)
    def waits() -> None:
        time.sleep(3)

    ref = waits.remote()
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signum))
    stop = None
    try:
        with stopped_by_signals():
            timer.start()
            ray_local.get(ref)
    except Interrupted as error:
        stop = error
    except KeyboardInterrupt:  # caught here: pytest would take it for a Ctrl-C of the test session
        pytest.fail("the stop came out of ray.get as KeyboardInterrupt")
    finally:
        timer.cancel()
        # let the task end rather than cancel it: a cancel racing its reply can abort this process
        # (Ray's "it != submissible_tasks_.end()" check, ray-project/ray#54798)
        ray_local.wait([ref], timeout=30)
    assert stop is not None and stop.signum == signum and stop.exit_code == 128 + signum


def test_a_stop_signal_whose_exception_was_swallowed_still_stops():
    """Ray may swallow the handler's exception and return from ray.get as if nothing happened (seen
    when the signal comes while Ray starts a worker): the block still ends as that signal's stop."""
    stop = None
    try:
        with stopped_by_signals():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # the handler runs here
            except Interrupted:
                pass  # as Ray's own code may
    except Interrupted as error:
        stop = error
    assert stop is not None and stop.signum == signal.SIGTERM and stop.exit_code == 143


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stopped_driver_marks_its_runs_killed_and_says_how_to_resume(tmp_path, ray_local, signum, code):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = spec_file(tmp_path, "stopped")
    first = driver(tmp_path, ray_local, path)
    wait_until(first, lambda: stored_points(tmp_path, "stopped") >= 6)
    first.send_signal(signum)
    returncode = first.wait(timeout=120)
    message = first.stderr.read()
    assert returncode == code, message
    assert f"dictsweep run {path} --resume" in message and "Traceback" not in message, message
    before = statuses(uri, "stopped")
    assert "RUNNING" not in before.values() and before["sweep"] == "KILLED", before
    sent = curves(uri, "stopped")  # what it had taken from the trainers went out before it stopped
    assert all(len(curve["loss"]) >= 3 for curve in sent.values()), sent
    resumed = driver(tmp_path, ray_local, path, "--resume", wait=True)
    assert resumed.returncode == 0, resumed.stderr
    assert set(statuses(uri, "stopped").values()) == {"FINISHED"}
    assert all(
        [step for step, _ in curve["loss"]] == list(range(2048, 65_536 + 1, 2048))
        for curve in curves(uri, "stopped").values()
    )


def test_second_driver_of_a_live_sweep_is_refused(tmp_path, ray_local):
    path = spec_file(tmp_path, "twice")
    first = driver(tmp_path, ray_local, path)
    try:
        wait_until(first, lambda: (tmp_path / "sweeps" / "twice" / "lease.json").exists())
        holder = json.loads((tmp_path / "sweeps" / "twice" / "lease.json").read_text())
        second = driver(tmp_path, ray_local, path, wait=True)
        assert second.returncode == 2 and f"pid {holder['pid']}" in second.stderr and "--force" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert first.wait(timeout=600) == 0, first.stderr.read()
    finally:
        first.kill()
    runs = list((tmp_path / "sweeps" / "twice" / "runs").iterdir())
    assert len(runs) == 1 and len(runs[0].name.split("-")) == 3  # <date>-<time>-<random>
    index = json.loads((tmp_path / "dictionaries" / "twice" / "index.json").read_text())
    assert index and all((tmp_path / "dictionaries" / "twice" / entry["path"]).is_dir() for entry in index)


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_corrupt_shard_is_invalid_input_with_the_whole_message(tmp_path, ray_local, damage):
    from dictsweep.store.synth import SynthConfig, synth_dataset

    synth_dataset(str(tmp_path / "data" / "toy"), SynthConfig(**SPEC["data"]["synth"]))
    shard = tmp_path / "data" / "toy" / "train" / "00005.arrow"
    data = bytearray(shard.read_bytes())
    shard.write_bytes(
        data[: len(data) // 2] if damage == "truncated" else data[:100] + bytes([data[100] ^ 1]) + data[101:]
    )
    out = driver(tmp_path, ray_local, spec_file(tmp_path, f"corrupt{damage}"), wait=True)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out.stderr
    line = errors[0]
    expected = (
        "is truncated or was rewritten after the manifest"
        if damage == "truncated"
        else "the object is corrupt or was rewritten after the manifest"
    )
    assert line.startswith("error: shard train/00005.arrow of ") and line.endswith(expected), out.stderr
    assert "RUNNING" not in statuses(f"sqlite:///{tmp_path}/mlflow.db", f"corrupt{damage}").values()


RAY_STARTED = """
import sys
from dictsweep import cli
sys.argv = ["dictsweep", "run", *sys.argv[1:]]
try:
    cli.main()
    code = 0
except SystemExit as exit:
    code = exit.code
import ray
print("ray started" if ray.is_initialized() else "ray not started", flush=True)
sys.exit(code)
"""


@pytest.fixture
def no_credentials(s3_server, tmp_path):
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "RAY_ADDRESS")
    }
    return {
        **env,
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.mark.parametrize("case", ["no credentials", "no dataset", "tracking down", "tokens below a batch"])
def test_bad_sweep_stops_before_ray_with_one_line(tmp_path, bucket, no_credentials, case):
    changes = {
        "no credentials": {"data__uri": f"s3://{bucket}/data", "data__synth": None},
        "no dataset": {"data__synth": None},
        "tracking down": {"tracking__uri": f"http://127.0.0.1:{conftest.free_port()}"},
        "tokens below a batch": {"train__tokens": 100},
    }[case]
    spec = {**SPEC, "tracking": {}}
    path = conftest.spec_file(tmp_path, spec, "early", **changes)
    out = subprocess.run(
        [sys.executable, "-c", RAY_STARTED, path],
        cwd=tmp_path,
        env=no_credentials,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 2 and out.stdout.strip().splitlines()[-1] == "ray not started", out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), out.stderr
    words = {
        "no credentials": f"data.uri: s3://{bucket}/data: no storage credentials",
        "no dataset": "has no manifest.json",
        "tracking down": "no answer within 5 s",
        "tokens below a batch": "train.tokens (100) is less than one batch",
    }[case]
    assert words in errors[0], errors[0]
