"""`manifest.json` of an activation dataset (format "dictsweep.activations/1", see DESIGN.md)."""

from __future__ import annotations

import json
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dictsweep.errors import DatasetError
from dictsweep.store import fs

FORMAT = "dictsweep.activations/1"
MANIFEST_NAME = "manifest.json"
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ShardInfo(BaseModel):
    """One shard: its path relative to the dataset prefix, row count, size and checksum."""

    model_config = ConfigDict(strict=True, extra="allow")

    path: str = Field(min_length=1, description="Path relative to the dataset prefix.")
    rows: int = Field(gt=0, description="Number of rows (activation vectors) in the shard.")
    bytes: int = Field(gt=0, description="Exact size of the shard file in bytes.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the shard file.")
    blake3: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="Hex BLAKE3 of the shard file: what readers check when it is there (a fifth of "
        "SHA-256's cost per byte, as strong); datasets written before it have SHA-256 alone.",
    )

    @field_validator("path")
    @classmethod
    def _relative(cls, path: str) -> str:
        return relative_path(path)


class Manifest(BaseModel):
    """The dataset's description; other tools may add keys, the listed ones are checked."""

    model_config = ConfigDict(strict=True, extra="allow")

    format: str
    d_model: int = Field(gt=0)
    dtype: Literal["float16", "bfloat16", "float32"]
    n_rows: int = Field(ge=0)
    shards: list[ShardInfo]
    eval_shards: list[ShardInfo]
    source: dict | None = None
    stats: dict | None = None
    ground_truth: str | None = None
    d_target: int | None = Field(
        default=None, gt=0, description="A transcoder dataset's target width (column `target`)."
    )

    @field_validator("ground_truth")
    @classmethod
    def _relative(cls, path: str | None) -> str | None:
        return None if path is None else relative_path(path)

    @field_validator("format")
    @classmethod
    def _supported(cls, value: str) -> str:
        if value != FORMAT:
            raise ValueError(
                f"found {value!r}, this version of dictsweep reads only {FORMAT!r} "
                "(upgrade dictsweep, or rewrite the dataset in this format)"
            )
        return value

    @model_validator(mode="after")
    def _rows_add_up(self) -> Manifest:
        train_rows = sum(shard.rows for shard in self.shards)
        if self.n_rows != train_rows:
            raise ValueError(
                f"field 'n_rows': {self.n_rows}, but the train shards hold {train_rows} "
                "rows (n_rows must equal the sum of shards[].rows)"
            )
        return self

    @classmethod
    def load(cls, uri: str) -> Manifest:
        """Read and check `<uri>/manifest.json`; DatasetError names what is missing or wrong."""
        manifest_uri = fs.join(uri, MANIFEST_NAME)
        try:
            text = fs.read_text(manifest_uri)
        except FileNotFoundError:
            raise DatasetError(
                f"{uri} has no {MANIFEST_NAME}: not a dictsweep dataset, or its writer did not finish"
            ) from None
        except (OSError, UnicodeDecodeError) as error:
            raise DatasetError(
                f"cannot read {manifest_uri}: {error} (check the path and your storage credentials)"
            ) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise DatasetError(
                f"{manifest_uri} is not valid JSON ({error}): rewrite it or re-run the dataset's writer"
            ) from None
        if not isinstance(data, dict):
            raise DatasetError(f"{manifest_uri}: expected a JSON object, found {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise DatasetError(f"{manifest_uri}: {describe_errors(error)}") from None

    def to_json(self) -> str:
        """The manifest as JSON text (optional fields left out when unset)."""
        return json.dumps(self.model_dump(exclude_none=True), indent=1) + "\n"


def relative_path(path: str) -> str:
    """`path` if it stays inside the dataset prefix, else ValueError."""
    if path.startswith("/") or "://" in path or ".." in path.split("/"):
        raise ValueError(f"{path!r} must be a path relative to the dataset prefix")
    return path


def describe_errors(error: ValidationError) -> str:
    """Pydantic's errors as `field 'a.b[0]': message; ...`."""
    parts = []
    for item in error.errors():
        where = ""
        for key in item["loc"]:
            where += f"[{key}]" if isinstance(key, int) else f".{key}" if where else str(key)
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] not in ("missing", "value_error") and "input" in item:
            found = repr(item["input"])
            message += f" (found {found if len(found) <= 80 else found[:77] + '...'})"
        parts.append(f"field '{where}': {message}" if where else message)
    return "; ".join(parts)
