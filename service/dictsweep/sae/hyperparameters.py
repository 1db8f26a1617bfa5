"""Hyper-parameters an architecture declares: the grid keys that set its sparsity (beside the lr and
seed every SAE has), how a grid point's name shows them, what a value must satisfy, and a typical
value (benchmarks). The sweep, its results and `pull` read these declarations, so an architecture
with a setting of its own declares it in its file (`Ensemble.hyperparameters`) and adds it to
`Member` (or, for a key that `replaces` another, to the member the trainer steers) and the spec's grid.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HyperParameter:
    """One grid key of an architecture."""

    key: str  # the grid key, Member field, MLflow param and index.json key
    kind: type  # int or float
    name_format: str  # this setting's part of a grid point's name
    typical: float  # a value that trains sensibly at our input scale (E|x|^2 = d_model)
    below_n_latents: bool = False  # a count of latents: each value must be below n_latents
    replaces: str | None = None  # set in the grid (default None), it takes that key's place: training steers it

    def name_part(self, value) -> str:
        return self.name_format.format(value)

    def problem(self, value, n_latents: int) -> str | None:
        """Why `value` cannot be trained with `n_latents` latents, or None."""
        if self.below_n_latents and value >= n_latents:
            return f"grid.{self.key}: {self.key}={value} is not below n_latents={n_latents}"
        return None

    def parse(self, text) -> int | float | None:
        """A value as MLflow keeps params (text; "None" or "" for unset), typed."""
        return self.kind(text) if text not in (None, "", "None") else None


L1_COEF = HyperParameter("l1_coef", float, "l1_{:g}", typical=1.0)
K = HyperParameter("k", int, "k{}", typical=32, below_n_latents=True)
TARGET_L0 = HyperParameter("target_l0", float, "l0_{:g}", typical=32, replaces="l1_coef")
