"""A sweep end to end on a real local Ray cluster and real MLflow: training, eval, selection,
export, registry, pull, and what happens to finished SAEs when others fail."""

import json
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml

from dictsweep import load_dictionary
from dictsweep.sae.saebench import CATEGORIES, FLAT_NAMES
from dictsweep.spec_file import load_spec
from dictsweep.errors import RunError
from dictsweep.store.dataset import ActivationDataset
from dictsweep.sweep.run import run_sweep
from dictsweep.sweep.pull import pull
from dictsweep.track_views import EVAL_STEP, dataset_input

from tests import conftest

BASE = {
    "data": {
        "uri": "data/toy",
        "synth": {
            "d_model": 16,
            "n_features": 32,
            "active": 3,
            "rows": 20_000,
            "eval_rows": 2048,
            "shard_rows": 4096,
            "seed": 1,
        },
    },
    "grid": {
        "architecture": ["relu", "topk"],
        "n_latents": [32, 64],
        "l1_coef": [1.0, 4.0],
        "k": [3],
        "lr": [0.003],
        "seed": [0],
    },
    "train": {
        "tokens": 12_800,
        "batch_rows": 256,
        "lr_warmup_steps": 5,
        "log_every_tokens": 2560,
        "eval_tokens": 2048,
        "kernel": "bmm",
    },
    "stream": {"shuffle_shards": 2},
    "select": {"l0": [1, 16], "max_fvu": 1.0, "max_dead_fraction": 1.0},  # 12.8k tokens: lenient bounds
}

# SAEBench's core metrics of the eval rows (docs/evaluation.md); synthetic data: no KL or CE scores
CORE_KEYS = {
    FLAT_NAMES.get(name, name)
    for category, names in CATEGORIES.items()
    if category not in ("model_behavior_preservation", "model_performance_preservation", "token_stats")
    for name in names
}


def write_spec(folder, name, **changes):
    return conftest.spec_file(folder, BASE, name, **changes)


def eval_fvu(dictionary, dataset):
    """FVU of a loaded dictionary on the whole eval split, computed here from the shards."""
    rows = torch.cat([dataset.read_shard(i, "eval").float() for i in range(len(dataset.shards("eval")))])
    with torch.no_grad():
        residual = (dictionary(rows) - rows).pow(2).sum()
    return float(residual / (rows - rows.mean(0)).pow(2).sum())


