"""pyproject.toml declares what the package imports: every third-party module that service/dictsweep
imports (read from the source, not from what happens to be installed alongside) belongs to a declared
distribution; one imported at a module's top level to a required dependency, since a plain install
must import it, one imported inside a function (an optional path) at least to an extra."""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")
from packaging.requirements import Requirement  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "service" / "dictsweep"
# modules the package reaches through another library's call rather than an import statement
INDIRECT = {"pandas": "pyarrow's DataType.to_pandas_dtype (store/shards.py, stream/actors.py) imports it"}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> tuple[set[str], set[str]]:
    """(required distributions, distributions of any extra), normalized."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = {normalized(Requirement(line).name) for line in project["dependencies"]}
    extras = {
        normalized(Requirement(line).name) for lines in project["optional-dependencies"].values() for line in lines
    }
    return required, extras


def imports(tree: ast.Module) -> tuple[set[str], set[str]]:
    """(top-level module names imported at module level, those imported inside functions)."""
    inside = {
        id(node)
        for function in ast.walk(tree)
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(function)
    }
    guarded = {  # `if TYPE_CHECKING:` blocks import nothing at run time
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    module_level, in_functions = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if id(node) in guarded:
            continue
        (in_functions if id(node) in inside else module_level).update(name.split(".")[0] for name in names)
    return module_level, in_functions


def third_party(names: set[str]) -> set[str]:
    return {name for name in names if name != "dictsweep" and name not in sys.stdlib_module_names}


def package_imports() -> tuple[dict[str, str], dict[str, str]]:
    """module name -> a file importing it, at module level and inside functions."""
    module_level, in_functions = {}, {}
    for path in sorted(PACKAGE.rglob("*.py")):
        top, inner = imports(ast.parse(path.read_text()))
        for name in third_party(top):
            module_level.setdefault(name, str(path.relative_to(REPO)))
        for name in third_party(inner) - third_party(top):
            in_functions.setdefault(name, str(path.relative_to(REPO)))
    return module_level, in_functions


def distributions(module: str) -> set[str]:
    """The installed distributions that provide `module` (normalized; mlflow and mlflow-skinny both do)."""
    found = importlib.metadata.packages_distributions().get(module)
    assert found, f"{module} is imported by the package but no installed distribution provides it"
    return {normalized(name) for name in found}


def test_the_walk_sees_the_known_imports():
    module_level, in_functions = package_imports()
    assert {"torch", "pyarrow", "pydantic", "safetensors", "typer"} <= set(module_level)
    assert {"mlflow", "transformers", "deepspeed", "sklearn"} <= set(module_level) | set(in_functions)
    assert "transformers" in in_functions  # the harvest's models load only when harvesting
    top, inner = imports(ast.parse("import a.b\nfrom c import d\ndef f():\n    import e\nfrom .x import y\n"))
    assert (top, inner) == ({"a", "c"}, {"e"})


def test_module_level_imports_are_required_dependencies():
    required, _ = declared()
    module_level, _ = package_imports()
    missing = {module: path for module, path in module_level.items() if not distributions(module) & required}
    assert not missing, f"imported at module level but not in pyproject's dependencies: {missing}"


def test_imports_inside_functions_are_declared_at_least_in_an_extra():
    required, extras = declared()
    _, in_functions = package_imports()
    missing = {module: path for module, path in in_functions.items() if not distributions(module) & (required | extras)}
    assert not missing, f"imported by {missing} but declared neither as a dependency nor in an extra"


@pytest.mark.parametrize("module", sorted(INDIRECT))
def test_modules_imported_through_other_libraries_are_required(module):
    required, _ = declared()
    assert distributions(module) & required, f"{module}: {INDIRECT[module]}; declare it in pyproject's dependencies"
