"""The sweep's own throughput (`sweep.throughput`, `dictsweep bench sweep`): a real sweep on a local
Ray with two trainers, recorded in a real MLflow server; the figures are checked against what the
plan, the trainers' checkpoints and MLflow say, never against a clock."""

import json

import pytest

from dictsweep.store import fs
from dictsweep.sweep.throughput import merge_stream_stats, trainer_entry
from dictsweep.train.checkpoint import read_checkpoint

from tests import conftest
from tests.sweep.test_sweep import BASE


def usage(wait: float, busy: float, members: list[int], gpu_busy=None, utilization=None, note="no GPU") -> dict:
    """A trainer's counters as `DeviceLoop.usage` gives them."""
    return {
        "busy_seconds": busy,
        "wait_seconds": wait,
        "data_wait_fraction": wait / (wait + busy),
        "checkpoint_seconds": busy / 10,
        "gpu_busy_seconds": gpu_busy,
        "gpu_utilization": utilization,
        "gpu_note": note,
        "device": "cuda" if gpu_busy is not None else "cpu",
        "ensembles": [{"members": count} for count in members],
    }


def reader(node: str, bytes_read: int, shard_reads: dict[str, int]) -> dict:
    return {"node": node, "bytes_read": bytes_read, "shard_reads": shard_reads}


def test_waves_add_up():
    first = [
        trainer_entry("w0-t0", usage(1.0, 3.0, [4, 2], 2.0, 90, None), 10, 256, 8.0, 0.5),
        trainer_entry("w0-t1", usage(3.0, 1.0, [1], 6.0, None, "no NVML"), 10, 256, 8.0, 0.5),
    ]
    assert first[0]["sae_samples"] == 6 * 10 * 256 and first[1]["sae_samples"] == 10 * 256
    assert first[0]["gpu_busy_fraction"] == 2.0 / 8.0 and first[1]["gpu_busy_fraction"] == 6.0 / 8.0
    total = merge_stream_stats({}, [reader("n1", 100, {"train/0": 1, "train/1": 1})], first, 8.0)
    total = merge_stream_stats(
        total,
        [reader("n1", 50, {"train/1": 1})],
        [trainer_entry("w1-t0", usage(0.0, 4.0, [3], 2.0, 70, None), 4, 256, 2.0, 1.0)],
        2.0,
    )
    assert total["bytes_read_per_node"] == [100, 50]
    assert total["reads_by_node"] == {"n1": {"bytes_read": 150, "shard_reads": {"train/0": 1, "train/1": 2}}}
    assert total["wait_seconds"] == 4.0 and total["busy_seconds"] == 8.0
    assert total["data_wait_fraction"] == pytest.approx(4.0 / 12.0)
    assert total["train_seconds"] == 10.0
    assert total["checkpoint_seconds"] == pytest.approx(0.3 + 0.4)  # each wave's slowest trainer
    assert total["sae_samples"] == (6 * 10 + 10 + 3 * 4) * 256
    assert total["sae_samples_per_s"] == pytest.approx(total["sae_samples"] / 10.0)
    assert total["device"] == "cuda"
    assert total["gpu_busy_fraction"] == pytest.approx((0.25 + 0.75 + 1.0) / 3)
    assert total["gpu_utilization"] == pytest.approx(80.0)  # the trainers NVML could be read for
    assert total["gpu_note"] == "no NVML"


