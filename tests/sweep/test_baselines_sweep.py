"""Baselines in a sweep on a real local Ray cluster and real MLflow: fed the trainers' own batches
without holding them up, fitted, matched to the selected SAEs' L0, evaluated like the SAEs,
exported, and recorded as MLflow runs of their own."""

import json
import os
import threading
import time

import numpy as np
import pytest
import torch
import yaml

from dictsweep import load_dictionary
from dictsweep.spec_file import load_spec
from dictsweep.store.dataset import ActivationDataset
from dictsweep.errors import InputError
from dictsweep.sweep.baselines import BaselineFeed, BaselineSampler, planned_batches
from dictsweep.sweep.driver import Driver
from dictsweep.sweep.run import run_sweep

SPEC = {
    "name": "baselines",
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
    "grid": {"architecture": ["relu", "topk"], "n_latents": [32], "l1_coef": [1.0], "k": [3, 6], "lr": [0.003]},
    "train": {
        "tokens": 12_800,
        "batch_rows": 256,
        "lr_warmup_steps": 5,
        "log_every_tokens": 6400,
        "eval_tokens": 1536,
        "kernel": "bmm",
    },
    "select": {"l0": [0.5, 16], "max_fvu": 2.0, "max_dead_fraction": 1.0},  # 12.8k tokens: lenient bounds
    "stream": {"shuffle_shards": 2},
    "baselines": ["pca", "ica", "random", "identity"],
    "evaluation": {"baseline_rows": 5120, "ica_rows": 2048},
    "export": {"registry": False},
}


def eval_rows(dataset: ActivationDataset, rows: int) -> torch.Tensor:
    """The first `rows` eval rows in manifest order: the rows the SAEs were scored on."""
    return torch.cat([dataset.read_shard(i, "eval").float() for i in range(len(dataset.shards("eval")))])[:rows]


