"""Synthetic activations with known features: the toy-superposition setting for testing SAEs.

Feature i fires with probability p_i (proportional to decay**i, summing to `active`) with a
magnitude uniform in [0, 1); a row is the sum of its firing features' unit directions times their
magnitudes, plus optional isotropic noise. The directions are saved as the ground truth.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
from pydantic import ConfigDict, Field, ValidationInfo, field_validator

from dictsweep.errors import CliOptions, number_not_boolean

if TYPE_CHECKING:
    import torch

    from dictsweep.store.manifest import Manifest

# torch and the writer are imported inside the functions: the CLI imports SynthConfig for its help
CHUNK_ROWS = 65_536  # rows generated at once (independent firing): memory grows with rows * active
CORRELATED_CHUNK_CELLS = 1 << 24  # correlated firing draws dense [rows, n_features] latents
CORRELATION_RANK = 8  # rank of the random correlation between features (when correlation > 0)


class SynthConfig(CliOptions):
    """What `dictsweep synth` generates."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    d_model: int = Field(64, gt=0, description="Width of each activation vector.")
    n_features: int = Field(512, gt=0, description="Number of ground-truth feature directions.")
    active: float = Field(5.0, gt=0, description="Mean number of features active in a row.")
    rows: int = Field(1_000_000, gt=0, description="Rows in the train split.")
    eval_rows: int = Field(65_536, ge=0, description="Rows in the eval split (same distribution).")
    shard_rows: int = Field(65_536, gt=0, description="Rows per shard file.")
    decay: float = Field(
        0.99,
        gt=0,
        le=1,
        description="Feature i fires with probability proportional to decay**i (1 = all features equally often).",
    )
    correlation: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Strength of correlated firing "
        "(Gaussian copula over a random low-rank correlation; 0 = independent).",
    )
    noise: float = Field(0.0, ge=0, description="Std of isotropic Gaussian noise added to each row.")
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float32", description="Stored dtype: float16, bfloat16 or float32."
    )
    seed: int = Field(0, ge=0, description="Random seed: the same seed gives the same dataset.")
    d_target: int = Field(
        0,
        ge=0,
        description="A transcoder dataset: a `target` column of this width, each row the same sparse code times a second set of unit directions (the target features), with its own noise (0: no target).",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value, info: ValidationInfo):
        return number_not_boolean(cls, info.field_name, value)

    @field_validator("active")
    @classmethod
    def _at_most_all(cls, active: float, info: ValidationInfo) -> float:
        n_features = info.data.get("n_features")
        if n_features is not None and active > n_features:
            raise ValueError(f"{active} active features on average needs n_features >= {active}, got {n_features}")
        return active


class SynthModel(NamedTuple):
    """The fixed part of a synthetic dataset, drawn from the seed."""

    features: torch.Tensor  # [n_features, d_model] float32 unit rows: the ground truth
    probabilities: np.ndarray  # [n_features] float64 firing probability of each feature
    loadings: np.ndarray  # [n_features, CORRELATION_RANK] float32 unit rows: the copula's correlation
    target_features: torch.Tensor | None = None  # [n_features, d_target] unit rows: a transcoder's ground truth


def firing_probabilities(config: SynthConfig) -> np.ndarray:
    """p_i = min(1, scale * decay**i) with the scale that makes sum(p) == active ([n_features])."""
    weights = config.decay ** np.arange(config.n_features, dtype=np.float64)
    low, high = 0.0, config.active / weights[-1]  # at `high` every p_i is 1
    for _ in range(200):  # bisection: the clip at 1 rules out a closed form
        scale = (low + high) / 2
        if np.minimum(scale * weights, 1).sum() < config.active:
            low = scale
        else:
            high = scale
    return np.minimum(high * weights, 1)


def build_model(config: SynthConfig) -> SynthModel:
    """Feature directions, firing probabilities and correlation loadings for `config.seed`."""
    import torch

    rng = np.random.default_rng([config.seed, 0])
    features = rng.standard_normal((config.n_features, config.d_model))  # [n_features, d_model]
    loadings = rng.standard_normal((config.n_features, CORRELATION_RANK))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    loadings /= np.linalg.norm(loadings, axis=1, keepdims=True)
    target_features = None
    if config.d_target:  # drawn from a stream of its own: the input side is the same with or without a target
        target_features = np.random.default_rng([config.seed, 3]).standard_normal((config.n_features, config.d_target))
        target_features /= np.linalg.norm(target_features, axis=1, keepdims=True)  # [n_features, d_target]
        target_features = torch.from_numpy(target_features.astype(np.float32))
    return SynthModel(
        features=torch.from_numpy(features.astype(np.float32)),
        probabilities=firing_probabilities(config),
        loadings=loadings.astype(np.float32),
        target_features=target_features,
    )


