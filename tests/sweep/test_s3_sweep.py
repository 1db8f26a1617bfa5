"""A sweep whose dataset, working storage and exports live in S3 (a real S3 API server) and whose
MLflow artifacts are kept in S3 by a tracking server; no secret shows up anywhere."""

import json
from pathlib import Path

import torch

from dictsweep import load_dictionary
from dictsweep.spec_file import load_spec
from dictsweep.store import fs
from dictsweep.store.synth import SynthConfig, synth_dataset
from dictsweep.sweep.run import run_sweep
from dictsweep.sweep.pull import pull
from tests.conftest import S3_SECRET


def test_sweep_on_s3_with_artifacts_in_s3(tmp_path, monkeypatch, capfd, bucket, ray_local, mlflow_server):
    monkeypatch.chdir(tmp_path)
    data = f"s3://{bucket}/datasets/toy"
    synth_dataset(
        data, SynthConfig(d_model=16, n_features=32, active=3, rows=12_288, eval_rows=1024, shard_rows=2048, seed=5)
    )
    spec_path = tmp_path / "s3.yaml"
    spec_path.write_text(
        json.dumps(
            {
                "name": "ons3",
                "data": {"uri": data},
                "grid": {"architecture": ["relu"], "n_latents": [32, 64], "l1_coef": [1.0, 3.0], "lr": [0.003]},
                "train": {
                    "tokens": 8192,
                    "batch_rows": 256,
                    "log_every_tokens": 4096,
                    "eval_tokens": 1024,
                    "kernel": "bmm",
                    "checkpoint_every_tokens": 4096,
                },
                "tracking": {"uri": mlflow_server},
                "select": {"l0": [0.5, 16], "max_fvu": 2.0, "max_dead_fraction": 1.0},  # 8k tokens: lenient bounds
                "storage": {"dir": f"s3://{bucket}/sweeps/ons3"},
                "export": {"dir": f"s3://{bucket}/exports/ons3"},
            }
        )
    )
    result = run_sweep(load_spec(str(spec_path)))
    assert len(result.finished) == 4 and not result.failed

    # every finished SAE, the selected exports and index.json are in the bucket
    for done in result.finished.values():
        assert done.uri.startswith(f"s3://{bucket}/sweeps/ons3/runs/")
        assert fs.exists(fs.join(done.uri, "cfg.json"))
    index = json.loads(fs.read_text(f"s3://{bucket}/exports/ons3/index.json"))
    assert {entry["path"] for entry in index} == result.selected
    exported = load_dictionary(f"s3://{bucket}/exports/ons3/{index[0]['path']}")

    # MLflow kept the artifacts in S3 through the server; pulling them back gives the same weights
    s3, _ = fs.resolve("s3://mlflow-artifacts")
    assert any(path.endswith("sae_weights.safetensors") for path in s3.find("mlflow-artifacts/served"))
    entries = pull("ons3", str(tmp_path / "pulled"), tracking_uri=mlflow_server)
    pulled = load_dictionary(str(tmp_path / "pulled" / index[0]["path"]))
    torch.testing.assert_close(pulled.W_dec, exported.W_dec)
    assert {entry["path"] for entry in entries} == result.selected

    # no secret in anything the sweep wrote or said
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("ons3").experiment_id])
    for run in runs:
        assert S3_SECRET not in json.dumps({**run.data.params, **run.data.tags})
    out, err = capfd.readouterr()
    assert S3_SECRET not in out + err
    assert S3_SECRET not in fs.read_text(fs.join(f"s3://{bucket}/exports/ons3", index[0]["path"], "cfg.json"))
    from ray._private.worker import global_worker

    logs = Path(global_worker.node.get_session_dir_path()) / "logs"
    assert list(logs.glob("worker-*"))
    for path in logs.glob("*"):
        if path.is_file():
            assert S3_SECRET.encode() not in path.read_bytes(), path
