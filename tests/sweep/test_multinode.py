"""Sweeps on a real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head and
three worker nodes, each its own raylet, object store and CPU count, all on 127.0.0.1), with the
dataset, checkpoints and exports in a real S3 API server, as on a cluster whose local paths name
different disks. Trainers spread over nodes, each node's readers read each shard once per epoch, a
node killed mid-sweep (its trainers move, or wait for room and `--resume`), ZeRO across two nodes,
and `dictsweep submit` to the cluster's Jobs API.

One cluster serves the module (starting one costs ~20 s and ~1.5 GB); the tests run in this file's
order, as the node-loss tests remove nodes for good. Every sweep here is tiny (d_model 16, 128 steps).
"""

import json
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from dictsweep import load_dictionary
from dictsweep.spec_file import load_spec
from dictsweep.store import fs
from dictsweep.store.dataset import ActivationDataset
from dictsweep.store.synth import SynthConfig, synth_dataset
from dictsweep.sweep import restarts
from dictsweep.sweep.run import run_sweep
from tests import conftest

WORKERS = 3  # worker nodes, each with WORKER_CPUS logical CPUs; the head has none (driver, dashboard, Jobs API)
WORKER_CPUS = 2
OBJECT_STORE_BYTES = 100 << 20
EPOCHS = 4
TOKENS = EPOCHS * 8192
LOG_EVERY = 2048
SYNTH = {"d_model": 16, "n_features": 32, "active": 3, "rows": 8192, "eval_rows": 1024, "shard_rows": 2048, "seed": 4}


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """A head (no CPUs: nothing but the driver's side runs there, its dashboard on a free port) and
    three worker nodes. Started after the S3 server so that every node's processes see its settings.
    The session's one-node Ray, if a test before started it, is stopped for the module and started
    again after (a process joins one cluster at a time)."""
    import ray
    from ray._private import services
    from ray.cluster_utils import Cluster

    had_local = ray.is_initialized()
    ray.shutdown()
    # Ray turns 127.0.0.1 in an address into this machine's outward address (for clusters across
    # machines), where a loopback-only cluster does not listen; with this variable its processes (the
    # head's job agent, a job's driver) keep 127.0.0.1, and so does this process while it connects
    environment = pytest.MonkeyPatch()
    environment.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # the nodes run the Python that has dictsweep's dependencies (a job's `python`), as a cluster image does
    environment.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    head_temp = str(tmp_path_factory.mktemp("ray"))
    # the cluster's address goes to its own temp folder, where its job supervisor looks for it, not to
    # Ray's shared /tmp/ray (other local clusters' file: a job would join whichever it named)
    write_address = ray._private.utils.write_ray_address
    environment.setattr(
        ray._private.utils, "write_ray_address", lambda address, temp_dir=None: write_address(address, head_temp)
    )
    ports = {
        name: conftest.free_port()
        for name in ("dashboard_port", "dashboard_agent_listen_port", "metrics_export_port", "runtime_env_agent_port")
    }
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "object_store_memory": OBJECT_STORE_BYTES,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "temp_dir": head_temp,
            # a node that stops answering is declared dead within ~3 s (Ray's default: ~30 s)
            "_system_config": {
                "health_check_period_ms": 1000,
                "health_check_failure_threshold": 3,
                "free_objects_period_milliseconds": 50,
            },
            **ports,
        },
    )
    cluster.temp_dirs = []
    try:
        for index in range(WORKERS):
            add_worker(cluster, index)
        with pytest.MonkeyPatch.context() as patch:  # this process read the variable when it imported ray
            patch.setattr(services, "get_node_ip_address", lambda address=None: "127.0.0.1")
            ray.init(address=cluster.address, _node_ip_address="127.0.0.1", logging_level="warning")
        cluster.wait_for_nodes()
        cluster.dashboard = f"http://127.0.0.1:{ports['dashboard_port']}"
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        environment.undo()
        for folder in cluster.temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)
        if had_local:  # as conftest's `ray_local` started it
            ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="warning")


