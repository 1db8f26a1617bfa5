"""reference.ENVIRONMENT is what the code reads: each name is read by the package (or by the
library it names), and every variable the package reads is listed."""

import importlib.util
import re
from pathlib import Path

import pytest

from dictsweep.reference import ENVIRONMENT

PACKAGE = Path(__file__).resolve().parents[2] / "service" / "dictsweep"
READ = re.compile(
    r"""(?:environ\.get|environ\.pop|getenv)\(\s*["']([A-Z][A-Z0-9_]*)["']|environ\[\s*["']([A-Z][A-Z0-9_]*)["']\s*\](?!\s*=[^=])"""
)  # reads, not assignments


def package_sources() -> dict[Path, str]:
    """The package's Python source, except the list itself."""
    return {path: path.read_text() for path in sorted(PACKAGE.rglob("*.py")) if path.name != "reference.py"}


def library_mentions(library: str, name: str) -> bool:
    """Whether the installed `library`'s Python source contains the quoted `name`."""
    spec = importlib.util.find_spec(library)
    assert spec is not None and spec.submodule_search_locations, f"{library} is not installed"
    needle = (f'"{name}"', f"'{name}'")
    for folder in spec.submodule_search_locations:
        for path in Path(folder).rglob("*.py"):
            text = path.read_text(errors="ignore")
            if any(quoted in text for quoted in needle):
                return True
    return False


def test_the_brief_names_are_listed():
    for name in (
        "MLFLOW_TRACKING_URI",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "MLFLOW_S3_ENDPOINT_URL",
        "RAY_ADDRESS",
        "RAY_AUTH_MODE",
    ):
        assert name in ENVIRONMENT


@pytest.mark.parametrize("name", sorted(name for name, var in ENVIRONMENT.items() if var.read_by == "dictsweep"))
def test_read_by_the_package(name):
    sources = package_sources()
    readers = [
        path.relative_to(PACKAGE) for path, text in sources.items() if f'"{name}"' in text or f"'{name}'" in text
    ]
    assert readers, (
        f"reference.ENVIRONMENT says dictsweep reads {name}, but no module of "
        f"service/dictsweep mentions it: fix the code or the list"
    )


@pytest.mark.parametrize("name", sorted(name for name, var in ENVIRONMENT.items() if var.read_by != "dictsweep"))
def test_read_by_the_named_library(name):
    library = ENVIRONMENT[name].read_by
    assert library_mentions(library, name), f"{library} (installed) never mentions {name}"


def test_every_variable_the_package_reads_is_listed():
    read = {}
    for path, text in package_sources().items():
        for match in READ.finditer(text):
            read.setdefault(match.group(1) or match.group(2), path.relative_to(PACKAGE))
    assert read, "the pattern found no environment reads at all: it is broken"
    missing = {name: str(path) for name, path in read.items() if name not in ENVIRONMENT}
    assert not missing, (
        f"the package reads {missing} but service/dictsweep/reference.py ENVIRONMENT does "
        f"not list them: add each with what it does, then "
        f"`python -m dictsweep.reference --write docs/reference.md`"
    )


def test_descriptions_are_one_line():
    for name, var in ENVIRONMENT.items():
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", name)
        assert var.description and "\n" not in var.description, name