def sample_rows(
    model: SynthModel, config: SynthConfig, rows: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` activations [rows, d_model] (float32) and their sparse coefficients [rows, n_features]."""
    import torch

    if config.correlation > 0:
        row_index, feature_index, magnitude = _correlated_fires(model, config, rows, rng)
    else:
        row_index, feature_index, magnitude = _independent_fires(model.probabilities, rows, rng)
    indices = torch.from_numpy(np.stack([row_index, feature_index]))  # [2, fires]
    coefficients = torch.sparse_coo_tensor(
        indices, torch.from_numpy(magnitude), size=(rows, config.n_features), check_invariants=True
    )
    acts = torch.sparse.mm(coefficients, model.features)  # [rows, d_model]
    if config.noise > 0:
        acts += config.noise * torch.from_numpy(rng.standard_normal((rows, config.d_model), dtype=np.float32))
    return acts, coefficients


def sample_targets(
    model: SynthModel, config: SynthConfig, coefficients: torch.Tensor, rng: np.random.Generator
) -> torch.Tensor:
    """The targets [rows, d_target] (float32) of rows with sparse `coefficients` [rows, n_features]:
    the same codes times the target features, plus their own noise."""
    import torch

    targets = torch.sparse.mm(coefficients, model.target_features)  # [rows, d_target]
    if config.noise > 0:
        targets += config.noise * torch.from_numpy(rng.standard_normal(tuple(targets.shape), dtype=np.float32))
    return targets


def _independent_fires(
    probabilities: np.ndarray, rows: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row, feature and magnitude of each firing: every feature picks its rows independently."""
    counts = rng.binomial(rows, probabilities)  # [n_features] rows each feature fires in
    row_index = np.concatenate([rng.choice(rows, count, replace=False) for count in counts])
    feature_index = np.repeat(np.arange(len(probabilities)), counts)
    return row_index, feature_index, rng.random(len(row_index), dtype=np.float32)


def _correlated_fires(
    model: SynthModel, config: SynthConfig, rows: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row, feature and magnitude of each firing through a Gaussian copula (dense latents)."""
    import torch

    # unit-variance latents correlated through the loadings; feature i fires when its latent is
    # below its p_i quantile, so each feature still fires with probability p_i
    shared = rng.standard_normal((rows, CORRELATION_RANK), dtype=np.float32) @ model.loadings.T
    own = rng.standard_normal((rows, config.n_features), dtype=np.float32)
    latent = math.sqrt(1 - config.correlation) * own + math.sqrt(config.correlation) * shared
    thresholds = torch.special.ndtri(torch.from_numpy(model.probabilities)).float().numpy()
    row_index, feature_index = np.nonzero(latent < thresholds)
    # given that it fires, Phi(latent) / p_i is uniform in [0, 1): that is the magnitude
    quantile = torch.special.ndtr(torch.from_numpy(latent[row_index, feature_index])).numpy()
    magnitude = quantile / model.probabilities[feature_index].astype(np.float32)
    return row_index, feature_index, magnitude.astype(np.float32)


def synth_dataset(out: str, config: SynthConfig, overwrite: bool = False) -> Manifest:
    """Write a synthetic dataset (train, eval, ground truth) to `out`; returns its manifest."""
    from dictsweep.store.dataset import DatasetWriter

    model = build_model(config)
    chunk_rows = CHUNK_ROWS  # not shard_rows: the same data whatever the shard size
    if config.correlation > 0:
        chunk_rows = max(1, min(CHUNK_ROWS, CORRELATED_CHUNK_CELLS // config.n_features))
    source = {
        "model": "synthetic",
        "hook": "toy-superposition",
        "dataset": describe(config),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if config.d_target:
        source["target_hook"] = "toy-superposition-target"
    writer = DatasetWriter(out, config.d_model, config.dtype, config.shard_rows, source, overwrite, config.d_target)
    with writer:
        for stream, split, rows in ((1, "train", config.rows), (2, "eval", config.eval_rows)):
            rng = np.random.default_rng([config.seed, stream])
            target_rng = np.random.default_rng([config.seed, stream, 1])
            for start in range(0, rows, chunk_rows):
                acts, coefficients = sample_rows(model, config, min(chunk_rows, rows - start), rng)
                target = sample_targets(model, config, coefficients, target_rng) if config.d_target else None
                writer.add(acts, split, target=target)
        return writer.close(ground_truth=model.features, target_ground_truth=model.target_features)


def describe(config: SynthConfig) -> str:
    """A one-line description of the generating config (the manifest's source.dataset)."""
    values = " ".join(
        f"{name}={value}"
        for name, value in config.model_dump().items()
        if name not in ("rows", "eval_rows", "shard_rows", "dtype") and not (name == "d_target" and not value)
    )
    return f"synthetic toy superposition: {values}"
