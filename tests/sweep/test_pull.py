"""`dictsweep pull` against a tracking server where anyone may set run names and tags: names are
checked before they become paths, nothing is written outside --out, folders are replaced by renames."""

import json
import os

import pytest
import torch

from dictsweep import load_dictionary
from dictsweep.sae import Member, build_ensemble
from dictsweep.sae.export import member_files
from dictsweep.track import POINT_TAG, SELECTED_TAG, STATUS_TAG, Tracker

PARAMS = {"architecture": "relu", "n_latents": 16, "l1_coef": 1.0, "lr": 0.001, "seed": 0}


def dictionary(seed: int) -> dict[str, bytes]:
    ensemble = build_ensemble("relu", 8, 16, [Member(lr=1e-3, seed=seed, l1_coef=1.0)])
    return member_files(ensemble, 0, torch.zeros(16), {"model_name": "toy"})


def record_sweep(uri: str, sweep: str, points: dict[str, str | None], files=None) -> dict[str, str]:
    """A finished sweep in MLflow as `dictsweep run` leaves it; `points`: run name -> the point tag
    someone set afterwards (None: the tag removed, so the run name is used). Returns name -> run id."""
    tracker = Tracker(uri, sweep, patience=10)
    tracker.start_sweep(sweep, {})
    runs = {}
    for seed, (name, tag) in enumerate(points.items()):
        run = tracker.start_sae(name, PARAMS)

        def fetch(local, seed=seed):
            for file, data in (files or dictionary(seed)).items():
                with open(os.path.join(local, file), "wb") as handle:
                    handle.write(data)
            return local

        tracker.log_folder(run, fetch)
        tracker.set_tags(run, {STATUS_TAG: "finished", SELECTED_TAG: "true"})
        tracker.end_run(run)
        tracker.flush()
        if tag is None:
            tracker.client.delete_tag(run, POINT_TAG)
        elif tag != name:
            tracker.client.set_tag(run, POINT_TAG, tag)
        runs[name] = run
    return runs


def tree(folder) -> dict[str, bytes]:
    """Every file under `folder` (links not followed) and its bytes, MLflow's own store left out."""
    files = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "mlruns"]
        for name in names:
            path = os.path.join(root, name)
            if not name.startswith("mlflow.db"):
                with open(path, "rb") as file:
                    files[os.path.relpath(path, folder)] = file.read()
    return files


@pytest.fixture
def sqlite_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow keeps the artifacts of a sqlite store in ./mlruns
    return f"sqlite:///{tmp_path}/mlflow.db"


HOSTILE = ["../../victim", "VICTIM_ABSOLUTE", "a/b", "..", "", ".hidden", "x\\y", "name; rm -rf ~", "-rf", None]


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory):
    """One sqlite store with a sweep per hostile name (creating a store takes seconds): sweep i has a
    good run and one whose point tag is HOSTILE[i] (None: whose run name is hostile, without a tag)."""
    root = tmp_path_factory.mktemp("hostile")
    victim = root / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    uri, cwd, runs = f"sqlite:///{root}/mlflow.db", os.getcwd(), {}
    os.chdir(root)
    try:
        for index, tag in enumerate(HOSTILE):
            hostile = str(victim) if tag == "VICTIM_ABSOLUTE" else tag
            name = "../victim" if tag is None else "relu-n16-l1_1-lr0.001-s0"
            recorded = record_sweep(
                uri, f"hostile{index}", {"relu-n16-l1_2-lr0.001-s0": "relu-n16-l1_2-lr0.001-s0", name: hostile}
            )
            runs[index] = recorded[name]
    finally:
        os.chdir(cwd)
    return root, uri, runs


@pytest.mark.parametrize("index", range(len(HOSTILE)), ids=[repr(tag) for tag in HOSTILE])
def test_pull_refuses_a_hostile_name_and_writes_nothing(monkeypatch, run_cli, hostile_store, index):
    root, uri, runs = hostile_store
    monkeypatch.chdir(root)
    before = tree(root)
    code, output = run_cli(
        "pull", f"hostile{index}", "--all", "--out", str(root / "out" / "pulled"), "--tracking-uri", uri
    )
    assert code == 2, output
    assert runs[index] in output and "not a safe folder name" in output and "Traceback" not in output
    assert tree(root) == before  # nothing written or deleted anywhere, --out not even made
    assert not (root / "out").exists()


