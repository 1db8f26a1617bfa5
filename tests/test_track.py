"""What a person sees of a sweep in MLflow: the experiment opens on the SAEs' runs table with the
columns a researcher sorts by in view, the sweep's run holds the comparison of its SAEs, the SAEs'
curves share keys and steps so the chart view overlays them, final metrics are drawn as numbers, and
the activation dataset is each run's input. Against a real `mlflow server`, viewed in headless
Chromium (screenshots kept in $DICTSWEEP_SCREENSHOTS)."""

import asyncio
import csv
import io
import json
import os
from pathlib import Path

import pytest
import torch

from dictsweep.store.dataset import ActivationDataset, DatasetWriter
from dictsweep.track import KIND_TAG, TRAINING_KIND, Tracker
from dictsweep.track_views import EVAL_STEP, VIEW_TAG, dataset_input, run_url, runs_url, view_state
from tests.devtools import CHROMIUM, Browser

SAES = ["relu-n64-l0_4-lr0.0003-s0", "relu-n64-l0_8-lr0.0003-s0", "topk-n128-k8-lr0.0003-s0"]
SCREENSHOTS = Path(os.environ.get("DICTSWEEP_SCREENSHOTS", "/tmp/dictsweep-screenshots"))
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="needs chromium (apt-get install -y chromium) to view the MLflow UI headless"
)


def small_dataset(folder: Path) -> ActivationDataset:
    """A real activation dataset of 96 + 32 rows in 16 dimensions."""
    generator = torch.Generator().manual_seed(0)
    with DatasetWriter(str(folder), 16, shard_rows=64, source={"model": "toy-model", "hook": "layer.1"}) as writer:
        writer.add(torch.randn(96, 16, generator=generator))
        writer.add(torch.randn(32, 16, generator=generator), split="eval")
    return ActivationDataset.open(str(folder))


def log_sweep(uri: str, experiment: str, dataset: ActivationDataset | None = None) -> Tracker:
    """Record a sweep of three SAEs as the driver does: parent, children with params, the dataset as
    their input, training metrics over tokens, final eval metrics at EVAL_STEP, the selection's tags,
    the comparison table, the selected dictionary's registration, ends."""
    tracker = Tracker(uri, experiment)
    tracker.start_sweep(experiment, {"train.tokens": 4096})
    rows = []
    for index, name in enumerate(SAES):
        architecture = name.split("-")[0]
        sparsity = {"k": 8} if architecture == "topk" else {"target_l0": 4 * (index + 1)}
        run = tracker.start_sae(name, {"architecture": architecture, "n_latents": 64, **sparsity, "seed": 0})
        if dataset is not None:
            tracker.log_dataset(run, dataset_input(dataset.uri, dataset.manifest))
        for tokens in (1024, 2048, 3072, 4096):
            tracker.log_metrics(
                run, {"loss": 1.0 / tokens + index, "l0": 10.0 + index, "fvu": 0.5 / (index + 1)}, tokens
            )
        final = {"l0": 10.0 + index, "fvu": 0.3 / (index + 1), "dead_fraction": 0.0, "loss_recovered": 0.9}
        tracker.log_metrics(run, {f"eval/{key}": value for key, value in final.items()}, EVAL_STEP)
        tracker.set_tags(run, {"dictsweep.selected": str(index == 2).lower()})
        if index == 2:
            tracker.log_bytes(run, b"{}", "cfg.json", "dictionary")
            tracker.register(experiment, run, {"n_latents": 64})
        tracker.end_run(run)
        rows.append({"name": name, "n_latents": 64, **final, "selected": index == 2})
    tracker.log_comparison(rows)
    tracker.end_run(tracker.parent_id)
    assert tracker.flush(patience=60)
    return tracker


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


