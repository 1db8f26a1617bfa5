"""The options of `dictsweep inspect` (light: the CLI reads them for its help without torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dictsweep.errors import option_errors

SAMPLES = 64  # firing rows sampled per latent, from which the quantile contexts are drawn


class InspectConfig(BaseModel):
    """What `dictsweep inspect` reads and writes."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(
        description="An exported dictionary, a folder with index.json, or a sweep name (its selected dictionaries, from MLflow)."
    )
    data: str = Field(description="Activation dataset prefix (folder, file:// or s3://) whose train rows are read.")
    out: str = Field(
        "./inspect",
        description="Folder for one sub-folder per dictionary: latents.parquet and the feature browser (index.html).",
    )
    tokens: int | None = Field(
        None, gt=0, description="Most rows (tokens) read from the dataset; default: all train rows."
    )
    top: int = Field(20, gt=0, le=1000, description="Top-activating contexts kept per latent.")
    quantile_contexts: int = Field(
        6,
        ge=0,
        le=SAMPLES,
        description="Contexts per latent drawn from across its activation distribution (below the top).",
    )
    neighbours: int = Field(
        8,
        ge=0,
        description="Nearest latents by decoder direction listed per latent, in its own dictionary and in each other size.",
    )
    token_effects: int = Field(
        10,
        ge=0,
        description="Tokens most promoted and suppressed per latent (through the source model's output or tied input embedding).",
    )
    batch_rows: int = Field(
        1024, gt=0, description="Rows per batch of the pass (memory: batch_rows x n_latents floats per dictionary)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the pass runs: cuda, cpu, or cuda where available (auto)."
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI, to find a sweep by name (default: $MLFLOW_TRACKING_URI, else ./mlflow.db).",
    )

    @classmethod
    def from_cli(cls, **values) -> InspectConfig:
        try:
            return cls(**values)
        except ValidationError as error:
            raise option_errors(error, lambda field: "--" + field.split(".")[0].replace("_", "-")) from None
