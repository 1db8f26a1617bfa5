"""A tiny sweep through Ray on CUDA, as `dictsweep run` does it: trainer actors placed on the GPU
(one, then two sharing it), fed bfloat16 batches by the stream, every architecture, a baseline, the
inspect pass, MLflow (sqlite) and export; the sweep's own throughput report read back.

Skipped without CUDA (tests/gpu/conftest.py) or without Ray and MLflow. `check_sweep` takes the
device, so its plumbing can be proven on a CPU too (`check_sweep(folder, "cpu")`)."""

import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("ray")
pytest.importorskip("mlflow")

SPEC = {
    "name": "gpu-tiny",
    "data": {
        "uri": "data/tiny",
        "synth": {
            "d_model": 64,
            "n_features": 256,
            "active": 4,
            "rows": 32768,
            "eval_rows": 4096,
            "shard_rows": 4096,
            "dtype": "bfloat16",
            "seed": 0,
        },
    },
    "grid": {
        "architecture": ["relu", "topk", "batchtopk", "jumprelu"],
        "n_latents": [256, 512],
        "k": [8],
        "target_l0": [8],
        "seed": [0, 1],
    },
    "train": {
        "tokens": 32768,
        "batch_rows": 1024,
        "step_rows": 1024,
        "lr_warmup_steps": 4,
        "log_every_tokens": 8192,
        "eval_tokens": 4096,
    },
    "stream": {"shuffle_shards": 2},
    "baselines": ["pca"],
    "evaluation": {"inspect": True, "inspect_tokens": 8192, "baseline_rows": 8192},
    "select": {"max_fvu": 1.0, "max_dead_fraction": 1.0},
}
CURVE_POINTS = 32768 // 8192


def check_sweep(folder: Path, device: str, overrides: tuple[str, ...] = ()) -> dict:
    """Run the tiny sweep in `folder` on `device` and check what it left; returns its stream report."""
    from mlflow import MlflowClient

    from dictsweep import load_dictionary
    from dictsweep.spec_file import load_spec
    from dictsweep.sweep.run import run_sweep

    path = folder / "gpu-tiny.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    spec = load_spec(
        str(path),
        [
            f"resources.device={device}",
            f"data.uri={folder / 'data'}",
            f"storage.dir={folder / 'sweeps'}",
            f"export.dir={folder / 'dictionaries'}",
            f"tracking.uri=sqlite:///{folder / 'mlflow.db'}",
            *overrides,
        ],
    )
    result = run_sweep(spec)
    points = {p.name for p in result.plan.points}
    assert len(points) == 16 and set(result.finished) == points and not result.failed

    stream = result.stream
    assert stream["device"] == device
    assert stream["sae_samples"] == 16 * SPEC["train"]["tokens"]
    assert 0 <= stream["data_wait_fraction"] <= 1
    if device == "cuda":  # the compute stream's own time, inside the training phase
        assert all(0 < t["gpu_busy_fraction"] <= 1 for t in stream["trainers"])
        assert stream["gpu_utilization"] is not None or "NVML" in stream["gpu_note"]
    else:
        assert stream["gpu_busy_fraction"] is None and stream["gpu_note"]

    # every exported dictionary loads and reconstructs eval rows on this device
    index = json.loads((folder / "dictionaries" / "index.json").read_text())
    assert index and all(entry["selected"] for entry in index)
    for entry in index:
        sae = load_dictionary(str(folder / "dictionaries" / entry["path"])).to(device)
        rows = torch.randn(8, 64, device=device)
        assert torch.isfinite(sae(rows)).all()
        assert (folder / "dictionaries" / "inspect" / entry["path"] / "index.html").exists()

    # MLflow: every run FINISHED, every SAE with its whole curve
    client = MlflowClient(result.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("gpu-tiny").experiment_id])
    assert {run.info.status for run in runs} == {"FINISHED"}
    saes = [run for run in runs if run.data.tags.get("dictsweep.role") == "sae"]
    assert {run.data.tags["dictsweep.point"] for run in saes} == points
    for run in saes:
        history = client.get_metric_history(run.info.run_id, "fvu")
        assert [m.step for m in history] == [8192 * (i + 1) for i in range(CURVE_POINTS)]
    parent = next(run for run in runs if run.data.tags.get("dictsweep.role") == "sweep")
    assert parent.data.metrics["sae_samples_per_s"] == pytest.approx(stream["sae_samples_per_s"])
    return stream


@pytest.fixture
def fresh_ray():
    """The sweep starts a local Ray of its own; it is stopped after the test."""
    import ray

    yield
    ray.shutdown()


def test_tiny_sweep_on_cuda(tmp_path, fresh_ray):
    stream = check_sweep(tmp_path, "cuda")
    assert len(stream["trainers"]) == 1 and stream["trainers"][0]["device_share"] == 1.0


def test_two_trainers_share_the_gpu(tmp_path, fresh_ray):
    stream = check_sweep(tmp_path, "cuda", ("resources.gpus_per_trainer=0.5",))
    assert [t["device_share"] for t in stream["trainers"]] == [0.5, 0.5]
    assert sum(t["sae_samples"] for t in stream["trainers"]) == stream["sae_samples"]
