"""`dictsweep inspect SWEEP`: the selected dictionaries of a sweep recorded in a real MLflow server
are inspected, and each one's data file and browser become artifacts of its run."""

import pyarrow.parquet as pq

from dictsweep.track import SELECTED_TAG, STATUS_TAG, Tracker
from tests.analysis.conftest import data_dictionary


def test_a_sweep_name_inspects_its_selected_dictionaries_and_logs_them(minilm_harvest, mlflow_server, tmp_path,
                                                                        run_cli):
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

    code, output = run_cli("inspect", "inspect-sweep", "--data", uri, "--out", str(tmp_path / "out"),
                           "--tracking-uri", mlflow_server, "--top", "4", "--device", "cpu")
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
