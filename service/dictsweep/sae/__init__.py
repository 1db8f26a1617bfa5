"""The math of sparse dictionary learning, free of Ray, MLflow and storage: plain torch.

Each architecture lives in its own module and registers itself by name in `ARCHITECTURES`.
"""

from dictsweep.sae import batchtopk, jumprelu, relu, topk  # noqa: F401  (registers the architectures)
from dictsweep.sae.ensemble import ARCHITECTURES, Ensemble, EnsembleOutput, Member, build_ensemble

__all__ = ["ARCHITECTURES", "Ensemble", "EnsembleOutput", "Member", "build_ensemble"]