def test_bench_sweep_reports_what_the_trainers_counted(tmp_path, monkeypatch, ray_local, mlflow_server, run_cli):
    monkeypatch.chdir(tmp_path)
    path = conftest.spec_file(tmp_path, BASE, "throughput", grid__architecture=["relu", "topk"], grid__l1_coef=[1.0])
    code, output = run_cli(
        "bench",
        "sweep",
        path,
        "--set",
        f"tracking.uri={mlflow_server}",
        "--set",
        "resources.trainers=2",
        "--set",
        "resources.torch_threads=1",
        "--set",
        "export.registry=false",
        "--compare",
        "--steps",
        "2",
        "--rounds",
        "1",
        "--json",
    )
    assert code == 0, output
    report = json.loads(output.splitlines()[0])  # stdout holds the JSON alone; the sweep's output went to stderr
    assert "training:" in output and "SAE-samples/s" in output and "no GPU: the trainer ran on the CPU" in output

    tokens, rows = BASE["train"]["tokens"], BASE["train"]["batch_rows"]
    # 2 architectures x 2 sizes x 1 sparsity setting: every SAE trained on every token, once
    assert report["saes"] == 4
    assert report["sae_samples"] == 4 * tokens
    assert report["sae_samples_per_s"] == pytest.approx(report["sae_samples"] / report["train_seconds"])
    shapes = sorted((e["architecture"], e["n_latents"], e["members"], e["batch_rows"]) for e in report["ensembles"])
    assert shapes == [("relu", 32, 1, rows), ("relu", 64, 1, rows), ("topk", 32, 1, rows), ("topk", 64, 1, rows)]

    # the data wait is the trainers' own counters, as their last checkpoints hold them
    storage = str(tmp_path / "sweeps" / "throughput")
    run_dir = json.loads(fs.read_text(fs.join(storage, "latest.json")))["run"]
    assert len(report["trainers"]) == 2
    for trainer in report["trainers"]:
        uri = fs.join(run_dir, "checkpoints", f"{trainer['key']}.pt")
        saved = read_checkpoint(fs.read_bytes(uri), uri)
        assert (trainer["wait_seconds"], trainer["busy_seconds"]) == (saved["wait"], saved["busy"])
        assert 0 < trainer["checkpoint_seconds"] <= report["checkpoint_seconds"]
        assert trainer["steps"] == tokens // rows and trainer["device_share"] == 0.5
        # a trainer's counters run inside the driver's training phase
        assert trainer["wait_seconds"] + trainer["busy_seconds"] <= report["train_seconds"]
    assert sum(t["sae_samples"] for t in report["trainers"]) == report["sae_samples"]
    wait = sum(t["wait_seconds"] for t in report["trainers"])
    busy = sum(t["busy_seconds"] for t in report["trainers"])
    assert (report["wait_seconds"], report["busy_seconds"]) == (pytest.approx(wait), pytest.approx(busy))
    assert 0 <= report["data_wait_fraction"] <= 1
    assert report["data_wait_fraction"] == pytest.approx(wait / (wait + busy))
    # no GPU: no reading, and a note that says why rather than a zero
    assert report["device"] == "cpu"
    assert report["gpu_busy_fraction"] is None and report["gpu_utilization"] is None
    assert report["gpu_note"] == "no GPU: the trainer ran on the CPU"

    # --compare: each shape timed once by bench train, combined as the two trainers share the CPU
    assert len(report["bench_train"]) == 4
    by_shape = {(b["architecture"], b["n_latents"]): b["sae_samples_per_s"] for b in report["bench_train"]}
    seconds = sum(
        e["members"] * e["batch_rows"] * (tokens // rows) / by_shape[(e["architecture"], e["n_latents"])]
        for e in report["ensembles"]
    )
    assert report["bench_train_sae_samples_per_s"] == pytest.approx(report["sae_samples"] / (seconds / 1.0))
    assert report["fraction_of_bench_train"] == pytest.approx(
        report["sae_samples_per_s"] / report["bench_train_sae_samples_per_s"]
    )

    # the parent run holds the same figures; a GPU reading that does not exist is not logged as 0
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("throughput").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("dictsweep.role") == "sweep")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["sae_samples_per_s"] == pytest.approx(report["sae_samples_per_s"])
    assert parent.data.metrics["train_seconds"] == pytest.approx(report["train_seconds"])
    assert parent.data.metrics["data_wait_fraction"] == pytest.approx(report["data_wait_fraction"])
    assert "gpu_busy_fraction" not in parent.data.metrics and "gpu_utilization" not in parent.data.metrics
    assert parent.data.tags["dictsweep.gpu"] == "no GPU: the trainer ran on the CPU"