def test_the_dataset_is_each_runs_input_once(mlflow_server, tmp_path):
    dataset = small_dataset(tmp_path / "toy-acts")
    tracker = log_sweep(mlflow_server, "track-dataset", dataset)
    fields = dataset_input(dataset.uri, dataset.manifest)
    run = tracker.client.search_runs([tracker.experiment_id], f"attributes.run_name = '{SAES[0]}'")[0]
    tracker.log_dataset(run.info.run_id, fields)  # a resumed sweep logs it again
    assert tracker.flush(patience=60)
    for run in tracker.client.search_runs([tracker.experiment_id], "tags.`dictsweep.role` = 'sae'"):
        (logged,) = run.inputs.dataset_inputs  # one input, however often it was logged
        assert (logged.dataset.name, logged.dataset.digest) == ("toy-acts", fields["digest"])
        assert [(tag.key, tag.value) for tag in logged.tags] == [("mlflow.data.context", "train")]
        profile = json.loads(logged.dataset.profile)
        assert (profile["rows"], profile["eval_rows"], profile["d_model"]) == (96, 32, 16)
        assert (profile["model"], profile["hook"]) == ("toy-model", "layer.1")
        assert json.loads(logged.dataset.source) == {"uri": dataset.uri}
    # the digest is the rows', not the place's: a copy elsewhere has it, other rows do not
    copy = tmp_path / "elsewhere" / "toy-acts"
    copy.parent.mkdir()
    os.system(f"cp -r {tmp_path / 'toy-acts'} {copy}")
    assert dataset_input(str(copy), ActivationDataset.open(str(copy)).manifest)["digest"] == fields["digest"]
    other = small_dataset(tmp_path / "other")
    assert dataset_input(other.uri, other.manifest)["digest"] == fields["digest"]  # same seed, same rows
    with DatasetWriter(str(tmp_path / "changed"), 16, shard_rows=64) as writer:
        writer.add(torch.ones(96, 16))
        writer.add(torch.ones(32, 16), split="eval")
    changed = ActivationDataset.open(str(tmp_path / "changed"))
    assert dataset_input(changed.uri, changed.manifest)["digest"] != fields["digest"]


def test_the_saved_view_is_written_once_and_the_link_opens_it(mlflow_server):
    tracker = log_sweep(mlflow_server, "track-view")
    client, experiment = tracker.client, tracker.experiment_id
    tag = client.get_experiment(experiment).tags[VIEW_TAG]
    envelope = json.loads(tag)
    assert envelope["name"] and isinstance(envelope["createdAt"], int)
    assert json.loads(envelope["state"]) == view_state()
    assert json.loads(envelope["state"])["orderByKey"] == "metrics.`eval/fvu`"
    assert tracker.experiment_url() == (
        f"{mlflow_server}/#/experiments/{experiment}/runs?workflowType=machine_learning&viewStateShareKey=dictsweep-saes"
    )
    Tracker(mlflow_server, "track-view")  # a second sweep of the same name: the view stays as it is
    assert client.get_experiment(experiment).tags[VIEW_TAG] == tag
    client.set_experiment_tag(experiment, VIEW_TAG, json.dumps({**envelope, "state": "{}"}))  # saved over
    Tracker(mlflow_server, "track-view")
    assert json.loads(json.loads(client.get_experiment(experiment).tags[VIEW_TAG])["state"]) == view_state()
    from dictsweep.track import sweep_url

    assert sweep_url(mlflow_server, "track-view") == tracker.experiment_url()
    plain = client.create_experiment("made-elsewhere")  # no view: the link must not name one
    assert sweep_url(mlflow_server, "made-elsewhere") == runs_url(mlflow_server, plain, with_view=False)


