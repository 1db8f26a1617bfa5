"""What the docs and the deployment files are checked against: the environment variables dictsweep
reads, and the sweep spec's keys, generated from the config's own field descriptions.

    python -m dictsweep.reference                      # the spec reference (markdown) on stdout
    python -m dictsweep.reference environment          # the environment table
    python -m dictsweep.reference --write docs/reference.md    # rewrite both generated blocks in place
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from typing import Literal, NamedTuple, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo


class EnvVar(NamedTuple):
    """One environment variable: who reads it and what it does."""

    read_by: str  # "dictsweep" (this package's source reads it), else the library that does
    description: str


ENVIRONMENT: dict[str, EnvVar] = {
    "MLFLOW_TRACKING_URI": EnvVar(
        "dictsweep",
        "MLflow tracking URI when the spec has no `tracking.uri` "
        "(and for `dictsweep pull` without `--tracking-uri`); unset: "
        "`sqlite:///mlflow.db` in the working directory.",
    ),
    "AWS_ENDPOINT_URL": EnvVar(
        "dictsweep",
        "S3 API endpoint for `s3://` datasets, storage and exports (MinIO: `http://HOST:9000`); unset for AWS S3.",
    ),
    "AWS_ENDPOINT_URL_S3": EnvVar("dictsweep", "The same for S3 only; wins over `AWS_ENDPOINT_URL`."),
    "AWS_ACCESS_KEY_ID": EnvVar(
        "dictsweep", "S3 access key (botocore's default chain: unset, it uses `~/.aws`, an instance role or IRSA)."
    ),
    "AWS_SECRET_ACCESS_KEY": EnvVar("botocore", "S3 secret key, with `AWS_ACCESS_KEY_ID`."),
    "AWS_DEFAULT_REGION": EnvVar("dictsweep", "S3 region (`us-east-1` for MinIO)."),
    "AWS_PROFILE": EnvVar("dictsweep", "Named profile of `~/.aws/config` for S3 credentials."),
    "MLFLOW_S3_ENDPOINT_URL": EnvVar(
        "mlflow",
        "S3 endpoint of MLflow's own artifact uploads: needed by "
        "clients only when the tracking server does not proxy artifacts, "
        "and by a server whose `--artifacts-destination` is in MinIO.",
    ),
    "RAY_ADDRESS": EnvVar(
        "dictsweep",
        "Ray cluster that `dictsweep run` joins when `--address` is not "
        "given (`127.0.0.1:6379` on a head node); unset: a local Ray for the run.",
    ),
    "RAY_AUTH_MODE": EnvVar(
        "ray",
        "Ray token authentication: `disabled` for a loopback or private dev "
        "cluster, set alike on the cluster and where `dictsweep submit` runs; "
        "`token` (with `RAY_AUTH_TOKEN`) for a shared one.",
    ),
    "DICTSWEEP_JOB_ID": EnvVar(
        "dictsweep",
        "Set by `dictsweep submit` for the job's driver; recorded as the "
        "sweep run's `dictsweep.job_id` tag (not for users to set).",
    ),
    "HF_HUB_OFFLINE": EnvVar(
        "dictsweep", "`1`: `dictsweep harvest` loads models and datasets from the local cache only."
    ),
    "TRANSFORMERS_OFFLINE": EnvVar("dictsweep", "The same as `HF_HUB_OFFLINE` for transformers."),
}

SPEC_MARKERS = ("<!-- spec-reference:start -->", "<!-- spec-reference:end -->")
ENVIRONMENT_MARKERS = ("<!-- environment:start -->", "<!-- environment:end -->")


# -- the spec reference -------------------------------------------------------------------------------
def _section_model(annotation) -> type[BaseModel] | None:
    """The model of a section field (`X` or `X | None`), else None."""
    candidates = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _type_name(annotation) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        names = [_type_name(arg) for arg in args if arg is not type(None)]
        return " or ".join(names + (["null"] if type(None) in args else []))
    if origin is Literal:
        return "one of " + ", ".join(f"`{value}`" for value in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    names = {int: "integer", float: "number", str: "string", bool: "boolean"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _constraints(field: FieldInfo) -> list[str]:
    """The field's bounds and pattern, as a reader would write them."""
    words = []
    for item in field.metadata:
        for attribute, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(item, attribute, None)
            if value is not None:
                words.append(f"{symbol} {value:g}")
        if getattr(item, "min_length", None):
            words.append(f"at least {item.min_length} item{'s' if item.min_length > 1 else ''}")
        if getattr(item, "pattern", None):
            words.append(f"matching `{item.pattern}`")
    return words


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        return "(section)" if isinstance(value, BaseModel) else f"`{json.dumps(value)}`"
    return f"`{json.dumps(field.default)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def spec_rows(model: type[BaseModel] | None = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key path, type, default, description) of every key of the spec, sections before their keys."""
    from dictsweep.config import SweepSpec

    rows = []
    for name, field in (model or SweepSpec).model_fields.items():
        key = f"{prefix}{name}"
        kind = ", ".join([_type_name(field.annotation)] + _constraints(field))
        rows.append((key, kind, _default(field), field.description or ""))
        section = _section_model(field.annotation)
        if section is not None:
            rows.extend(spec_rows(section, f"{key}."))
    return rows