def add_worker(cluster, index: int):
    """A worker node with its own temp folder (sessions, logs, unpacked job files), as a node of a real
    cluster has its own disk: nodes sharing one would delete each other's copy of a job's files."""
    import tempfile

    cluster.temp_dirs.append(tempfile.mkdtemp(prefix=f"ray{index}-"))  # short: Ray's socket paths must fit 107 bytes
    return cluster.add_node(
        temp_dir=cluster.temp_dirs[-1],
        num_cpus=WORKER_CPUS,
        object_store_memory=OBJECT_STORE_BYTES,
        node_ip_address="127.0.0.1",
        resources={f"worker-{index}": 1},
        metrics_export_port=conftest.free_port(),
        runtime_env_agent_port=conftest.free_port(),
    )


@pytest.fixture(scope="module")
def data(cluster):
    """The dataset, in a bucket of the S3 server: every node reads it from there."""
    s3, _ = fs.resolve("s3://multinode")
    if not s3.exists("multinode"):
        s3.mkdir("multinode")
    uri = "s3://multinode/data/toy"
    synth_dataset(uri, SynthConfig(**SYNTH))
    return uri


def spec_file(folder, data, name, **resources):
    """A sweep of 4 ensembles (relu and topk at 32 and 64 latents) over `resources.trainers` trainers,
    everything it writes in the bucket."""
    spec = {
        "name": name,
        "data": {"uri": data},
        "grid": {
            "architecture": ["relu", "topk"],
            "n_latents": [32, 64],
            "l1_coef": [1.0],
            "k": [3],
            "lr": [0.003],
            "seed": [0],
        },
        "train": {
            "tokens": TOKENS,
            "batch_rows": 256,
            "lr_warmup_steps": 5,
            "log_every_tokens": LOG_EVERY,
            "eval_tokens": 1024,
            "kernel": "bmm",
            "checkpoint_every_tokens": 2048,
        },
        "stream": {"shuffle_shards": 2, "batches_in_flight": 4},
        "resources": {"device": "cpu", "trainers": 3, "torch_threads": 1, **resources},
        "select": {"l0": [0.1, 16], "max_fvu": 10.0, "max_dead_fraction": 1.0},  # tiny sweeps: lenient bounds
        "storage": {"dir": f"s3://multinode/sweeps/{name}"},
        "export": {"dir": f"s3://multinode/exports/{name}", "registry": False},
    }
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(spec))
    return str(path)


def weights(result) -> dict:
    return {name: load_dictionary(done.uri) for name, done in result.finished.items()}


def assert_bit_identical(first: dict, second: dict) -> None:
    assert set(first) == set(second) and len(first) == 4
    for name in first:
        for weight in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(first[name], weight), getattr(second[name], weight)), (name, weight)


def nodes_of(result) -> dict[str, str]:
    """Trainer key -> the node it finished on, as the trainer itself reported it."""
    return {key: placed[-1]["node"] for key, placed in result.placements.items()}


def worker_nodes(cluster) -> dict[str, object]:
    return {node.node_id: node for node in cluster.worker_nodes}


def assert_complete_curves(result) -> None:
    """Every SAE has every training-curve point in MLflow, once, and its run FINISHED."""
    from mlflow import MlflowClient

    client = MlflowClient(result.tracking_uri)
    for name, done in result.finished.items():
        steps = [metric.step for metric in client.get_metric_history(done.run_id, "loss")]
        assert steps == list(range(LOG_EVERY, TOKENS + 1, LOG_EVERY)), name
        assert client.get_run(done.run_id).info.status == "FINISHED", name


@pytest.fixture(scope="module")
def one_node(cluster, data, tmp_path_factory):
    """The sweep with its three trainers on one node (half a CPU each: PACK puts them together)."""
    folder = tmp_path_factory.mktemp("onenode")
    os.chdir(folder)
    result = run_sweep(load_spec(spec_file(folder, data, "onenode", cpus_per_trainer=0.5)))
    return result, weights(result)


