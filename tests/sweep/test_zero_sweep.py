"""A grid point routed to DeepSpeed ZeRO inside a sweep is trained, evaluated, exported and recorded
like any other."""

import json

from dictsweep import load_dictionary
from dictsweep.spec_file import load_spec
from dictsweep.sweep.run import run_sweep


def test_zero_point_in_a_sweep(tmp_path, monkeypatch, ray_local):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "zero.yaml"
    path.write_text(
        json.dumps(
            {
                "name": "zerosweep",
                "data": {
                    "uri": "data/toy",
                    "synth": {
                        "d_model": 16,
                        "n_features": 32,
                        "active": 3,
                        "rows": 8192,
                        "eval_rows": 1024,
                        "shard_rows": 2048,
                        "seed": 3,
                    },
                },
                "grid": {"architecture": ["relu"], "n_latents": [32], "l1_coef": [1.0], "lr": [0.003]},
                "train": {"tokens": 8192, "batch_rows": 256, "log_every_tokens": 4096, "eval_tokens": 1024},
                "resources": {"zero": "always", "zero_workers": 2},
                "select": {"l0": [0.1, 32], "max_fvu": 10.0, "max_dead_fraction": 1.0},  # 8k tokens: lenient bounds
                "export": {"registry": False},
            }
        )
    )
    result = run_sweep(load_spec(str(path)))
    name = "relu-n32-l1_1-lr0.003-s0"
    assert list(result.finished) == [name] and [z.workers for z in result.plan.zero] == [2]
    dictionary = load_dictionary(result.finished[name].uri)
    assert dictionary.metadata["dictsweep"]["zero"]["workers"] == 2
    assert 0 < result.finished[name].metrics["fvu"] < 1

    from mlflow import MlflowClient

    client = MlflowClient(result.tracking_uri)
    history = client.get_metric_history(result.finished[name].run_id, "loss")
    assert [m.step for m in history] == [4096, 8192]
    assert json.loads((tmp_path / "dictionaries/zerosweep/index.json").read_text())[0]["path"] == name
    # the same end as a single-device SAE: decoder-norm statistics and the density plot on its run
    run = client.get_run(result.finished[name].run_id)
    assert "eval/decoder_norm_mean" in run.data.metrics
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/density_and_norms.png"]
