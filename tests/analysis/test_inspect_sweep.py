"""`dictsweep inspect SWEEP`: the selected dictionaries of a sweep recorded in a real MLflow server
are inspected, and each one's data file and browser become artifacts of its run."""

import pyarrow.parquet as pq

from dictsweep.track import SELECTED_TAG, STATUS_TAG, Tracker
from tests.analysis.conftest import data_dictionary


def test_a_sweep_name_inspects_its_selected_dictionaries_and_logs_them(
    minilm_harvest, mlflow_server, tmp_path, run_cli
):
    uri, _ = minilm_harvest
    tracker = Tracker(mlflow_server, "inspect-sweep")
    tracker.start_sweep("inspect-sweep", {})
    runs = {}
    for name, n_latents, selected in (("relu-n16", 16, True), ("relu-n32", 32, True), ("relu-n24", 24, False)):
        folder = data_dictionary(tmp_path / "dicts" / name, uri, n_latents, seed=n_latents)
        runs[name] = tracker.start_sae(name, {"architecture": "relu", "n_latents": n_latents})
        tracker.log_folder(runs[name], lambda local, folder=folder: str(folder))
        tracker.set_tags(runs[name], {SELECTED_TAG: str(selected).lower(), STATUS_TAG: "finished"})
    tracker.flush(patience=60)

    code, output = run_cli(
        "inspect",
        "inspect-sweep",
        "--data",
        uri,
        "--out",
        str(tmp_path / "out"),
        "--tracking-uri",
        mlflow_server,
        "--top",
        "4",
        "--device",
        "cpu",
    )
    assert code == 0, output
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["index.html", "relu-n16", "relu-n32"]
    matches = pq.read_table(tmp_path / "out" / "relu-n16" / "latents.parquet").column("matches").to_pylist()
    assert {match["dictionary"] for latent in matches for match in latent} == {"relu-n32"}
    for name in ("relu-n16", "relu-n32"):
        logged = {item.path for item in tracker.client.list_artifacts(runs[name], "inspect")}
        assert {"inspect/latents.parquet", "inspect/index.html", "inspect/data.js", "inspect/latents"} <= logged
        local = tracker.client.download_artifacts(runs[name], "inspect/latents.parquet", str(tmp_path / name))
        assert pq.read_table(local).equals(pq.read_table(tmp_path / "out" / name / "latents.parquet"))
    assert not tracker.client.list_artifacts(runs["relu-n24"], "inspect")

    code, output = run_cli("inspect", "no-such-sweep", "--data", uri, "--tracking-uri", mlflow_server)
    assert code == 2 and "no sweep named 'no-such-sweep'" in output


def test_a_sweep_with_evaluation_inspect_leaves_browsers_for_its_selected_saes(
    minilm_harvest, tmp_path, monkeypatch, ray_local
):
    import json

    import yaml

    from dictsweep.spec_file import load_spec
    from dictsweep.sweep.run import run_sweep

    uri, _ = minilm_harvest
    monkeypatch.chdir(tmp_path)
    spec = {
        "name": "inspect-end",
        "data": {"uri": uri},
        "grid": {"architecture": ["topk"], "n_latents": [64, 128], "k": [8], "lr": [0.001]},
        "train": {
            "tokens": 2048,
            "batch_rows": 256,
            "lr_warmup_steps": 2,
            "log_every_tokens": 1024,
            "eval_tokens": 256,
            "kernel": "bmm",
        },
        "stream": {"shuffle_shards": 2},
        "evaluation": {"splice": False, "inspect": True, "inspect_tokens": 1000},
        "select": {"max_fvu": 10.0, "max_dead_fraction": 1.0},  # 2k tokens: lenient bounds
        "export": {"registry": False},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = run_sweep(load_spec(str(tmp_path / "spec.yaml")))

    export = tmp_path / "dictionaries" / "inspect-end"
    selected = sorted(entry["path"] for entry in json.loads((export / "index.json").read_text()))
    assert selected and sorted(result.selected) == selected
    for name in selected:
        table = pq.read_table(export / "inspect" / name / "latents.parquet")
        assert table.num_rows == (64 if "n64" in name else 128)
        assert json.loads(table.schema.metadata[b"dictsweep.inspect"])["rows"] == 1000
        assert (export / "inspect" / name / "index.html").exists()
    from mlflow import MlflowClient

    client = MlflowClient(result.tracking_uri)
    for name in selected:
        logged = {item.path for item in client.list_artifacts(result.finished[name].run_id, "inspect")}
        assert {"inspect/latents.parquet", "inspect/index.html"} <= logged