def test_trainers_on_three_nodes_read_once_per_node_and_match_one_node(
    tmp_path, monkeypatch, caplog, cluster, data, one_node
):
    reference, reference_weights = one_node
    assert len(set(nodes_of(reference).values())) == 1
    monkeypatch.chdir(tmp_path)
    caplog.set_level("INFO", logger="dictsweep.sweep.driver")
    # two CPUs per trainer on nodes of two: one trainer per node
    result = run_sweep(load_spec(spec_file(tmp_path, data, "spread", cpus_per_trainer=2)))
    assert not result.failed

    # where the trainers ran, as they reported it and as the cluster's actor table has it
    nodes = nodes_of(result)
    assert len(nodes) == 3 and len(set(nodes.values())) == 3
    assert set(nodes.values()) <= set(worker_nodes(cluster))
    from ray._private.state import actors

    table = {a["Name"]: a["Address"]["NodeID"] for a in actors().values() if a["Name"].startswith("spread-w0-")}
    assert table == {f"spread-{key}": node for key, node in nodes.items()}
    assert "placement node" in caplog.text and all(node[:12] in caplog.text for node in nodes.values())

    # each node's readers read every shard once per epoch: bytes per node = the dataset's, total = 3x
    dataset = ActivationDataset.open(data)
    per_node = EPOCHS * sum(s.bytes for s in dataset.shards("train")) + sum(s.bytes for s in dataset.shards("eval"))
    shard_reads = {f"train/{i}": EPOCHS for i in range(len(dataset.shards("train")))} | {"eval/0": 1}
    reads = result.stream["reads_by_node"]
    assert set(reads) == set(nodes.values())
    for node in reads.values():
        assert node["bytes_read"] == per_node and node["shard_reads"] == shard_reads
    assert sum(node["bytes_read"] for node in reads.values()) == 3 * per_node
    [(_, alone)] = reference.stream["reads_by_node"].items()
    assert alone["bytes_read"] == per_node and alone["shard_reads"] == shard_reads

    assert_bit_identical(weights(result), reference_weights)


def test_local_paths_on_several_nodes_are_warned_about(tmp_path, caplog, cluster, data):
    from dictsweep.sweep.run import pin_paths, warn_local_paths

    spec = pin_paths(load_spec(spec_file(tmp_path, data, "paths")))
    caplog.set_level("WARNING", logger="dictsweep.sweep.run")
    warn_local_paths(spec)  # everything in the bucket: every node sees the same
    assert not caplog.records
    spec.storage.dir = str(tmp_path / "sweeps")
    warn_local_paths(spec)
    [record] = caplog.records
    assert f"has {1 + WORKERS} nodes" in record.message and f"storage.dir {tmp_path}/sweeps" in record.message
    assert "data.uri" not in record.message and "export.dir" not in record.message


def test_bench_driver_measures_batches_and_mlflow_writes_per_second(tmp_path, run_cli, cluster):
    code, out = run_cli(
        "bench", "driver", "--trainers", "3", "--steps", "30", "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
        "--writes", "5", "--json",
    )  # fmt: skip
    assert code == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["trainers"] == 3 and result["steps"] == 30 and result["batches_per_s"] > 0
    assert result["seconds"] > 0 and 0 < result["driver_cpu_fraction"] and result["log_batch_per_s"] > 0


