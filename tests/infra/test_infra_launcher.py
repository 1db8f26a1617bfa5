"""The VM cluster-launcher YAML passes Ray's own config preparation and schema validation (offline,
the steps `ray up` runs before it talks to the cloud), runs our image, and starts Ray with the
environment the package reads."""

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from dictsweep.reference import ENVIRONMENT

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ray.scripts imports
LAUNCHER_FILES = sorted((REPO / "infra" / "ray").glob("*.yaml"))


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def prepared(config: dict) -> dict:
    """What `ray up` validates: the config merged with the provider's defaults, then checked
    against ray-schema.json (no cloud calls: bootstrap_config is the step after these)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


def ray_start(command: str):
    """The click context of the `ray start ...` at the end of a shell command line."""
    from ray.scripts.scripts import start

    words = shlex.split(command.split("&&")[-1])
    assert words[:2] == ["ray", "start"], command
    return start.make_context("start", words[2:])


def test_there_is_a_launcher_config():
    assert LAUNCHER_FILES, "infra/ray/*.yaml: no cluster-launcher config"


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_passes_rays_validation(path):
    prepared(load(path))


def test_the_validation_is_strict():
    """A misspelt key fails Ray's validation, so the test above means something."""
    import jsonschema

    config = load(LAUNCHER_FILES[0])
    config["available_node_types"]["gpu"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError):
        prepared(config)


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_nodes_run_our_image_with_nothing_installed_at_boot(path, version):
    config = prepared(load(path))
    assert re.fullmatch(rf"[\w.\-/:]*/dictsweep:{re.escape(version)}", config["docker"]["image"])
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert config[key] == [], f"{key}: the image holds everything; installs at boot drift from it"


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_gpu_workers_are_a_fixed_set(path):
    config = prepared(load(path))
    workers = {name: node for name, node in config["available_node_types"].items() if name != config["head_node_type"]}
    assert workers
    for name, node in workers.items():
        # the sweep plans on the GPUs present when it starts: no scale-from-zero
        assert node["min_workers"] == node["max_workers"] > 0, name
        assert re.match(r"(g|p)\d", node["node_config"]["InstanceType"]), f"{name}: not a GPU instance type"
    assert sum(node["max_workers"] for node in workers.values()) <= config["max_workers"]
    assert "--gpus all" in config["docker"].get("worker_run_options", [])
    assert config["available_node_types"][config["head_node_type"]]["resources"].get("CPU") == 0


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_ray_starts_with_the_environment_file(path):
    config = prepared(load(path))
    mounts = config["file_mounts"]
    env_files = [target for target in mounts if target.endswith(".env")]
    assert len(env_files) == 1, "one environment file mounted on every node"
    target = env_files[0]
    source = REPO / mounts[target]
    template = source.with_name(source.name + ".example")
    assert source.exists() or template.exists(), f"neither {source} nor {template}"
    names = {
        line.lstrip("# ").split("=", 1)[0]
        for line in template.read_text().splitlines()
        if re.match(r"#? ?[A-Z][A-Z0-9_]*=", line)
    }
    assert names <= set(ENVIRONMENT), f"{template.name}: unknown variables {names - set(ENVIRONMENT)}"
    assert {"MLFLOW_TRACKING_URI", "RAY_AUTH_MODE", "AWS_DEFAULT_REGION"} <= names
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = config[key][-1]
        assert f". {target}" in start and "set -a" in start, f"{key} does not load {target}"
    head = ray_start(config["head_start_ray_commands"][-1])
    assert head.params["head"] and head.params["port"] == 6379
    assert head.params["dashboard_host"] == "0.0.0.0"  # the Jobs API, reached via `ray dashboard`
    worker = ray_start(config["worker_start_ray_commands"][-1])
    assert worker.params["address"] == "$RAY_HEAD_IP:6379"


def test_env_files_stay_out_of_the_image(repo):
    assert "**/*.env" in (repo / ".dockerignore").read_text().splitlines()
