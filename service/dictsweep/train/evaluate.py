"""Final metrics of every member on held-out rows, accumulated batch by batch.

FVU uses the total variance of the whole eval set (about its mean), not per batch; MSE is per
element in the dataset's own units; a latent that fires on no eval row counts as dead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dictsweep.sae.ensemble import Ensemble
from dictsweep.sae.export import member_files
from dictsweep.sae.metrics import dead_fraction, fvu_from_moments, l0_from_counts, mmcs_ground_truth, mse, squared_error
from dictsweep.sae.plots import decoder_norm_stats, member_plot
from dictsweep.store import fs


SCALED_LOSSES = ("loss", "mse", "sparsity_loss", "aux_loss")  # training metrics summed over the scaled d_model


def in_eval_units(metrics: dict[str, float], d_model: int, input_scale: float) -> dict[str, float]:
    """Training metrics of one SAE in the eval metrics' units: the loss terms (summed over d_model
    on the training scale) as per-element squared error on raw activations, like `eval/mse`; fvu,
    l0 and fractions are unit-free and stay as they are."""
    return {key: mse(value, d_model, input_scale) if key in SCALED_LOSSES else value for key, value in metrics.items()}


class Evaluator:
    """Sums over eval batches for one ensemble; `results()` gives per-member metrics."""

    SUMS = ("squared_error", "fires", "x_sum", "x_sq_sum")  # what adds up over batches and workers (with `rows`)

    def __init__(self, ensemble: Ensemble):
        self.ensemble = ensemble
        device = ensemble.W_enc.device
        self.rows = 0
        self.squared_error = torch.zeros(ensemble.n_members, dtype=torch.float64, device=device)  # [K]
        self.fires = torch.zeros(
            ensemble.n_members, ensemble.n_latents, device=device
        )  # [K, n], exact below 2**24 rows
        # what it reconstructs: the rows themselves, or a transcoder's target columns (d_out wide)
        self.target_of = getattr(ensemble, "target_of", lambda x: x)  # baseline stacks are no Ensembles
        width = getattr(ensemble, "d_out", ensemble.d_model)
        self.x_sum = torch.zeros(width, dtype=torch.float64, device=device)
        self.x_sq_sum = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        """One scaled batch `[B, d_model]` (a transcoder's: `[B, d_in + d_out]`, measured against its target)."""
        out = self.ensemble(x)
        x = self.target_of(x)
        self.rows += x.shape[0]
        self.squared_error += squared_error(x, out.sae_out).double() * x.shape[0]
        self.fires += out.fire_counts
        self.x_sum += x.sum(0).double()
        self.x_sq_sum += x.pow(2).sum().double()

    def results(self) -> list[dict[str, float]]:
        """Per member: mse (raw units, per element), fvu, l0, dead_fraction on the eval rows."""
        scale = float(getattr(self.ensemble, "target_scale", self.ensemble.input_scale))  # of what it reconstructs
        error = self.squared_error / self.rows  # [K], per row in scaled units
        per_element = mse(error, len(self.x_sum), scale)
        fvu = fvu_from_moments(error, self.x_sum, self.x_sq_sum, self.rows)
        l0 = l0_from_counts(self.fires.double(), self.rows)
        dead = dead_fraction(self.fires)
        return [
            {"mse": float(per_element[i]), "fvu": float(fvu[i]), "l0": float(l0[i]), "dead_fraction": float(dead[i])}
            for i in range(self.ensemble.n_members)
        ]


def export_member(
    ensemble: Ensemble,
    member: int,
    log10_frequency: Tensor,
    metrics: dict,
    metadata: dict,
    storage_uri: str,
    name: str,
    features: Tensor | None = None,
    extra: dict | None = None,
) -> dict:
    """The end of one trained SAE, whichever trainer made it: decoder-norm statistics and MMCS to the
    ground truth (`features`) added to its eval `metrics`, its density and decoder-norm plot written
    to `<storage_uri>/plots/<name>.png` and its dictionary to `<storage_uri>/dictionaries/<name>/`
    (`extra` joins the dictsweep metadata). Returns {"metrics", "uri", "plot"}."""
    decoder = ensemble.W_dec[member]  # [n_latents, d_model]
    metrics.update(decoder_norm_stats(decoder))
    if features is not None:
        metrics.update(mmcs_ground_truth(decoder, features.to(decoder.device)))
    plot = fs.join(storage_uri, "plots", f"{name}.png")
    fs.write_bytes(plot, member_plot(log10_frequency, decoder, title=name))
    folder = fs.join(storage_uri, "dictionaries", name)
    steered = final_coefficient(ensemble, member)
    info = dict(metadata)
    info["dictsweep"] = {
        **info.get("dictsweep", {}),
        "metrics": metrics,
        "input_scale": float(ensemble.input_scale),
        **steered,
        **(extra or {}),
    }
    fs.write_files(folder, member_files(ensemble, member, log10_frequency, info))
    return {"metrics": metrics, "uri": folder, "plot": plot, **steered}


def final_coefficient(ensemble: Ensemble, member: int) -> dict:
    """{"l1_coef": the coefficient training ended with} for a member steered to an L0 target, else {}."""
    if getattr(ensemble.members[member], "target_l0", 0.0) <= 0:
        return {}
    return {"l1_coef": float(ensemble.l1_coef[member])}