def test_pull_refuses_two_runs_of_one_name(tmp_path, sqlite_uri, run_cli):
    runs = record_sweep(sqlite_uri, "twice", {"a": "same", "b": "same"})
    code, output = run_cli("pull", "twice", "--all", "--out", str(tmp_path / "out"), "--tracking-uri", sqlite_uri)
    assert code == 2 and runs["a"] in output and runs["b"] in output and "'same'" in output
    assert not (tmp_path / "out").exists()


def test_pull_replaces_folders_by_renames_and_follows_no_link(tmp_path, sqlite_uri, run_cli):
    name, linked = "relu-n16-l1_1-lr0.001-s0", "relu-n16-l1_2-lr0.001-s0"
    record_sweep(sqlite_uri, "replace", {name: name, linked: linked})
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    out = tmp_path / "out"
    (out / name).mkdir(parents=True)
    (out / name / "stale.txt").write_text("from an older pull")
    os.symlink(outside, out / linked)  # a dictionary folder that is a link out of --out
    os.symlink(outside / "precious.txt", out / "index.json")
    code, output = run_cli("pull", "replace", "--all", "--out", str(out), "--tracking-uri", sqlite_uri)
    assert code == 0, output
    assert (outside / "precious.txt").read_text() == "keep me" and os.listdir(outside) == ["precious.txt"]
    for folder in (name, linked):
        assert not (out / folder).is_symlink()
        assert sorted(os.listdir(out / folder)) == ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
    assert sorted(os.listdir(out)) == ["index.json", name, linked]  # no staging folder left behind
    assert not (out / "index.json").is_symlink()
    assert [entry["path"] for entry in json.loads((out / "index.json").read_text())] == [name, linked]
    torch.testing.assert_close(
        load_dictionary(str(out / name)).W_dec.T,
        build_ensemble("relu", 8, 16, [Member(lr=1e-3, seed=0, l1_coef=1.0)]).member_state(0)["W_dec"].T,
    )


def test_a_dictionary_that_does_not_load_replaces_nothing(tmp_path, sqlite_uri, run_cli):
    name = "relu-n16-l1_1-lr0.001-s0"
    files = {**dictionary(0), "cfg.json": b'{"architecture": "standard", "d_in": 8,'}
    record_sweep(sqlite_uri, "garbled", {name: name}, files=files)
    out = tmp_path / "out"
    (out / name).mkdir(parents=True)
    (out / name / "kept.txt").write_text("an earlier dictionary")
    code, output = run_cli("pull", "garbled", "--all", "--out", str(out), "--tracking-uri", sqlite_uri)
    assert code == 2 and "cfg.json" in output and "Traceback" not in output, output
    assert sorted(os.listdir(out)) == [name] and os.listdir(out / name) == ["kept.txt"]


def test_an_artifact_folder_inside_a_dictionary_is_refused(tmp_path, sqlite_uri, run_cli):
    name = "relu-n16-l1_1-lr0.001-s0"
    runs = record_sweep(sqlite_uri, "nested", {name: name})
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "evil.txt").write_text("x")
    Tracker(sqlite_uri, "nested").client.log_artifacts(runs[name], str(extra), "dictionary/sub")
    code, output = run_cli("pull", "nested", "--all", "--out", str(tmp_path / "out"), "--tracking-uri", sqlite_uri)
    assert code == 2 and runs[name] in output and "dictionary/sub" in output, output
    assert os.listdir(tmp_path / "out") == []


def test_pull_through_a_tracking_server_refuses_a_hostile_tag(tmp_path, monkeypatch, run_cli, mlflow_server):
    monkeypatch.chdir(tmp_path)
    good, bad = "relu-n16-l1_1-lr0.001-s0", "relu-n16-l1_2-lr0.001-s0"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    runs = record_sweep(mlflow_server, "served-hostile", {good: good, bad: "../../victim"})
    before = tree(tmp_path)
    code, output = run_cli(
        "pull", "served-hostile", "--all", "--out", str(tmp_path / "a" / "b"), "--tracking-uri", mlflow_server
    )
    assert code == 2 and runs[bad] in output and "../../victim" in output, output
    assert tree(tmp_path) == before
    # the same server, the hostile run's tag put right: both dictionaries arrive and load
    Tracker(mlflow_server, "served-hostile").client.set_tag(runs[bad], POINT_TAG, bad)
    code, output = run_cli(
        "pull", "served-hostile", "--all", "--out", str(tmp_path / "a" / "b"), "--tracking-uri", mlflow_server
    )
    assert code == 0, output
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["index.json", good, bad]
    assert load_dictionary(str(tmp_path / "a" / "b" / bad)).W_dec.shape == (16, 8)
