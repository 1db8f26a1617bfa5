"""A transcoder sweep on a real local Ray cluster: the stream carries each row's target, the eval
metrics are against the target, the export loads in SAELens, and a grid point trains alone as in the
sweep; a spec that cannot train transcoders exits 2 naming why."""

import json

import pytest
import sae_lens
import torch

from dictsweep.errors import InputError
from dictsweep.spec_file import load_spec
from dictsweep.store.dataset import ActivationDataset
from dictsweep.sweep.run import run_sweep

from tests import conftest

BASE = {
    "data": {
        "uri": "data/transcoder",
        "synth": {
            "d_model": 16,
            "d_target": 12,
            "n_features": 32,
            "active": 3,
            "rows": 20_000,
            "eval_rows": 2048,
            "shard_rows": 4096,
            "seed": 1,
        },
    },
    "grid": {
        "architecture": ["batchtopk_skip_transcoder", "matryoshka_batchtopk_transcoder", "relu_transcoder"],
        "n_latents": [64],
        "l1_coef": [2.0],
        "k": [3],
        "matryoshka_prefixes": [[0.25]],
        "lr": [0.003],
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
    "evaluation": {"splice": False},
    "select": {"l0": [0, 64], "max_fvu": 1.0, "max_dead_fraction": 1.0, "per_size": "front"},
}


def eval_rows(dataset):
    """The eval split's inputs and targets, read here from the shards."""
    pairs = [dataset.read_shard(i, "eval", columns=True) for i in range(len(dataset.shards("eval")))]
    return torch.cat([acts for acts, _ in pairs]).float(), torch.cat([extra["target"] for _, extra in pairs]).float()


def test_transcoder_sweep_end_to_end(tmp_path, monkeypatch, ray_local):
    monkeypatch.chdir(tmp_path)
    result = run_sweep(load_spec(conftest.spec_file(tmp_path, BASE, "tc")))
    assert len(result.finished) == 3 and not result.failed
    dataset = ActivationDataset.open(str(tmp_path / "data/transcoder"))
    inputs, targets = eval_rows(dataset)
    index = json.loads((tmp_path / "dictionaries/tc/index.json").read_text())
    assert {entry["architecture"] for entry in index} <= set(BASE["grid"]["architecture"])
    for entry in index:
        sae = sae_lens.SAE.load_from_disk(str(tmp_path / "dictionaries/tc" / entry["path"]))
        assert sae.cfg.d_in == 16 and sae.cfg.d_out == 12
        with torch.no_grad():
            residual = (sae(inputs) - targets).pow(2).sum()
        fvu = float(residual / (targets - targets.mean(0)).pow(2).sum())
        # the sweep's eval FVU is the exported transcoder's, against the target, from raw inputs
        assert entry["metrics"]["fvu"] == pytest.approx(fvu, rel=1e-3), entry["path"]
        assert entry["metrics"]["fvu"] < 1.0  # better than the target's mean (12.8k tokens: barely, for relu)
        assert 0 < entry["metrics"]["mmcs_ground_truth"] <= 1  # decoder against the target features
        core = json.loads((tmp_path / "dictionaries/tc" / entry["path"] / "saebench_core.json").read_text())
        quality = core["eval_result_metrics"]["reconstruction_quality"]  # the end-of-sweep evaluation's, too
        assert quality["explained_variance"] == pytest.approx(1 - fvu, rel=1e-3), entry["path"]
        assert quality["mse"] == pytest.approx(float(residual) / len(targets), rel=1e-3)
    assert min(entry["metrics"]["fvu"] for entry in index) < 0.6
    assert any(
        entry["architecture"] == "matryoshka_batchtopk_transcoder" and entry["matryoshka_prefixes"] == [0.25]
        for entry in index
    )


def test_point_alone_trains_as_in_the_sweep(tmp_path, monkeypatch, ray_local):
    monkeypatch.chdir(tmp_path)
    grid = {**BASE["grid"], "architecture": ["batchtopk_skip_transcoder"]}
    shared = run_sweep(load_spec(conftest.spec_file(tmp_path, {**BASE, "grid": {**grid, "k": [3, 5]}}, "two")))
    alone = run_sweep(load_spec(conftest.spec_file(tmp_path, {**BASE, "grid": grid}, "one")))
    name = "batchtopk_skip_transcoder-n64-k3-lr0.003-s0"
    assert shared.finished[name].metrics["fvu"] == pytest.approx(alone.finished[name].metrics["fvu"], rel=1e-5)
    # one read of the data (acts and targets) per node, however many transcoders train on it
    assert shared.stream["bytes_read_per_node"] == alone.stream["bytes_read_per_node"]
    mine = sae_lens.SAE.load_from_disk(alone.finished[name].uri)
    theirs = sae_lens.SAE.load_from_disk(shared.finished[name].uri)
    for key, tensor in mine.state_dict().items():
        torch.testing.assert_close(tensor, theirs.state_dict()[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "grid,synth,words",
    [
        ({"architecture": ["relu", "relu_transcoder"]}, {}, "separate sweeps"),
        ({"architecture": ["relu_transcoder"]}, {"d_target": 0}, "need a transcoder dataset"),
        ({"architecture": ["relu_transcoder"]}, {"zero": "always"}, r"ZeRO trains only relu, topk, not \['relu_t"),
    ],
)
def test_a_spec_that_cannot_train_transcoders_names_why(tmp_path, monkeypatch, grid, synth, words):
    from dictsweep.sweep.preflight import preflight

    monkeypatch.chdir(tmp_path)
    resources = {"resources": {"zero": synth.pop("zero")}} if "zero" in synth else {}
    spec = {
        **BASE,
        **resources,
        "grid": {**BASE["grid"], **grid},
        "data": {**BASE["data"], "synth": {**BASE["data"]["synth"], **synth}},
    }
    with pytest.raises(InputError, match=words):
        preflight(load_spec(conftest.spec_file(tmp_path, spec, "bad")))


def test_baselines_are_refused_for_a_transcoder_sweep(tmp_path, monkeypatch):
    """PCA, ICA, ... reconstruct their input: no baseline is a map to the target (exit 2, not a late failure)."""
    from dictsweep.sweep.preflight import preflight

    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"baselines: \['pca'\] are SAE baselines"):
        preflight(load_spec(conftest.spec_file(tmp_path, {**BASE, "baselines": ["pca"]}, "bad")))


def test_the_memory_plan_counts_a_transcoder_at_its_widths():
    """A skip transcoder 256 -> 1024 holds W_enc [256, n], W_dec [n, 1024], b_dec [1024] and W_skip
    [256, 1024]: two fit where three SAEs of width 256 would; one too large for a device is not sent
    to ZeRO (it trains SAEs only) but fits nowhere, saying why."""
    from dictsweep.config import GridConfig, SweepSpec
    from dictsweep.sweep.plan import grid_points, make_plan, member_bytes

    spec = SweepSpec(
        name="plan",
        data={"uri": "unused"},
        grid=GridConfig(architecture=["relu_skip_transcoder"], n_latents=[4096], l1_coef=[1, 2, 3, 4]),
    )
    points = grid_points(spec)
    per = member_bytes(256, 4096, 512, d_out=1024, skip=True)
    assert per == 4 * (4 * ((256 + 1024) * 4096 + 4096 + 1024 + 256 * 1024) + 4 * 512 * 4096)
    assert 2 * per // member_bytes(256, 4096, 512) == 3  # an SAE-sized estimate would pack three
    plan = make_plan(points, 256, 512, "cpu", 1, 2 * per, 16, 0.0, d_target=1024)
    assert [[len(e.points) for e in wave[0].ensembles] for wave in plan.waves] == [[2], [2]]
    assert plan.waves[0][0].used_bytes == 2 * per
    tight = make_plan(points, 256, 512, "cuda", 4, per // 2, 16, 0.0, d_target=1024)
    assert not tight.waves and not tight.zero and len(tight.unplaced) == 4
    assert all("ZeRO trains only relu, topk" in why for why in tight.unplaced.values())


def test_training_curves_of_a_transcoder_are_in_the_targets_units(tmp_path, monkeypatch, ray_local):
    """The curve's mse is per element of the raw target (its width and scale), as eval/mse is: with a
    target 4 wide and an input 16 wide, counting it at the input's would be off 16-fold."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    synth = {**BASE["data"]["synth"], "d_target": 4, "rows": 8192}
    spec = {
        **BASE,
        "data": {"uri": "data/narrow", "synth": synth},
        "grid": {**BASE["grid"], "architecture": ["batchtopk_transcoder"]},
        "train": {**BASE["train"], "tokens": 7680},
    }
    result = run_sweep(load_spec(conftest.spec_file(tmp_path, spec, "units")))
    client = MlflowClient(result.tracking_uri)
    [outcome] = result.finished.values()
    last_mse = client.get_metric_history(outcome.run_id, "mse")[-1].value
    assert 0.5 < last_mse / outcome.metrics["mse"] < 2
