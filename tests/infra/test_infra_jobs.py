"""Every sweep spec the repository ships validates through the package's own spec model: each
jobs/*.yaml (however many there are), and each spec embedded in an infra ConfigMap."""

from pathlib import Path

import pytest
import yaml

from dictsweep.spec_file import load_spec

REPO = Path(__file__).resolve().parents[2]
JOBS = sorted((REPO / "jobs").glob("*.yaml")) + sorted((REPO / "jobs").glob("*.yml"))


def embedded_specs() -> list[tuple[str, str]]:
    """(where, text) of each sweep spec held in a ConfigMap of infra/k8s."""
    found = []
    for path in sorted((REPO / "infra" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "ConfigMap":
                for key, text in (doc.get("data") or {}).items():
                    if key.endswith((".yaml", ".yml")):
                        found.append((f"{path.name}:{doc['metadata']['name']}/{key}", text))
    return found


def test_every_job_spec_validates():
    # a loop, not parameters: passes with no jobs/*.yaml at all, and names the file that fails
    for path in JOBS:
        spec = load_spec(str(path))
        assert spec.name and spec.grid.n_latents, path


@pytest.mark.parametrize("where, text", embedded_specs(), ids=[where for where, _ in embedded_specs()])
def test_specs_in_configmaps_validate_and_use_object_storage(where, text, tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    spec = load_spec(str(path))
    # on a cluster every node reads the data and writes the sweep's storage: local paths would
    # name a different disk on each pod
    for key, uri in (("data.uri", spec.data.uri), ("storage.dir", spec.storage_dir), ("export.dir", spec.export_dir)):
        assert uri.startswith("s3://"), f"{where}: {key} is {uri!r}; a cluster needs an s3:// URI"


def test_the_cluster_spec_is_the_minilm_job_on_s3(tmp_path):
    """The RayJob's sweep is jobs/minilm-layer3.yaml with its paths on S3 (when that job exists)."""
    job = REPO / "jobs" / "minilm-layer3.yaml"
    if not job.exists():
        pytest.skip("jobs/minilm-layer3.yaml not written yet")
    local = load_spec(str(job))
    ((where, text),) = [item for item in embedded_specs() if "minilm-layer3" in item[0]]
    (tmp_path / "sweep.yaml").write_text(text)
    cluster = load_spec(str(tmp_path / "sweep.yaml"))
    assert cluster.name == local.name, where
    assert cluster.grid == local.grid, f"{where}: the grid differs from {job.name}"
    assert cluster.train == local.train, f"{where}: train differs from {job.name}"


def test_the_readme_describes_the_quickstart_job():
    """README: a sweep of relu SAEs at 3 sizes x 4 L0 targets over synthetic data with 512 features
    in 64 dims, dictionaries in ./dictionaries/quickstart."""
    job = REPO / "jobs" / "quickstart.yaml"
    if not job.exists():
        pytest.skip("jobs/quickstart.yaml not written yet")
    spec = load_spec(str(job))
    assert spec.grid.architecture == ["relu"]
    assert len(spec.grid.n_latents) == 3 and len(spec.grid.target_l0) == 4
    assert spec.data.synth is not None
    assert (spec.data.synth.n_features, spec.data.synth.d_model) == (512, 64)
    assert spec.export_dir == "./dictionaries/quickstart"
    readme = (REPO / "README.md").read_text()
    assert "3 dictionary sizes" in readme and "4 L0 targets" in readme and "512" in readme
