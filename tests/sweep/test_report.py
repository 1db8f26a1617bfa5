"""The Pareto plot: what is drawn (curves per architecture and size through their fronts, selected
points ringed, baselines as markers, off-scale baselines on the top edge), and that a finished sweep
leaves it in export.dir and on its MLflow run."""

import io

import matplotlib.image
import numpy as np
import pytest
import yaml

from dictsweep.spec_file import load_spec
from dictsweep.sweep.run import run_sweep
from dictsweep.sweep.report import pareto_figure, pareto_plot

SAES = [  # relu n=64: three on the front, one dominated; topk n=64: two
    {"architecture": "relu", "n_latents": 64, "l0": 20.0, "fvu": 0.10, "selected": True},
    {"architecture": "relu", "n_latents": 64, "l0": 5.0, "fvu": 0.40, "selected": True},
    {"architecture": "relu", "n_latents": 64, "l0": 10.0, "fvu": 0.20, "selected": False},
    {"architecture": "relu", "n_latents": 64, "l0": 12.0, "fvu": 0.30, "selected": False},
    {"architecture": "topk", "n_latents": 64, "l0": 4.0, "fvu": 0.35, "selected": True},
    {"architecture": "topk", "n_latents": 64, "l0": 8.0, "fvu": 0.15, "selected": False},
]
BASELINES = [
    {"kind": "pca", "k": 4, "l0": 4.0, "fvu": 0.6},
    {"kind": "pca", "k": 16, "l0": 16.0, "fvu": 0.0},
    {"kind": "random", "k": 16, "l0": 16.0, "fvu": 0.0},
    {"kind": "random", "k": 4, "l0": 4.0, "fvu": 3.5},
]


def labelled(axes) -> dict:
    return {line.get_label(): line for line in axes.get_lines() if not line.get_label().startswith("_")}


def test_pareto_figure_draws_fronts_selection_and_baselines():
    [axes] = pareto_figure(SAES, BASELINES).axes
    lines = labelled(axes)
    assert set(lines) == {"relu n=64", "topk n=64", "baseline: pca", "baseline: random"}
    relu = lines["relu n=64"]  # the front only, in order of L0: (12, 0.3) is beaten by (10, 0.2)
    assert list(relu.get_xdata()) == [5.0, 10.0, 20.0] and list(relu.get_ydata()) == [0.4, 0.2, 0.1]
    assert list(lines["topk n=64"].get_xdata()) == [4.0, 8.0]
    rings = [collection.get_offsets() for collection in axes.collections if len(collection.get_offsets())]
    assert sorted(map(tuple, np.concatenate(rings).tolist())) == [(4.0, 0.35), (5.0, 0.4), (20.0, 0.1)]
    top = axes.get_ylim()[1]
    assert top == pytest.approx(1.05)  # max(1, worst SAE FVU) with a margin
    assert list(lines["baseline: random"].get_ydata()) == [top, 0.0]  # FVU 3.5 drawn on the edge ...
    assert [text.get_text() for text in axes.texts] == ["random 3.5"]  # ... and labelled with its value
    assert lines["baseline: pca"].get_marker() == "s" and lines["baseline: random"].get_marker() == "x"


def test_pareto_figure_shades_the_band_and_draws_rejected_points_hollow():
    saes = SAES + [
        {"architecture": "relu", "n_latents": 64, "l0": 40.0, "fvu": 0.05, "selected": False, "rejected": True}
    ]
    [axes] = pareto_figure(saes, [], band=(2.0, 21.0)).axes
    lines = labelled(axes)
    assert set(lines) == {"relu n=64", "topk n=64", "rejected (band or bounds)"}
    hollow = [line for line in axes.get_lines() if line.get_markerfacecolor() == "none" and len(line.get_xdata())]
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in hollow] == [([40.0], [0.05])]
    [band] = [patch for patch in axes.patches if patch.get_label().startswith("L0 band")]
    assert band.get_label() == "L0 band [2, 21]"
    assert band.get_x() == 2.0 and band.get_width() == pytest.approx(19.0)


def test_pareto_plot_is_a_png():
    image = matplotlib.image.imread(io.BytesIO(pareto_plot(SAES, BASELINES, title="t")), format="png")
    assert image.shape[:2] == (550, 1000)


def test_sweep_leaves_the_plot_in_export_dir_and_on_its_run(tmp_path, monkeypatch, ray_local):
    monkeypatch.chdir(tmp_path)
    spec = {
        "name": "plotted",
        "data": {
            "uri": "data/toy",
            "synth": {
                "d_model": 8,
                "n_features": 16,
                "active": 2,
                "rows": 4096,
                "eval_rows": 512,
                "shard_rows": 2048,
                "seed": 2,
            },
        },
        "grid": {"architecture": ["topk"], "n_latents": [16], "k": [2, 4], "lr": [0.003]},
        "train": {
            "tokens": 2048,
            "batch_rows": 256,
            "lr_warmup_steps": 2,
            "log_every_tokens": 1024,
            "eval_tokens": 512,
            "kernel": "bmm",
        },
        "baselines": ["pca"],
        "export": {"registry": False},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = run_sweep(load_spec(str(tmp_path / "spec.yaml")))

    png = (tmp_path / "dictionaries/plotted/pareto.png").read_bytes()
    assert matplotlib.image.imread(io.BytesIO(png), format="png").shape[:2] == (550, 1000)
    from mlflow import MlflowClient

    client = MlflowClient(result.tracking_uri)
    [parent] = client.search_runs(
        [client.get_experiment_by_name("plotted").experiment_id], "tags.`dictsweep.role` = 'sweep'"
    )
    # the sweep's run holds the plot beside the comparison of its SAEs
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["pareto.png", "saes.csv", "saes.json"]
    local = client.download_artifacts(parent.info.run_id, "pareto.png", str(tmp_path))
    assert open(local, "rb").read() == png
