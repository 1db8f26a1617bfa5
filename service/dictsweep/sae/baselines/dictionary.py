"""Baselines as dictionaries: PCA, ICA, random directions and the neuron basis as SAELens `topk`.

Each baseline is a signed basis, x ~ mean + coefficients @ atoms with unit-norm atoms, so a
coefficient is the length of its atom's contribution. SAELens `topk` applies ReLU after the top-k,
so each atom becomes a pair of latents (+atom, -atom), d_sae = 2 * n_atoms: at most one of a pair
is positive, the top k keep the k largest |coefficients|, and for k <= n_atoms the L0 is k (bar
exact zeros). The folder then loads, is evaluated and is plotted like any top-k SAE.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dictsweep.sae.baselines.ica import FastICA
from dictsweep.sae.baselines.pca import PCA
from dictsweep.sae.export import saelens_config


class Basis(NamedTuple):
    """A signed linear basis fitted on a stream (float64)."""

    kind: str
    """Which baseline: pca, ica, random or identity."""
    mean: Tensor
    """Subtracted before encoding and added back after decoding, `[d_model]`."""
    encoder: Tensor
    """Coefficients = (x - mean) @ encoder, `[d_model, n_atoms]`."""
    atoms: Tensor
    """Unit-norm directions as rows, `[n_atoms, d_model]`."""


def pca_basis(pca: PCA, n_atoms: int | None = None) -> Basis:
    """The top `n_atoms` principal axes (all by default): encoder = atoms transposed."""
    atoms = pca.components[:n_atoms]  # [n_atoms, d_model]
    return Basis("pca", pca.mean, atoms.t(), atoms)


def ica_basis(ica: FastICA) -> Basis:
    """ICA's mixing columns as unit atoms; the unmixing rows rescaled to match."""
    norms = ica.mixing.norm(dim=0)  # [n_components]
    return Basis("ica", ica.mean, ica.components.t() * norms, (ica.mixing / norms).t())


def random_basis(pca: PCA, n_atoms: int | None = None, seed: int = 0) -> Basis:
    """`n_atoms` (default d_model) random unit directions, encoded by least squares (pseudo-inverse)."""
    d_model = len(pca.mean)
    generator = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms or d_model, d_model, generator=generator, dtype=torch.float64)
    atoms = torch.nn.functional.normalize(atoms, dim=-1).to(pca.mean.device)  # [n_atoms, d_model]
    return Basis("random", pca.mean, torch.linalg.pinv(atoms), atoms)


def identity_basis(pca: PCA) -> Basis:
    """The neuron basis: one atom per dimension, about the mean."""
    eye = torch.eye(len(pca.mean), dtype=torch.float64, device=pca.mean.device)
    return Basis("identity", pca.mean, eye, eye)


def matched_k(target_l0: float, basis: Basis) -> int:
    """The k whose top-k variant of `basis` has mean L0 `target_l0` (e.g. a chosen SAE's L0)."""
    return min(max(1, round(target_l0)), len(basis.atoms))


def baseline_dictionary(basis: Basis, k: int, metadata: dict | None = None) -> tuple[dict, dict[str, Tensor]]:
    """The top-k variant of `basis` as (cfg.json dict, weights in SAELens names), for
    `export.dictionary_files` or `export.Dictionary`."""
    n_atoms, d_model = basis.atoms.shape
    if not 1 <= k <= 2 * n_atoms:
        raise ValueError(f"k={k}: a {basis.kind} baseline with {n_atoms} atoms takes k from 1 to {2 * n_atoms}")
    weights = {
        "W_enc": torch.cat([basis.encoder, -basis.encoder], dim=1).float(),  # [d_model, 2 n_atoms]
        "b_enc": basis.mean.new_zeros(2 * n_atoms).float(),
        "W_dec": torch.cat([basis.atoms, -basis.atoms]).float(),  # [2 n_atoms, d_model]
        "b_dec": basis.mean.float(),
    }
    metadata = dict(metadata or {})
    metadata["dictsweep"] = {"baseline": basis.kind, "n_atoms": n_atoms, **metadata.get("dictsweep", {})}
    config = saelens_config("topk", d_model, 2 * n_atoms, {"k": k, "rescale_acts_by_decoder_norm": False}, metadata)
    return config, weights