class Killer(threading.Thread):
    """Once trainer `key` of sweep `name` is past step `past` (a few checkpoints in), remove the
    worker node it runs on from the cluster, its processes SIGKILLed; `killed` names that node."""

    def __init__(self, cluster, name: str, key: str, past: int, seconds: float = 300):
        super().__init__(daemon=True)
        self.cluster, self.name, self.key, self.past, self.seconds = cluster, name, key, past, seconds
        self.killed: str | None = None
        self.start()

    def run(self):
        import ray

        deadline = time.time() + self.seconds
        while time.time() < deadline and self.killed is None:
            try:
                status = ray.get(ray.get_actor(f"{self.name}-{self.key}").status.remote(), timeout=10)
                if status["position"] >= self.past:
                    self.cluster.remove_node(worker_nodes(self.cluster)[status["node"]], allow_graceful=False)
                    self.killed = status["node"]
            except (ValueError, ray.exceptions.RayError):
                pass  # not started yet
            time.sleep(0.2)


def test_zero_sae_across_two_nodes_trains_as_on_one(tmp_path, monkeypatch, cluster, data):
    """Two ZeRO runs of one SAE (2 gloo workers, half a CPU each): packed on one node, then with
    every worker node half full, so that the workers can only land on two different nodes.
    The first run builds DeepSpeed's C++ op when its cache is empty (~60 s once)."""
    import ray
    from ray._private.state import actors
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def workers() -> dict[str, str]:
        return {
            actor_id: actor["Address"]["NodeID"]
            for actor_id, actor in actors().items()
            if actor["ActorClassName"] == "RayTrainWorker"
        }

    def zero_sweep(name: str):
        path = tmp_path / f"{name}.yaml"
        spec = json.loads(open(spec_file(tmp_path, data, name)).read())
        spec["grid"] = {"architecture": ["relu"], "n_latents": [32], "l1_coef": [1.0], "lr": [0.003]}
        # the end-of-sweep evaluation task takes a trainer's CPUs: half a CPU fits beside the fillers
        spec["resources"] = {"device": "cpu", "zero": "always", "zero_workers": 2, "cpus_per_trainer": 0.5}
        spec["train"]["tokens"] = 8192
        path.write_text(json.dumps(spec))
        before = set(workers())
        result = run_sweep(load_spec(str(path)))
        ran = {node for actor, node in workers().items() if actor not in before}
        [(point, done)] = result.finished.items()
        return ran, load_dictionary(done.uri), done.metrics

    monkeypatch.chdir(tmp_path)
    together, alone, alone_metrics = zero_sweep("zeroone")
    assert len(together) == 1

    class Filler:
        """Holds part of a node's CPUs."""

        def ready(self) -> bool:
            return True

    fillers = [
        ray.remote(num_cpus=WORKER_CPUS - 0.5)(Filler)
        .options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
        .remote()
        for node in worker_nodes(cluster)
    ]
    ray.get([filler.ready.remote() for filler in fillers])
    try:
        apart, spread, spread_metrics = zero_sweep("zerotwo")
    finally:
        for filler in fillers:
            ray.kill(filler)
    assert len(apart) == 2
    assert spread.metadata["dictsweep"]["zero"]["workers"] == 2
    for weight in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(spread, weight), getattr(alone, weight)), weight
    assert spread_metrics == alone_metrics


def test_submit_to_the_clusters_jobs_api_runs_to_the_end(tmp_path, cluster, data):
    """`dictsweep submit` to the head's Jobs API: the job's driver runs on the head, its trainers on
    the worker nodes; it ends SUCCEEDED with its dictionaries in the bucket."""
    from dictsweep.sweep import jobs

    path = spec_file(tmp_path, data, "submitted", cpus_per_trainer=2)
    job = jobs.submit(path, cluster.dashboard, ["train.tokens=8192"])
    state = jobs.wait(job, cluster.dashboard, timeout=600)
    assert state == "SUCCEEDED", jobs.logs(job, cluster.dashboard)[-3000:]
    index = json.loads(fs.read_text("s3://multinode/exports/submitted/index.json"))
    assert index and all(fs.exists(f"s3://multinode/exports/submitted/{e['path']}/cfg.json") for e in index)
    logs = " ".join(jobs.logs(job, cluster.dashboard).split())  # the job's console wraps long lines
    placement = logs[logs.index("placement node") :].split(" INFO ")[0]
    assert len(set(re.findall(r"node ([0-9a-f]{12}) \(127\.0\.0\.1\)", placement))) == 3  # a trainer per worker