def fvu_of(dictionary, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((dictionary(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def spec_file(folder, name: str) -> str:
    """SPEC named `name` with every path under `folder` (the dataset shared by both sweeps)."""
    spec = json.loads(json.dumps(SPEC)) | {"name": name}
    spec["data"]["uri"] = str(folder.parent / "data/toy")
    spec["export"]["dir"], spec["storage"] = str(folder / "export"), {"dir": str(folder / "storage")}
    spec["tracking"] = {"uri": f"sqlite:///{folder.parent}/mlflow.db"}
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    return str(folder / "spec.yaml")


@pytest.fixture(scope="module")
def fed_sweep(tmp_path_factory, ray_local):
    """A sweep whose baselines are fed by its trainers' batches."""
    folder = tmp_path_factory.mktemp("sweeps") / "fed"
    folder.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder.parent)  # MLflow puts a sqlite store's artifacts in ./mlruns
        yield folder, run_sweep(load_spec(spec_file(folder, "baselines")))


def test_sweep_with_baselines(fed_sweep):
    folder, result = fed_sweep
    assert len(result.finished) == 3 and not result.failed

    # one top-k variant per selected SAE's eval L0 (rounded, deduplicated) and the complete one, per kind
    ks = sorted({max(1, round(result.finished[name].metrics["l0"])) for name in result.selected} | {16})
    assert sorted((b.kind, b.k) for b in result.baselines) == sorted(
        (kind, k) for kind in ("pca", "ica", "random", "identity") for k in ks
    )
    baselines = {b.name: b for b in result.baselines}
    dataset = ActivationDataset.open(str(folder.parent / "data/toy"))
    x = eval_rows(dataset, 1536)
    for name, baseline in baselines.items():
        assert set(baseline.metrics) >= {"mse", "fvu", "l0", "dead_fraction", "mmcs_ground_truth"}
        assert baseline.uri.endswith(f"/baselines/{name}")
        dictionary = load_dictionary(baseline.uri)  # the export is what was scored
        assert dictionary.metadata["dictsweep"]["baseline"] == baseline.kind and dictionary.k == baseline.k
        assert fvu_of(dictionary, x) == pytest.approx(baseline.metrics["fvu"], rel=1e-4, abs=1e-6)
        assert baseline.metrics["l0"] == pytest.approx(baseline.k, abs=1e-6)
    for kind in ("pca", "ica", "random", "identity"):
        assert baselines[f"{kind}-k16"].metrics["fvu"] < 1e-6  # complete bases reconstruct exactly
    # PCA fitted on the sampled train batches: the covariance of 20 batches of 256 rows
    assert baselines["pca-k16"].fit == {"fit_rows": 20 * 256}
    assert baselines["ica-k16"].fit["fit_rows"] == 20 * (2048 // 20) and baselines["ica-k16"].fit["ica_converged"]
    # top-k PCA beats keeping the k leading axes (what the eval rows' own spectrum allows), up to sampling
    variance = torch.linalg.eigvalsh(torch.cov(x.double().t(), correction=0)).flip(0)
    for k in ks[:-1]:
        assert baselines[f"pca-k{k}"].metrics["fvu"] <= float(variance[k:].sum() / variance.sum()) + 0.02
        assert baselines[f"pca-k{k}"].metrics["fvu"] < baselines[f"random-k{k}"].metrics["fvu"]
    # ICA recovers the ground-truth directions better than PCA does (a non-Gaussian, sparse mixture)
    assert baselines["ica-k16"].metrics["mmcs_ground_truth"] > baselines["pca-k16"].metrics["mmcs_ground_truth"]

    from mlflow import MlflowClient

    client = MlflowClient(result.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("baselines").experiment_id])
    recorded = {r.info.run_name: r for r in runs if r.data.tags.get("dictsweep.role") == "baseline"}
    assert set(recorded) == set(baselines)
    assert len([r for r in runs if r.data.tags.get("dictsweep.role") == "sae"]) == 3
    parent = [r for r in runs if r.data.tags.get("dictsweep.role") == "sweep"][0]
    for name, run in recorded.items():
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["kind"] == baselines[name].kind and run.data.params["k"] == str(baselines[name].k)
        assert run.data.metrics["eval/fvu"] == pytest.approx(baselines[name].metrics["fvu"])
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["dictionary"]
    assert (
        parent.data.tags["dictsweep.splice"].startswith("skipped: ")
        and "synthetic" in parent.data.tags["dictsweep.splice"]
    )
    index = json.loads((folder / "export/index.json").read_text())
    assert all({"fvu", "mse", "l0", "dead_fraction", "mmcs_ground_truth"} <= set(entry["metrics"]) for entry in index)


def test_baselines_fed_after_training_equal_those_fed_during_it(monkeypatch, fed_sweep):
    """As after a resume that found every wave done: the sampler gets nothing from the trainers and is
    fed the planned batches at the end, from a broadcaster of its own. The same batches, so the same
    baselines."""
    original = Driver.start_baseline_feed
    monkeypatch.setattr(
        Driver, "start_baseline_feed", lambda self, node: original(self, node) if node is None else None
    )  # not during waves
    folder = fed_sweep[0].parent / "alone"
    folder.mkdir()
    monkeypatch.chdir(folder.parent)
    alone = run_sweep(load_spec(spec_file(folder, "alone")))
    fed = {b.name: b for b in fed_sweep[1].baselines}
    assert sorted(fed) == sorted(b.name for b in alone.baselines)
    for baseline in alone.baselines:
        assert baseline.fit == fed[baseline.name].fit
        expected = fed[baseline.name].metrics
        assert baseline.metrics == pytest.approx(expected, rel=1e-5, abs=1e-7), baseline.name


def test_planned_batches_spread_over_the_stream():
    assert planned_batches(50, 256, 5120) == [
        0,
        2,
        5,
        7,
        10,
        12,
        15,
        17,
        20,
        22,
        25,
        27,
        30,
        32,
        35,
        37,
        40,
        42,
        45,
        47,
    ]  # 20 batches: every 2.5th
    assert planned_batches(10, 256, 10**9) == list(range(10))  # fewer batches than the budget: all of them
    assert planned_batches(10, 256, 100) == [0]  # less than a batch: one


def test_sampler_state_comes_back_whole_and_a_planted_pickle_runs_nothing(tmp_path):
    state = tmp_path / "baselines" / "state.pt"
    batches = {index: np.random.default_rng(index).standard_normal((8, 4)).astype(np.float32) for index in (0, 3)}
    sampler = BaselineSampler(4, "float32", [0, 3], 5, str(state))
    for index, batch in batches.items():
        sampler.add(index, batch)  # the last planned batch saves the state
    restarted = BaselineSampler(4, "float32", [0, 3], 5, str(state))  # as after an actor restart
    assert restarted.pca.count == 16 and sorted(restarted.sample) == [0, 3]
    assert torch.equal(restarted.pca.sum_outer, sampler.pca.sum_outer)
    assert all(torch.equal(restarted.sample[index], torch.from_numpy(batch[:5])) for index, batch in batches.items())

    class Planted:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'ran')!r}, 'w').write('ran')",))

    torch.save({"count": Planted()}, state)  # what torch.load would have run
    with pytest.raises(InputError, match="state.pt: not a dictsweep checkpoint"):
        BaselineSampler(4, "float32", [0, 3], 5, str(state))
    assert not (tmp_path / "ran").exists()


def test_feed_never_waits_for_a_slow_sampler(ray_local, tmp_path):
    """A sampler that takes no batch until a gate opens: offering 40 batches still returns, at most
    `limit` calls are queued on it, the rest wait in the driver; draining delivers each planned batch
    once, in order (those no trainer offered come from `batch`)."""
    ray = ray_local
    gate = str(tmp_path / "open")

    @ray.remote(num_cpus=0)
    class GatedSampler:
        def __init__(self):
            self.seen = []

        def add(self, index, batch):
            while not os.path.exists(gate):
                time.sleep(0.01)
            self.seen.append((index, int(batch[0, 0])))
            return len(self.seen)

        def log(self):
            return self.seen

    actor = GatedSampler.remote()
    planned = planned_batches(40, 8, 8 * 10)  # every 4th batch
    feed = BaselineFeed(actor, planned, done=[0], limit=3)
    refs = {index: ray.put(np.full((8, 4), index, dtype=np.float32)) for index in range(40)}

    def offer_all():
        for index in range(30):  # as trainers send their steps; batches 32 and 36 are never sent
            feed.offer(index, refs[index])
            feed.offer(index, refs[index])  # a second trainer on the node: the same reference, taken once
            feed.pump()

    trainers = threading.Thread(target=offer_all, daemon=True)
    trainers.start()
    trainers.join(timeout=120)  # with the gate shut, a feed that waited on its sampler never returns
    waited = trainers.is_alive()
    open(gate, "w").close()
    assert not waited, "offering batches waited for the sampler"
    assert len(feed.in_flight) == 3 and len(feed.waiting) == 4 and not feed.complete
    feed.drain(lambda index: refs[index])
    assert feed.complete
    assert ray.get(actor.log.remote()) == [(index, index) for index in planned[1:]]
