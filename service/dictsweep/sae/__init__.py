"""The math of sparse dictionary learning, free of Ray, MLflow and storage: plain torch.

Each architecture lives in its own module and registers itself by name in `ARCHITECTURES`.
"""

from dictsweep.sae import batchtopk, jumprelu, matryoshka, relu, topk, transcoder  # noqa: F401  (registers the architectures)
from dictsweep.sae.ensemble import ARCHITECTURES, Ensemble, EnsembleOutput, Member, build_ensemble
from dictsweep.sae.hyperparameters import HyperParameter


def grid_keys() -> dict[str, HyperParameter]:
    """Every registered architecture's grid keys (besides lr and seed): the base's first, then the others
    in registration order; the first declaration of a key stands for it."""
    keys: dict[str, HyperParameter] = {}
    for architecture in [Ensemble, *ARCHITECTURES.values()]:
        for parameter in architecture.hyperparameters:
            keys.setdefault(parameter.key, parameter)
    return keys


def member_from_params(params: dict) -> Member:
    """The `Member` of a grid point's params (`GridPoint.params()`): unset keys are 0 (a key that replaces
    another is the steering trainer's, not the member's)."""
    settings = {
        key: parameter.kind(params.get(key) or 0)
        for key, parameter in grid_keys().items()
        if parameter.replaces is None
    }
    return Member(lr=params["lr"], seed=params["seed"], **settings)


__all__ = [
    "ARCHITECTURES",
    "Ensemble",
    "EnsembleOutput",
    "HyperParameter",
    "Member",
    "build_ensemble",
    "grid_keys",
    "member_from_params",
]
