"""docs/reference.md's generated blocks are what dictsweep.reference generates from the code, and they
cover every key of the spec model."""

import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

from dictsweep.config import SweepSpec
from dictsweep.reference import (
    ENVIRONMENT,
    ENVIRONMENT_MARKERS,
    SPEC_MARKERS,
    environment_markdown,
    generated_block,
    replace_block,
    spec_reference_markdown,
    spec_rows,
    write_blocks,
)

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference.md"
REGENERATE = "out of date: run `python -m dictsweep.reference --write docs/reference.md`"


def field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key path of a model, walked here independently of reference.py."""
    paths = []
    for name, field in model.model_fields.items():
        paths.append(prefix + name)
        annotation = field.annotation
        candidates = getattr(annotation, "__args__", None) or (annotation,)
        for candidate in candidates:
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                paths += field_paths(candidate, f"{prefix}{name}.")
    return paths


def test_spec_reference_in_the_docs_is_generated():
    block = generated_block(REFERENCE.read_text(), SPEC_MARKERS)
    assert block is not None, f"docs/reference.md has no {SPEC_MARKERS[0]} ... {SPEC_MARKERS[1]} block"
    assert block + "\n" == spec_reference_markdown(), f"the spec reference {REGENERATE}"


def test_environment_in_the_docs_is_generated():
    block = generated_block(REFERENCE.read_text(), ENVIRONMENT_MARKERS)
    assert block is not None
    assert block + "\n" == environment_markdown(), f"the environment table {REGENERATE}"
    for name in ENVIRONMENT:
        assert f"| `{name}` |" in block


def test_every_spec_key_is_documented_once_with_its_description():
    paths = field_paths(SweepSpec)
    assert "data.synth.n_features" in paths and "train.tokens" in paths and "export.dir" in paths
    rows = {key: (kind, default, description) for key, kind, default, description in spec_rows()}
    assert list(rows) == paths
    markdown = spec_reference_markdown()
    for path in paths:
        assert markdown.count(f"| `{path}` |") == 1, path
        assert rows[path][2], f"{path}: no description in config.py"


def test_defaults_and_types_are_the_models():
    rows = {key: (kind, default) for key, kind, default, _ in spec_rows()}
    spec = SweepSpec.model_validate({"name": "x", "data": {"uri": "d"}, "grid": {"n_latents": [8]}})
    assert rows["name"][1] == "required" and rows["grid.n_latents"][1] == "required"
    assert rows["train.tokens"] == ("integer, > 0", f"`{spec.train.tokens}`")
    assert rows["train.kernel"][0] == "one of `auto`, `bmm`, `loop`, `compile`"
    assert rows["tracking.uri"] == ("string or null", "`null`")
    assert rows["grid.architecture"][1] == '`["relu"]`'
    assert rows["data.synth"][0] == "section or null"


def test_the_module_prints_and_rewrites(tmp_path):
    printed = subprocess.run(
        [sys.executable, "-m", "dictsweep.reference"], capture_output=True, text=True, check=True
    ).stdout
    assert printed == spec_reference_markdown()
    stale = tmp_path / "reference.md"
    stale.write_text(
        f"# x\n\n{SPEC_MARKERS[0]}\nold\n{SPEC_MARKERS[1]}\n\ntext\n\n"
        f"{ENVIRONMENT_MARKERS[0]}\n{ENVIRONMENT_MARKERS[1]}\nend\n"
    )
    assert write_blocks(str(stale)) == ["spec-reference", "environment"]
    text = stale.read_text()
    assert generated_block(text, SPEC_MARKERS) + "\n" == spec_reference_markdown()
    assert text.startswith("# x\n\n") and "\ntext\n" in text and text.endswith("end\n")
    assert replace_block(text, SPEC_MARKERS, spec_reference_markdown()) == text  # idempotent
