"""A sweep spec file: read as YAML, `--set KEY=VALUE` overrides applied, validated against
`config.SweepSpec` with one error line per failing field (naming the file or the `--set`), and the
settings that validate but cannot do what they say.
"""

from __future__ import annotations

import difflib
from typing import Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from dictsweep.config import SweepSpec
from dictsweep.errors import InputError


def apply_override(raw: dict, assignment: str) -> tuple[str, ...]:
    """Apply one `--set key.path=value` to a raw spec dict (value parsed as YAML); returns the key path."""
    if "=" not in assignment:
        raise InputError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.tokens=20000")
    path, _, text = assignment.partition("=")
    keys = path.strip().split(".")
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise InputError(f"--set {assignment}: '{key}' is not a section")
        node = child
    try:
        node[keys[-1]] = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise InputError(f"--set {assignment}: the value is not valid YAML: {error}") from None
    return tuple(keys)


def section_fields(location: tuple) -> list[str]:
    """The keys the spec allows in the section that holds `location` (a field error's path)."""
    model: type[BaseModel] | None = SweepSpec
    for part in location[:-1]:
        field = model.model_fields.get(str(part)) if model else None
        annotation = field.annotation if field else None
        if get_origin(annotation) in (Union, type(int | None)):  # `SynthConfig | None`
            annotation = next((arg for arg in get_args(annotation) if arg is not type(None)), None)
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return list(model.model_fields) if model else []


def hint(item: dict) -> str:
    """`; did you mean 'n_latents'?` for an unknown key close to a known one."""
    if item["type"] != "extra_forbidden":
        return ""
    known = section_fields(item["loc"])
    close = difflib.get_close_matches(str(item["loc"][-1]), known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; known keys here: {', '.join(known)}" if known else ""


def describe_errors(error: ValidationError, where: str, overrides: dict[tuple, str] | None = None) -> str:
    """One line per failing field: `spec.yaml: field 'grid.n_latents': ...`, or `--set KEY=VALUE: ...`
    for a field that a `--set` gave (`overrides`: key path -> assignment)."""
    lines = []
    for item in error.errors():
        location = tuple(str(part) for part in item["loc"])
        field = ".".join(location) or "(top level)"
        source = next(
            (
                f"--set {assignment}"
                for path, assignment in (overrides or {}).items()
                if location[: len(path)] == path or path[: len(location)] == location
            ),
            where,
        )
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "not a key of this section"
        lines.append(f"{source}: field '{field}': {message}{hint(item)}")
    return "\n".join(lines)


def load_spec(path: str, overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    """Read and validate a sweep spec; InputError names the file (or the `--set`) and every failing field."""
    try:
        with open(path) as file:
            raw = yaml.safe_load(file) or {}
    except FileNotFoundError:
        raise InputError(f"{path}: no such spec file") from None
    except yaml.YAMLError as error:
        raise InputError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a spec is a mapping of sections (name, data, grid, ...)")
    given = {apply_override(raw, assignment): assignment for assignment in overrides}
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as error:
        raise InputError(describe_errors(error, path, given)) from None


def spec_warnings(spec: SweepSpec, eval_rows: int | None = None, step_rows: int | None = None) -> list[str]:
    """Settings that validate but cannot do what they say; `eval_rows`: the dataset's eval split;
    `step_rows`: the largest optimizer step of the grid's architectures (default: the batch)."""
    train, notes = spec.train, []
    step_rows = step_rows or train.batch_rows
    steps = train.tokens // train.batch_rows * (train.batch_rows // step_rows)
    if train.lr_warmup_steps >= steps:
        notes.append(
            f"train.lr_warmup_steps ({train.lr_warmup_steps}) is not shorter than training "
            f"({steps} steps of {step_rows} rows in train.tokens={train.tokens}): "
            f"the learning rate never reaches grid.lr"
        )
    if eval_rows is not None and train.eval_tokens > eval_rows:
        notes.append(
            f"train.eval_tokens ({train.eval_tokens}) is more than the eval split holds ({eval_rows} "
            f"rows): final metrics use {eval_rows // train.batch_rows * train.batch_rows} rows "
            f"(whole batches of {train.batch_rows})"
        )
    return notes