def spec_reference_markdown() -> str:
    """Every key of the sweep spec (YAML) with its type, default and description, as a markdown table."""
    lines = [
        "Generated from `dictsweep.config` by `python -m dictsweep.reference --write docs/reference.md`; "
        "every key can also be set with `--set KEY=VALUE`.",
        "",
        "| Key | Type | Default | Description |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| `{key}` | {_cell(kind)} | {_cell(default)} | {_cell(description)} |"
        for key, kind, default, description in spec_rows()
    ]
    return "\n".join(lines) + "\n"


def environment_markdown() -> str:
    """The environment variables as a markdown table."""
    lines = ["| Variable | Read by | What it does |", "| --- | --- | --- |"]
    lines += [f"| `{name}` | {var.read_by} | {_cell(var.description)} |" for name, var in ENVIRONMENT.items()]
    return "\n".join(lines) + "\n"


# -- generated blocks in markdown files ---------------------------------------------------------------
def generated_block(text: str, markers: tuple[str, str]) -> str | None:
    """What lies between the two markers in `text` (without the newlines next to them), or None."""
    start, end = markers
    if start not in text or end not in text:
        return None
    inner = text.split(start, 1)[1].split(end, 1)[0]
    return inner.removeprefix("\n").removesuffix("\n")


def replace_block(text: str, markers: tuple[str, str], content: str) -> str:
    """`text` with the block between the markers replaced by `content`."""
    start, end = markers
    if generated_block(text, markers) is None:
        raise ValueError(f"markers {start} ... {end} not found")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    return f"{head}{start}\n{content.rstrip(chr(10))}\n{end}{tail}"


def write_blocks(path: str) -> list[str]:
    """Rewrite every generated block found in the file at `path`; returns the blocks' names."""
    with open(path) as file:
        text = file.read()
    written = []
    for name, markers, content in (
        ("spec-reference", SPEC_MARKERS, spec_reference_markdown()),
        ("environment", ENVIRONMENT_MARKERS, environment_markdown()),
    ):
        if generated_block(text, markers) is not None:
            text = replace_block(text, markers, content)
            written.append(name)
    with open(path, "w") as file:
        file.write(text)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dictsweep.reference",
        description="Print the sweep spec reference or the environment table "
        "(markdown), or rewrite their blocks in a file.",
    )
    parser.add_argument(
        "what", nargs="?", choices=("spec", "environment"), default="spec", help="Which table to print (default: spec)."
    )
    parser.add_argument(
        "--write", metavar="FILE", help="Rewrite the generated blocks of FILE (e.g. docs/reference.md)."
    )
    args = parser.parse_args(argv)
    if args.write:
        written = write_blocks(args.write)
        if not written:
            print(f"{args.write}: no generated block ({SPEC_MARKERS[0]} or {ENVIRONMENT_MARKERS[0]})", file=sys.stderr)
            return 2
        print(f"{args.write}: rewrote {', '.join(written)}")
        return 0
    sys.stdout.write(spec_reference_markdown() if args.what == "spec" else environment_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