def test_killed_node_its_trainers_restart_on_the_others_bit_for_bit(tmp_path, monkeypatch, cluster, data, one_node):
    """A worker node is removed (its processes SIGKILLed) mid-sweep: its trainers restart on the
    remaining nodes from their checkpoints; no curve point is lost, the dictionaries are the same."""
    monkeypatch.chdir(tmp_path)
    # one CPU per trainer on nodes of two: two trainers share a node, a third node stays free
    killer = Killer(cluster, "nodeloss", "w0-t0", past=40)
    result = run_sweep(load_spec(spec_file(tmp_path, data, "nodeloss", cpus_per_trainer=1)))
    killer.join()
    assert killer.killed, "no node was removed"
    assert not result.failed
    moved = {key: placed for key, placed in result.placements.items() if placed[0]["node"] == killer.killed}
    assert "w0-t0" in moved
    for key, placed in moved.items():
        restarted = placed[-1]
        assert restarted["node"] != killer.killed and restarted["node"] in worker_nodes(cluster), key
        assert restarted["restored"] and restarted["position"] > 0, key  # from its checkpoint, not from step 0
    assert killer.killed not in result.stream["reads_by_node"]  # its readers' counts left with it
    assert_bit_identical(weights(result), one_node[1])
    assert_complete_curves(result)


def test_lost_node_without_room_fails_naming_it_then_resume_finishes(
    tmp_path, monkeypatch, run_cli, cluster, data, one_node
):
    """Two nodes left, one trainer filling each; one node is removed and none has room for its
    trainer: the sweep exits 1 naming the node, its SAEs' runs are FAILED; a node joins and
    `--resume` finishes them from their checkpoints, bit for bit, every curve point in MLflow once.
    Waits NODE_WAIT_SECONDS (10 s here) for a node with room before giving up."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(restarts, "NODE_WAIT_SECONDS", 10.0)
    assert len(cluster.worker_nodes) == 2
    path = spec_file(tmp_path, data, "noroom", cpus_per_trainer=2, trainers=2)
    killer = Killer(cluster, "noroom", "w0-t0", past=40)
    code, out = run_cli("run", path)
    killer.join()
    assert killer.killed, "no node was removed"
    assert code == 1, out
    assert f"node {killer.killed[:12]} (127.0.0.1) left the cluster" in out and "--resume" in out
    client = MlflowClient("sqlite:///mlflow.db")
    experiment = client.get_experiment_by_name("noroom")
    runs = client.search_runs([experiment.experiment_id])
    status = {r.data.tags["dictsweep.point"]: r.info.status for r in runs if "dictsweep.point" in r.data.tags}
    failed = {name for name, state in status.items() if state == "FAILED"}
    assert len(failed) == 2 and sorted(status.values()).count("FINISHED") == 2  # the lost trainer's two SAEs

    add_worker(cluster, WORKERS)
    code, out = run_cli("run", path, "--resume")
    assert code == 0, out
    runs = client.search_runs([experiment.experiment_id])
    status = {r.data.tags["dictsweep.point"]: r for r in runs if "dictsweep.point" in r.data.tags}
    assert {run.info.status for run in status.values()} == {"FINISHED"}
    assert not any("dictsweep.error" in run.data.tags for run in status.values())  # no old error on a finished run
    for name in failed:  # resumed from its checkpoint: each point once, none missing
        steps = [m.step for m in client.get_metric_history(status[name].info.run_id, "loss")]
        assert steps == list(range(LOG_EVERY, TOKENS + 1, LOG_EVERY)), name
    run_dir = json.loads(fs.read_text("s3://multinode/sweeps/noroom/latest.json"))["run"]
    resumed = {name: load_dictionary(fs.join(run_dir, "dictionaries", name)) for name in status}
    assert_bit_identical(resumed, one_node[1])
