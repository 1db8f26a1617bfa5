"""The options of `dictsweep inspect` (light: the CLI reads them for its help without torch)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from dictsweep.errors import CliOptions

SAMPLES = 64  # firing rows sampled per latent, from which the quantile contexts are drawn


class InspectConfig(CliOptions):
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


class EvalConfig(CliOptions):
    """What `dictsweep eval` (and a sweep's `evaluation.probing`) measures: SAEBench's core metrics on the
    eval rows, the spliced CE/KL, sparse probing and first-letter absorption on the dataset's own tokens."""

    flags = {"ks": "--k"}  # given once per k
    model_config = ConfigDict(extra="forbid")

    target: str = Field(
        description="An exported dictionary, a folder with index.json, or a sweep name (its selected dictionaries, from MLflow)."
    )
    data: str = Field(
        description="Activation dataset prefix (folder, file:// or s3://) the dictionaries were trained on."
    )
    out: str = Field("./eval", description="Folder for one JSON file per dictionary and evaluation, and eval.json.")
    tokens: int | None = Field(None, gt=0, description="Most eval rows the core metrics read; default: every eval row.")
    splice: bool = Field(
        True,
        description="Splice each dictionary into the dataset's source model for SAEBench's KL and CE loss scores (skipped, with a note, without one).",
    )
    splice_tokens: int = Field(65_536, gt=0, description="Held-out tokens the spliced evaluation runs over.")
    probing: bool = Field(True, description="Sparse probing and first-letter absorption on the dataset's own tokens.")
    probing_rows: int = Field(
        65_536, gt=0, description="Most rows of each split (train, eval) read for probing and absorption."
    )
    ks: list[Annotated[int, Field(gt=0)]] = Field(
        [1, 2, 5], min_length=1, description="k of the k-sparse probes (latents per probe)."
    )
    first_letters: int = Field(
        4, ge=0, le=26, description="First-letter probing tasks (the commonest letters) beside the token-class tasks."
    )
    rows_per_task: int = Field(4000, gt=1, description="Most rows (half positive) per probing task and split.")
    min_examples: int = Field(20, gt=0, description="Fewest rows in a probing task's smaller class and split.")
    absorption_max_k: int = Field(10, gt=0, description="Largest k of absorption's k-sparse probes (feature splits).")
    min_probe_f1: float = Field(
        0.6, ge=0, lt=1, description="Test F1 a letter's dense probe must beat for the letter to count in absorption."
    )
    min_letters: int = Field(
        20, ge=2, le=26, description="Fewest counted letters for an absorption score (SAEBench's min_feats_for_eval)."
    )
    seed: int = Field(42, description="Seed of the task rows' sampling and the probes.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where it runs: cuda, cpu, or cuda where available."
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI, to find a sweep by name (default: $MLFLOW_TRACKING_URI, else ./mlflow.db).",
    )