def test_local_store_links_point_at_mlflow_ui(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "local-links")
    assert tracker.experiment_url().startswith("http://127.0.0.1:5000/#/experiments/")
    assert (
        run_url(tracker.uri, "3", "abc")
        == "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    )


# the table's columns, with where each one's header is drawn and where the visible table ends
MEASURE_TABLE = """JSON.stringify({
  visible: (r => [r.left, Math.min(r.right, window.innerWidth)])(
    document.querySelector('.ag-center-cols-viewport').getBoundingClientRect()),
  headers: Object.fromEntries([...document.querySelectorAll('.ag-header-cell[col-id]')].map(cell => {
    const r = cell.getBoundingClientRect(); return [cell.getAttribute('col-id'), [r.left, r.right]]; })),
  first_row: document.querySelector('.ag-pinned-left-cols-container .ag-row[row-index="0"]')?.innerText,
  assistant_open: document.body.innerText.includes('MLflow Assistant'),
})"""
# per chart card of a run's metric charts: its title, bars and lines drawn
MEASURE_CHARTS = """JSON.stringify([...document.querySelectorAll('[data-testid="experiment-view-compare-runs-card"]')]
  .map(card => [card.innerText.split('\\n')[0].trim(), card.querySelectorAll('.barlayer .trace').length,
                card.querySelectorAll('.scatterlayer .trace').length]))"""


@needs_chromium
def test_the_printed_link_shows_the_sae_columns_and_runs_open_as_model_training(mlflow_server, tmp_path):
    dataset = small_dataset(tmp_path / "toy-acts")
    tracker = log_sweep(mlflow_server, "track-ui", dataset)
    (version,) = tracker.client.search_model_versions("name = 'track-ui'")
    selected = tracker.client.search_runs([tracker.experiment_id], f"attributes.run_name = '{SAES[2]}'")[0]
    assert version.run_link == run_url(mlflow_server, tracker.experiment_id, selected.info.run_id)

    async def look() -> tuple[dict, str, list]:
        # a first visit at 1920 x 1080: MLflow opens its assistant panel beside the table
        async with Browser(tmp_path / "profile", 1920, 1080) as browser:
            await browser.open(tracker.experiment_url(), "document.querySelector('.ag-header-cell[col-id]')")
            table = json.loads(await browser.evaluate(MEASURE_TABLE))
            await browser.screenshot(SCREENSHOTS / "mlflow_runs.png")
            await browser.open(version.run_link, "document.body.innerText.includes('About this run')")
            page = await browser.evaluate("document.body.innerText")
            await browser.screenshot(SCREENSHOTS / "mlflow_run.png")
            charts_url = version.run_link.replace("?", "/model-metrics?")
            await browser.open(charts_url, "document.querySelectorAll('.js-plotly-plot').length >= 7")
            charts = json.loads(await browser.evaluate(MEASURE_CHARTS))
            await browser.screenshot(SCREENSHOTS / "mlflow_run_metrics.png")
        return table, page, charts

    table, page, charts = asyncio.run(look())
    assert table["assistant_open"], "the check is meant for a first visit, with MLflow's assistant panel open"
    wanted = [  # the columns a researcher sorts by that this sweep has values for, in this order
        "params.`architecture`",
        "params.`n_latents`",
        "params.`target_l0`",
        "params.`k`",
        "metrics.`eval/l0`",
        "metrics.`eval/fvu`",
        "metrics.`eval/dead_fraction`",
        "metrics.`eval/loss_recovered`",
        "tags.`dictsweep.selected`",
    ]
    left, right = table["visible"]
    for column in wanted:
        assert column in table["headers"], f"{column} is not drawn in the runs table"
        start, end = table["headers"][column]
        assert left - 1 <= start and end <= right + 1, (
            f"{column} at {start:.0f}-{end:.0f} px, outside {left:.0f}-{right:.0f}"
        )
    assert [table["headers"][column][0] for column in wanted] == sorted(
        table["headers"][column][0] for column in wanted
    )
    assert "metrics.`eval/mmcs_ground_truth`" not in table["headers"]  # no run has it: no empty column
    assert SAES[2] in table["first_row"]  # best eval FVU first
    assert "Evaluation runs" not in page and "Judges" not in page, "the run opened in MLflow's GenAI view"
    digest = dataset_input(dataset.uri, dataset.manifest)["digest"]
    assert f"toy-acts ({digest})" in page
    drawn = {}  # chart title -> [(bars, lines)]: "l0" and "fvu" have a training curve and a final value
    for title, bars, lines in charts:
        drawn.setdefault(title, []).append((bars, lines))
    for key in ("l0", "fvu", "dead_fraction", "loss_recovered"):  # final metrics: a bar with its value
        assert (1, 0) in drawn[key], f"eval/{key} is drawn as {drawn[key]} (bars, lines)"
    assert drawn["dead_fraction"] == drawn["loss_recovered"] == [(1, 0)]  # and no line of one point
    assert drawn["loss"][0][0] == 0 and drawn["loss"][0][1] >= 1  # a training curve stays a line over tokens
