"""Baselines trained on the same stream as the SAEs and evaluated like them: PCA, ICA, random
directions and the neuron basis, each exported as a SAELens `topk` dictionary."""

from dictsweep.sae.baselines.dictionary import (
    Basis,
    baseline_dictionary,
    ica_basis,
    identity_basis,
    matched_k,
    pca_basis,
    random_basis,
)
from dictsweep.sae.baselines.ica import FastICA, fast_ica
from dictsweep.sae.baselines.pca import PCA, StreamingPCA, fit_pca

__all__ = [
    "PCA",
    "Basis",
    "FastICA",
    "StreamingPCA",
    "baseline_dictionary",
    "fast_ica",
    "fit_pca",
    "ica_basis",
    "identity_basis",
    "matched_k",
    "pca_basis",
    "random_basis",
]
