"""The Dockerfile, read as text: a pinned CUDA-capable Ray base, dependencies (pinned inside
pyproject's ranges) before the source, the package installed, a non-root user, and no secrets
copied in or baked into the image (with .dockerignore keeping them out of the build context)."""

import re
import shlex
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
SECRET_PATHS = (
    ".env",
    "infra/compose/.env",
    "infra/ray/dictsweep.env",
    "service/dictsweep/.env",
    ".aws/credentials",
    "credentials",
    "jobs/credentials",
    "deploy/key.pem",
    "id_rsa",
    "service/secrets.env",
    ".env.production",
)
SECRET_WORDS = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE|CREDENTIAL|API_KEY", re.I)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines, joined = [], ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not joined and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        joined += line.removesuffix("\\").strip() + " "
        if not line.endswith("\\"):
            lines.append(joined.strip())
            joined = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def arg_defaults() -> dict[str, str]:
    defaults = {}
    for name, args in instructions():
        if name == "ARG" and "=" in args:
            key, value = args.split("=", 1)
            defaults[key.strip()] = value.strip().strip('"')
    return defaults


def expand(text: str) -> str:
    defaults = arg_defaults()
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults.get(m.group(1) or m.group(2), m.group(0)), text)


def copy_sources(args: str) -> list[str]:
    words = [w for w in shlex.split(args) if not w.startswith("--")]
    return words[:-1]


def pins() -> dict[str, Requirement]:
    requirements = {}
    for line in (REPO / "infra" / "docker" / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            requirements[canonicalize_name(requirement.name)] = requirement
    torch_version = arg_defaults()["TORCH_VERSION"]
    requirements["torch"] = Requirement(f"torch=={torch_version}")
    return requirements


def pinned_version(requirement: Requirement) -> str:
    (specifier,) = requirement.specifier
    assert specifier.operator == "==", f"{requirement}: pin exact versions"
    return specifier.version


# -- .dockerignore, with Docker's rules: the last matching pattern wins, '!' re-includes, a pattern
# matching a folder matches everything under it
def ignore_patterns() -> list[tuple[bool, re.Pattern]]:
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = (
            re.escape(pattern)
            .replace(r"\*\*/", "(.*/)?")
            .replace(r"\*\*", ".*")
            .replace(r"\*", "[^/]*")
            .replace(r"\?", "[^/]")
        )
        patterns.append((include, re.compile(regex + "$")))
    return patterns


def in_context(path: str) -> bool:
    """Whether `path` (relative to the repository) reaches the Docker build context."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    included = True
    for include, regex in ignore_patterns():
        if any(regex.match(prefix) for prefix in prefixes):
            included = include
    return included


def test_one_pinned_cuda_capable_ray_base():
    froms = [args for name, args in instructions() if name == "FROM"]
    assert len(froms) == 1
    base = expand(froms[0])
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d+)-(gpu|cu\d+)", base)
    assert match, f"base image {base!r}: a pinned rayproject/ray GPU image"
    assert match.group(1) == pinned_version(pins()["ray"]), "the base image's Ray is the pinned Ray"


def test_runs_as_a_non_root_user():
    users = [args.split(":")[0].strip() for name, args in instructions() if name == "USER"]
    assert users and users[-1] not in ("root", "0"), f"final USER is {users[-1] if users else 'unset (root)'}"


def test_dependencies_before_source_then_the_package_installed():
    steps = instructions()
    index = {}
    for position, (name, args) in enumerate(steps):
        if name == "COPY" and "requirements.txt" in args:
            index.setdefault("copy requirements", position)
        if name == "RUN" and "pip install -r" in args:
            index.setdefault("install requirements", position)
        if name == "COPY" and any(source.rstrip("/") == "service" for source in copy_sources(args)):
            index.setdefault("copy source", position)
        if name == "RUN" and re.search(r"pip install (--no-deps )?\.(\s|$)", args):
            index.setdefault("install package", position)
    assert list(index) == ["copy requirements", "install requirements", "copy source", "install package"], index
    assert not any(name == "RUN" and re.search(r"pip install .*-e\b", args) for name, args in steps), (
        "install the package, not an editable link to a source folder"
    )


def test_copies_no_secrets_and_bakes_none_in():
    for name, args in instructions():
        if name in ("COPY", "ADD"):
            for source in copy_sources(args):
                assert source not in (".", "./", "*"), "copy named paths, not the whole context"
                assert not re.search(r"(^|/)(\.env|\.aws|credentials|[^/]*\.(pem|key))", source), source
        if name in ("ENV", "ARG"):
            keys = re.findall(r"(\w+)=", args) or [args.split()[0]]
            for key in keys:
                assert not SECRET_WORDS.search(key), f"{name} {key}: secrets come from the environment at run time"


def test_every_node_frees_released_windows_as_a_local_ray_does():
    """The Ray settings a local Ray gets (`LOCAL_RAY_CONFIG`) are the image's too, so that a
    cluster's object stores keep the stream's window budget as the tests' local Ray does."""
    from dictsweep.cluster import LOCAL_RAY_CONFIG

    env = {
        key: value for name, args in instructions() if name == "ENV" for key, value in re.findall(r"(\w+)=(\S+)", args)
    }
    assert {key: int(env[f"RAY_{key}"]) for key in LOCAL_RAY_CONFIG if f"RAY_{key}" in env} == LOCAL_RAY_CONFIG


def test_dockerignore_keeps_secrets_out_and_lets_the_sources_in():
    for _, args in [step for step in instructions() if step[0] in ("COPY", "ADD")]:
        for source in copy_sources(args):
            assert in_context(source), f"COPY {source}: excluded by .dockerignore"
    for path in SECRET_PATHS + (
        ".venv/bin/python",
        ".git/config",
        "mlflow.db",
        "data/quickstart/manifest.json",
        "service/dictsweep/__pycache__/cli.cpython-311.pyc",
    ):
        assert not in_context(path), f"{path} would be sent to the Docker build"
    assert in_context("service/dictsweep/cli.py") and in_context("jobs/quickstart.yaml")


@pytest.mark.parametrize("extra", [None, "harvest"])
def test_pins_satisfy_pyproject(extra):
    with open(REPO / "pyproject.toml", "rb") as file:
        project = tomllib.load(file)["project"]
    required = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    pinned = pins()
    for text in required:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} (pyproject) is not pinned in infra/docker/requirements.txt"
        version = pinned_version(pinned[name])
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{requirement.name}=={version} is outside pyproject's {requirement.specifier}"
        )
        assert set(requirement.extras) <= set(pinned[name].extras), f"{requirement.name}: extras {requirement.extras}"