def test_sweep_end_to_end(tmp_path, monkeypatch, ray_local, capsys):
    monkeypatch.chdir(tmp_path)
    spec = load_spec(write_spec(tmp_path, "e2e"))
    result = run_sweep(spec)

    # the console showed every step, the training bar's time left and the best and worst SAE
    printed = capsys.readouterr().out
    for shown in (
        "writing 20,000 + 2,048 synthetic rows to",
        "wave 1/1 evaluating",
        "100%",
        "0:00:00 left",
        "best  ",
        "worst ",
        f"exporting {len(result.selected)} dictionaries to",
        "recording in MLflow",
    ):
        assert shown in printed, shown
    assert "warning:" not in printed and "View run" not in printed
    assert len(result.finished) == 6 and not result.failed  # 2 sizes x (2 relu l1 + 1 topk k)
    index = json.loads((tmp_path / "dictionaries/e2e/index.json").read_text())
    assert {entry["path"] for entry in index} == result.selected and all(e["selected"] for e in index)
    # per size, the selection is the lowest fvu among the SAEs inside the L0 band, with its reason
    assert sorted(entry["n_latents"] for entry in index) == [32, 64]
    for entry in index:
        same_size = [
            r.metrics
            for r in result.finished.values()
            if r.point.n_latents == entry["n_latents"] and 1 <= r.metrics["l0"] <= 16
        ]
        assert entry["metrics"]["fvu"] == min(m["fvu"] for m in same_size)
        assert entry["why"].startswith(
            f"best fvu {entry['metrics']['fvu']:.3g} of n={entry['n_latents']} inside L0 [1, 16]"
        )
        assert {
            "fvu",
            "mse",
            "l0",
            "dead_fraction",
            "mmcs_ground_truth",
            "mmcs_learned",
            "decoder_norm_mean",
            "decoder_norm_std",
            "decoder_norm_min",
            "decoder_norm_max",
        } | CORE_KEYS == set(entry["metrics"])
        assert entry["k"] is None if entry["architecture"] == "relu" else entry["l1_coef"] is None

    # the export is the trained module: its FVU on the eval shards is the one the trainer measured
    dataset = ActivationDataset.open(str(tmp_path / "data/toy"))
    for entry in index:
        dictionary = load_dictionary(str(tmp_path / "dictionaries/e2e" / entry["path"]))
        assert eval_fvu(dictionary, dataset) == pytest.approx(entry["metrics"]["fvu"], rel=1e-4, abs=1e-5)

    # MLflow: a parent run, six child runs with params, metrics over tokens, eval metrics, artifacts
    from mlflow import MlflowClient

    client = MlflowClient(result.tracking_uri)
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if r.data.tags.get("dictsweep.role") == "sae"]
    assert len(children) == 6 and all(r.info.status == "FINISHED" for r in children)
    child = children[0]
    assert {"architecture", "n_latents", "lr", "seed", "dataset"} <= set(child.data.params)
    history = client.get_metric_history(child.info.run_id, "fvu")
    assert [m.step for m in history] == [2560, 5120, 7680, 10240, 12800]
    assert {"eval/fvu", "eval/l0", "eval/mmcs_ground_truth", "dead_fraction", "loss"} <= set(child.data.metrics)
    # training curves in the eval metrics' units: the last batches' mse is near the eval mse (raw, per element)
    last_mse = client.get_metric_history(child.info.run_id, "mse")[-1].value
    assert 0.5 < last_mse / child.data.metrics["eval/mse"] < 2
    # every SAE says why it was or was not selected
    assert {r.data.tags["dictsweep.why"] for r in children} == set(result.why.values())
    assert all(r.data.tags["dictsweep.why"] == result.why[r.data.tags["dictsweep.point"]] for r in children)
    assert [a.path for a in client.list_artifacts(child.info.run_id)] == ["dictionary", "plots"]
    assert [a.path for a in client.list_artifacts(child.info.run_id, "plots")] == ["plots/density_and_norms.png"]
    assert {"eval/decoder_norm_mean", "eval/decoder_norm_max"} <= set(child.data.metrics)
    parent = [r for r in runs if r.data.tags.get("dictsweep.role") == "sweep"][0]
    assert any(key.startswith("mmcs_sizes.relu.n32_in_n64") for key in parent.data.metrics)
    # the sweep's run compares its SAEs; the experiment opens as model training at the printed address
    assert {"saes.csv", "saes.json", "pareto.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    table = json.loads(open(client.download_artifacts(parent.info.run_id, "saes.json", str(tmp_path))).read())
    assert sorted(row["name"] for row in table) == sorted(result.finished)
    assert {row["name"] for row in table if row["selected"]} == result.selected
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # the dataset is every run's input (the table's Dataset column); final metrics sit at step 0, where
    # the run page draws them as values, not as one point over an axis around the token count
    digest = dataset_input(dataset.uri, dataset.manifest)["digest"]
    for run in [parent, *children]:
        assert [(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs] == [("toy", digest)]
    assert [m.step for m in client.get_metric_history(child.info.run_id, "eval/fvu")] == [EVAL_STEP]
    assert result.tracking_url.startswith(f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?")
    versions = client.search_model_versions("name = 'e2e'")
    assert len(versions) == len(result.selected)

    # pull --all fetches every finished dictionary with the same metrics
    entries = pull("e2e", str(tmp_path / "pulled"), include_all=True)
    assert len(entries) == 6 and sum(e["selected"] for e in entries) == len(result.selected)
    by_path = {entry["path"]: entry for entry in index}
    for entry in entries:
        assert (tmp_path / "pulled" / entry["path"] / "sae_weights.safetensors").exists()
        assert entry["why"] == result.why[entry["path"]]
        if entry["path"] in by_path:  # pull's index.json says what the run's said
            assert entry["metrics"] == pytest.approx(by_path[entry["path"]]["metrics"])


def test_point_alone_equals_point_in_sweep(tmp_path, monkeypatch, ray_local):
    monkeypatch.chdir(tmp_path)
    wide = run_sweep(load_spec(write_spec(tmp_path, "wide")))
    alone = run_sweep(
        load_spec(write_spec(tmp_path, "alone", grid__architecture=["relu"], grid__n_latents=[64], grid__l1_coef=[4.0]))
    )
    name = "relu-n64-l1_4-lr0.003-s0"
    assert len(wide.finished) == 6 and list(alone.finished) == [name]
    # one read of the data per node, however many SAEs train on it
    assert wide.stream["bytes_read_per_node"] == alone.stream["bytes_read_per_node"]
    assert wide.stream["bytes_read_per_node"][0] > 0
    together = load_dictionary(wide.finished[name].uri)
    single = load_dictionary(alone.finished[name].uri)
    for weight in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(together, weight), getattr(single, weight), rtol=1e-5, atol=1e-6)


def test_http_tracking_server_and_pull(tmp_path, monkeypatch, ray_local, mlflow_server):
    monkeypatch.chdir(tmp_path)
    spec = load_spec(
        write_spec(tmp_path, "served", grid__architecture=["topk"], grid__k=[2, 4]), [f"tracking.uri={mlflow_server}"]
    )
    result = run_sweep(spec)
    assert result.tracking_uri == mlflow_server
    entries = pull("served", str(tmp_path / "pulled"), tracking_uri=mlflow_server)
    assert {e["path"] for e in entries} == result.selected
    pulled = load_dictionary(str(tmp_path / "pulled" / entries[0]["path"]))
    exported = load_dictionary(str(tmp_path / "dictionaries/served" / entries[0]["path"]))
    torch.testing.assert_close(pulled.W_dec, exported.W_dec)


def test_failed_trainer_loses_no_finished_sae(tmp_path, monkeypatch, ray_local):
    """Two trainers; one is killed mid-sweep: its SAEs are reported failed, the others are exported."""
    monkeypatch.chdir(tmp_path)
    spec = load_spec(
        write_spec(
            tmp_path, "halffail", grid__architecture=["relu"], train__tokens=400_000, train__log_every_tokens=25_600
        ),
        ["resources.trainers=2", "resources.torch_threads=1", "export.registry=false"],
    )

    def kill_one_trainer():
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                actor = ray_local.get_actor("halffail-w0-t1")
            except ValueError:
                time.sleep(0.2)
                continue
            while ray_local.get(actor.data_wait.remote())["busy_seconds"] < 1.0:
                time.sleep(0.2)  # let it train for a while
            ray_local.kill(actor, no_restart=True)
            return

    killer = threading.Thread(target=kill_one_trainer)
    killer.start()
    with pytest.raises(RunError) as raised:
        run_sweep(spec)
    killer.join()
    result = raised.value.result
    assert result.failed and result.finished
    assert set(result.failed) | set(result.finished) == {p.name for p in result.plan.points}
    assert all("trainer w0-t1 failed" in why for why in result.failed.values())
    assert "failed" in str(raised.value) and "finished ones are exported" in str(raised.value)
    for name, done in result.finished.items():
        assert load_dictionary(done.uri).W_dec.shape[0] == result.finished[name].point.n_latents
    from mlflow import MlflowClient

    client = MlflowClient(result.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("halffail").experiment_id])
    status = {r.data.tags.get("dictsweep.point"): r.info.status for r in runs if r.data.tags.get("dictsweep.point")}
    assert {status[name] for name in result.finished} == {"FINISHED"}
    assert {status[name] for name in result.failed} == {"FAILED"}


def test_bad_spec_field_exits_2_naming_it(tmp_path):
    path = write_spec(tmp_path, "bad")
    raw = yaml.safe_load(open(path))
    raw["grid"]["n_latents"] = [64, -3]
    raw["train"]["tokns"] = 5
    open(path, "w").write(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, "-m", "dictsweep.cli", "run", path], capture_output=True, text=True)
    assert out.returncode == 2
    assert "field 'grid.n_latents'" in out.stderr and "field 'train.tokns'" in out.stderr and path in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "dictsweep.cli", "run", path, "--set", "grid.n_latents=[8]", "--set", "train=3"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "field 'train'" in out.stderr


