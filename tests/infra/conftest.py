"""Loading the deployment files once for the infra tests: Kubernetes objects, the compose stack
(with its `${VAR:-default}` values filled in as compose would with no .env), the launcher YAML."""

import re
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"


def load_documents(path: Path) -> list:
    """Every YAML document of a file (multi-document files included), empty ones dropped."""
    with open(path) as file:
        return [doc for doc in yaml.safe_load_all(file) if doc is not None]


def interpolate(value, env: dict | None = None):
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR-default}; $$ is a literal $."""
    env = env or {}
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, default = match.group(1), match.group(2), match.group(3) or ""
        if operator == ":-":
            return env.get(name) or default
        if operator == "-":
            return env.get(name, default)
        return env.get(name, "")

    return re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|-)([^}]*))?\}", substitute, value)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def version() -> str:
    with open(REPO / "pyproject.toml", "rb") as file:
        return tomllib.load(file)["project"]["version"]


@pytest.fixture(scope="session")
def k8s_objects() -> list[tuple[Path, dict]]:
    """(file, object) for every object of infra/k8s/*.yaml."""
    return [(path, doc) for path in sorted((INFRA / "k8s").glob("*.yaml")) for doc in load_documents(path)]


@pytest.fixture(scope="session")
def compose() -> dict:
    """infra/compose/compose.yaml with its variables at their defaults."""
    return interpolate(load_documents(INFRA / "compose" / "compose.yaml")[0])


@pytest.fixture(scope="session")
def compose_gpu() -> dict:
    """infra/compose/compose.gpu.yaml (the GPU override) with its variables at their defaults."""
    return interpolate(load_documents(INFRA / "compose" / "compose.gpu.yaml")[0])
