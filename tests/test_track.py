"""What a person sees of a sweep in MLflow: the experiment opens on the SAEs' runs table, the sweep's
run holds the comparison of its SAEs, and the SAEs' curves share keys and steps so the chart view
overlays them. Against a real `mlflow server`, viewed in headless Chromium."""

import csv
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dictsweep.track import KIND_TAG, TRAINING_KIND, Tracker

SAES = ["relu-n64-l1_1-lr0.0003-s0", "relu-n64-l1_3-lr0.0003-s0", "topk-n128-k8-lr0.0003-s0"]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--virtual-time-budget=20000",
    "--window-size=1600,1000",
]


def log_sweep(uri: str, experiment: str) -> Tracker:
    """Record a sweep of three SAEs as the driver does: parent, children with params, training
    metrics over tokens, final eval metrics, the comparison table, ends."""
    tracker = Tracker(uri, experiment)
    tracker.start_sweep(experiment, {"train.tokens": 4096})
    rows = []
    for index, name in enumerate(SAES):
        run = tracker.start_sae(name, {"architecture": name.split("-")[0], "n_latents": 64})
        for tokens in (1024, 2048, 3072, 4096):
            tracker.log_metrics(
                run, {"loss": 1.0 / tokens + index, "l0": 10.0 + index, "fvu": 0.5 / (index + 1)}, tokens
            )
        final = {"l0": 10.0 + index, "fvu": 0.3 / (index + 1), "dead_fraction": 0.0}
        tracker.log_metrics(run, {f"eval/{key}": value for key, value in final.items()}, 4096)
        tracker.end_run(run)
        rows.append({"name": name, "n_latents": 64, **final, "selected": index == 2})
    tracker.log_comparison(rows)
    tracker.end_run(tracker.parent_id)
    assert tracker.flush(patience=60)
    return tracker


def chromium(*args: str, profile: Path) -> str:
    done = subprocess.run(
        [shutil.which("chromium"), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.stdout


def test_sweep_records_comparison_and_shared_curves(mlflow_server, capfd):
    tracker = log_sweep(mlflow_server, "track-records")
    assert "View run" not in capfd.readouterr().out  # the console is the sweep's, not one line per run
    client = tracker.client
    assert client.get_experiment(tracker.experiment_id).tags[KIND_TAG] == TRAINING_KIND
    parent = tracker.parent_id
    names = {item.path for item in client.list_artifacts(parent)}
    assert {"saes.csv", "saes.json"} <= names
    local = client.download_artifacts(parent, "saes.csv", str(Path(os.environ.get("TMPDIR", "/tmp"))))
    table = list(csv.DictReader(io.StringIO(Path(local).read_text())))
    assert [row["name"] for row in table] == SAES and float(table[1]["fvu"]) == pytest.approx(0.15)
    rows = json.loads(Path(client.download_artifacts(parent, "saes.json", os.path.dirname(local))).read_text())
    assert rows[2]["selected"] is True
    children = client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(run.info.run_name for run in children) == SAES
    for run in children:  # same keys, step = tokens: the chart view draws one line per SAE on one chart
        history = client.get_metric_history(run.info.run_id, "loss")
        assert [point.step for point in history] == [1024, 2048, 3072, 4096]
    url = tracker.experiment_url()
    assert url.startswith(f"{mlflow_server}/#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning")


def test_local_store_url_points_at_mlflow_ui(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "local-url")
    assert tracker.experiment_url().startswith(f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs?")


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="needs chromium (apt-get install -y chromium) to view the MLflow UI headless",
)
def test_experiment_opens_on_the_runs_table(mlflow_server, tmp_path):
    tracker = log_sweep(mlflow_server, "track-ui")
    url = tracker.experiment_url()  # what the sweep prints, and the README says to open
    dom = chromium("--dump-dom", url, profile=tmp_path / "profile-dom")
    assert "Run Name" in dom, f"no runs table rendered at {url}"
    for name in SAES:
        assert name in dom, f"{name} is not in the runs table at {url}"
    assert "Evaluation runs" not in dom and "Overview" not in dom  # not the GenAI traces view
    shots = Path(os.environ.get("DICTSWEEP_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    chromium(f"--screenshot={shots / 'mlflow_runs.png'}", url, profile=tmp_path / "profile-shot")
    assert (shots / "mlflow_runs.png").stat().st_size > 10_000
