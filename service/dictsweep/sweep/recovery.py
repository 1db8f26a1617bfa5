"""Recovery of known features by the defaults: SAEs with only their grid set (sizes, and k or L0
targets), trained on synthetic activations whose feature directions are known, scored by mean max
cosine to them. `dictsweep bench recovery` prints it for one synthetic shape; the defaults' tests
train their small shapes through `train_synthetic`. Transcoders train on a synthetic transcoder dataset
(`d_target`: each row's target is its code times the target features) and are scored against the
target features.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from dictsweep.config import GridConfig, SweepSpec, TrainConfig
from dictsweep.sae import ARCHITECTURES, build_ensemble
from dictsweep.sae.hyperparameters import K, TARGET_L0
from dictsweep.sae.metrics import max_cosine, mmcs_ground_truth
from dictsweep.sae.transcoder import is_transcoder
from dictsweep.store.synth import SynthConfig, build_model, firing_probabilities, sample_rows, sample_targets
from dictsweep.sweep.plan import grid_points
from dictsweep.train.loop import EnsembleTrainer

SCALE_ROWS = 65_536  # rows whose mean squared norm sets the input scale (as a sweep does over its dataset)
FIRES_DECADES = (10, 100, 1_000, 10_000)  # edges of the expected-firing bands the best dictionary is scored in


def sparsity_grid(architecture: str, sparsity: list[float]) -> dict:
    """The grid key that sets `architecture`'s sparsity to `sparsity`: k where the architecture
    declares it (the top-k family), else an L0 target."""
    if any(parameter.key == K.key for parameter in ARCHITECTURES[architecture].hyperparameters):
        return {K.key: [round(value) for value in sparsity]}
    return {TARGET_L0.key: list(sparsity)}


def train_synthetic(
    synth: SynthConfig,
    acts: torch.Tensor,
    features: torch.Tensor,
    architecture: str,
    n_latents: int,
    sparsity: list[float],
    train: TrainConfig,
    targets: torch.Tensor | None = None,
) -> list[dict]:
    """Train the grid's points at `n_latents` on the rows `acts [tokens, d_model]` (in order, one pass,
    every other setting at `train`'s) and score each against `features [n_features, d_model]`; a
    transcoder maps the rows to their `targets [tokens, d_target]` and is scored against the target
    features (`features [n_features, d_target]`)."""
    spec = SweepSpec(
        name="recovery",
        data={"uri": "unused"},
        grid=GridConfig(architecture=[architecture], n_latents=[n_latents], **sparsity_grid(architecture, sparsity)),
        train=train,
    )
    points = grid_points(spec)
    options = {"d_out": targets.shape[1]} if targets is not None else {}
    ensemble = build_ensemble(architecture, synth.d_model, n_latents, [point.member() for point in points], **options)
    ensemble.input_scale.fill_(float((synth.d_model / acts[:SCALE_ROWS].pow(2).sum(-1).mean()).sqrt()))
    if targets is not None:  # each row its input then its target, as a transcoder sweep streams them
        ensemble.target_scale.fill_(float((targets.shape[1] / targets[:SCALE_ROWS].pow(2).sum(-1).mean()).sqrt()))
        acts = torch.cat([acts, targets], 1)  # [tokens, d_model + d_target]
    rows = spec.train.batch_rows
    steps = len(acts) // rows
    trainer = EnsembleTrainer(ensemble, spec.train, steps)
    for step in range(steps):
        trainer.step(acts[step * rows : (step + 1) * rows])
    l0 = trainer.log_metrics()["l0"]  # over the last logging interval (here: the whole run)
    return [
        {
            "name": point.name,
            "n_latents": n_latents,
            "lr": point.lr,
            "train_l0": l0[index],
            **mmcs_ground_truth(ensemble.W_dec[index].detach(), features),
            "feature_cosines": max_cosine(features, ensemble.W_dec[index]),  # [n_features]
        }
        for index, point in enumerate(points)
    ]


def fires_bands(fires: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The decades of expected fires in the budget that hold features: (label, mask `[n_features]`)."""
    edges = (0, *FIRES_DECADES, float("inf"))
    bands = []
    for low, high in zip(edges[:-1], edges[1:]):
        mask = (fires >= low) & (fires < high)
        if mask.any():
            label = f"under_{high:g}" if low == 0 else f"{low:g}_up" if high == float("inf") else f"{low:g}_{high:g}"
            bands.append((label, mask))
    return bands


def by_fires(architecture: str, cosines: np.ndarray, fires: np.ndarray) -> dict:
    """Where the best dictionary's recovery comes from: per decade of expected fires, the features in it
    and their mean max cosine (a feature seen a handful of times in the budget is not learned)."""
    result = {}
    for label, mask in fires_bands(fires):
        result[f"{architecture}/features_fires_{label}"] = int(mask.sum())
        result[f"{architecture}/best_mmcs_fires_{label}"] = round(float(cosines[mask].mean()), 4)
    return result


def bench_recovery(
    synth: SynthConfig,
    architectures: list[str],
    size_multiples: list[float],
    sparsity: list[float],
    tokens: int,
    train_overrides: dict | None = None,
) -> dict:
    """Every architecture at every size (multiples of the feature count) and sparsity, trained on the
    same `tokens` rows of `synth` with the defaults; per architecture, the best recovery among the
    dictionaries at or above the feature count."""
    model = build_model(synth)
    acts, coefficients = sample_rows(model, synth, tokens, np.random.default_rng(synth.seed))
    targets = None
    if synth.d_target:
        targets = sample_targets(model, synth, coefficients, np.random.default_rng([synth.seed, 1]))
    sparsity = sparsity or [synth.active, 2 * synth.active]
    train = TrainConfig(tokens=tokens, **(train_overrides or {}))
    fires = firing_probabilities(synth) * tokens
    result: dict = {
        "d_model": synth.d_model,
        **({"d_target": synth.d_target} if synth.d_target else {}),
        "n_features": synth.n_features,
        "decay": synth.decay,
        "active": synth.active,
        "seed": synth.seed,
        "tokens": tokens,
        "batch_rows": train.batch_rows,
        **{
            f"{architecture}/step_rows": train.rows_per_step(ARCHITECTURES[architecture].budget_steps)
            for architecture in architectures
        },
        "rarest_feature_fires": float(fires.min()),  # expected: below hundreds, no SAE can learn it in this budget
        "features_under_100_fires": int((fires < 100).sum()),
    }
    started = time.perf_counter()
    for architecture in architectures:
        scores = []
        transcoder = is_transcoder(architecture)
        features = model.target_features if transcoder else model.features
        for multiple in size_multiples:
            n_latents = max(1, round(multiple * synth.n_features))
            scores += train_synthetic(
                synth, acts, features, architecture, n_latents, sparsity, train, targets if transcoder else None
            )
        for score in scores:
            result[f"mmcs_ground_truth/{score['name']}"] = round(score["mmcs_ground_truth"], 4)
        at_or_above = [s for s in scores if s["n_latents"] >= synth.n_features] or scores
        best = max(at_or_above, key=lambda score: score["mmcs_ground_truth"])
        result[f"{architecture}/best"] = best["name"]
        result[f"{architecture}/best_mmcs_ground_truth"] = round(best["mmcs_ground_truth"], 4)
        result.update(by_fires(architecture, best["feature_cosines"].numpy(), fires))
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result