def test_l0_targets_end_to_end(tmp_path, monkeypatch, ray_local):
    """relu SAEs steered to L0 targets: index.json and MLflow give the target and the final coefficient."""
    monkeypatch.chdir(tmp_path)
    spec = load_spec(
        write_spec(
            tmp_path,
            "targets",
            grid__architecture=["relu"],
            grid__n_latents=[32],
            grid__target_l0=[2.0, 6.0],
            grid__lr=None,
            train__tokens=51_200,
        )
    )
    result = run_sweep(spec)
    assert sorted(r.point.target_l0 for r in result.finished.values()) == [2.0, 6.0]
    coefficients = {name: r.point.l1_coef for name, r in result.finished.items()}
    assert all(value is not None and value != 1.0 for value in coefficients.values())  # steered from 1
    by_target = {r.point.target_l0: r.point.l1_coef for r in result.finished.values()}
    assert by_target[2.0] > by_target[6.0]  # the sparser target needed the larger coefficient
    entries = pull("targets", str(tmp_path / "pulled"), include_all=True)
    for entry in entries:
        assert entry["target_l0"] in (2.0, 6.0)
        assert entry["l1_coef"] == pytest.approx(coefficients[entry["path"]])
    [selected] = json.loads((tmp_path / "dictionaries/targets/index.json").read_text())
    assert selected["target_l0"] in (2.0, 6.0) and selected["l1_coef"] == pytest.approx(coefficients[selected["path"]])
