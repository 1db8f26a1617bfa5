"""SAEBench's core metrics of one dictionary, named and defined as SAEBench defines them, and its
core output (the JSON that SAEBench's tooling reads).

Definitions follow SAEBench 0.6.0 `sae_bench/evals/core/main.py` (adamkarvonen/SAEBench, 8042bb3)
over every eval row (SAEBench: a few batches of prompts), with SAELens's later corrections of two
of its formulas (decoderesearch/SAELens #665 and #711):
- `explained_variance` = 1 - E|x - x_hat|^2 / E|x - mean(x)|^2 over all rows (= 1 - our fvu); for a
  transcoder x is the row's target and x_hat its output (with its skip path), here and below;
  SAEBench 0.6.0 subtracts the squared mean of x^2 instead of that of x (variance about zero).
- `mse` = E|x - x_hat|^2, summed over d_model, per token; SAEBench 0.6.0 divides that again by the
  eval batch's token count. Our `mse` (per element) is this divided by d_model; this one is logged
  as `mse_per_token`.
- `explained_variance_legacy`: the mean over rows of 1 - |x - x_hat|^2 / |x - batch mean|^2, per
  eval batch (SAEBench's earlier formula; it depends on the batch).
The rest as SAEBench: `cossim` the mean cosine of x and x_hat; `l2_norm_in`, `l2_norm_out` mean
norms, `l2_ratio` the mean of |x_hat| / |x| (|x| < 1e-4 counted as 1); `relative_reconstruction_bias`
E|x_hat|^2 / E<x, x_hat> (Rajamanoharan et al. 2024, eq. 10); `l0` the mean count of non-zero
latents, `l1` their mean sum; per latent `feature_density` (fraction of rows with a positive latent)
and `consistent_activation_heuristic` (its firing rows per context it fires in); from the weights,
each latent's encoder norm and bias, encoder-decoder cosine, and largest cosine with any other
latent's encoder and decoder row; `misc_metrics` summarise those. Undefined values are -1
(SAEBench writes NaN as -1).

Plain torch: the pass over the data that feeds `CoreSums` is `analysis.core`.
"""

from __future__ import annotations

import math
import time
import uuid

import torch
from torch import Tensor

from dictsweep.sae.metrics import fvu_from_moments, max_cosine


SAEBENCH_REFERENCE = (
    "SAEBench 0.6.0 core (adamkarvonen/SAEBench 8042bb3), mse and explained_variance as SAELens #711, #665"
)
CATEGORIES = {  # SAEBench's CoreMetricCategories: category -> its metrics, in its order
    "model_behavior_preservation": ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"),
    "model_performance_preservation": (
        "ce_loss_score",
        "ce_loss_with_ablation",
        "ce_loss_with_sae",
        "ce_loss_without_sae",
    ),
    "reconstruction_quality": ("explained_variance", "explained_variance_legacy", "mse", "cossim"),
    "shrinkage": ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"),
    "sparsity": ("l0", "l1"),
    "token_stats": ("total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"),
    "misc_metrics": (
        "freq_over_1_percent",
        "freq_over_10_percent",
        "normalized_freq_over_1_percent",
        "normalized_freq_over_10_percent",
        "average_max_encoder_cosine_sim",
        "average_max_decoder_cosine_sim",
        "frac_alive",
    ),
}
INTEGER_METRICS = ("total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance")
FLAT_NAMES = {"mse": "mse_per_token"}  # SAEBench's name -> ours, where ours already means something else
DETAIL_FIELDS = (
    "index",
    "feature_density",
    "consistent_activation_heuristic",
    "encoder_bias",
    "encoder_norm",
    "encoder_decoder_cosine_sim",
    "max_decoder_cosine_sim",
    "max_encoder_cosine_sim",
)
SPLICE_METRICS = CATEGORIES["model_behavior_preservation"] + CATEGORIES["model_performance_preservation"]
NORM_FLOOR = 1e-4  # SAEBench: an input norm below this divides as 1 in l2_ratio


class CoreSums:
    """Sums over eval rows for one dictionary: `add` each batch of raw activations, its
    reconstruction and its latents; `scalars()` and `per_latent()` read the metrics."""

    def __init__(self, n_latents: int, d_model: int, device: torch.device | str = "cpu"):
        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        self.rows = 0
        self.x_sum = zeros(d_model)
        self.x_sq_sum, self.error_sum, self.legacy_sum = zeros(), zeros(), zeros()
        self.norm_in_sum, self.norm_out_sum, self.ratio_sum, self.cossim_sum = zeros(), zeros(), zeros(), zeros()
        self.out_sq_sum, self.dot_sum, self.l0_sum, self.l1_sum = zeros(), zeros(), zeros(), zeros()
        self.fires = zeros(n_latents)  # rows on which each latent is positive
        self.pairs: list[Tensor] = []  # distinct (context, latent) firings per batch, for the heuristic
        self.n_latents = n_latents

    @torch.no_grad()
    def add(self, x: Tensor, x_hat: Tensor, latents: Tensor, seqs: Tensor | None = None) -> None:
        """One batch: `x`, `x_hat` `[B, d_model]`, dense `latents` `[B, n_latents]`, and each row's
        context (`seq`, `[B]`) where known."""
        x, x_hat = x.double(), x_hat.double()  # [B, d_model]; the latents stay as they are (B x n_latents)
        norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)  # [B]
        error = (x - x_hat).pow(2).sum(-1)  # [B]
        centred = (x - x.mean(0)).pow(2).sum(-1)  # [B], about this batch's mean (the legacy formula)
        self.rows += x.shape[0]
        self.x_sum += x.sum(0)
        self.x_sq_sum += x.pow(2).sum()
        self.error_sum += error.sum()
        self.legacy_sum += (1 - error / centred).sum()
        self.norm_in_sum += norm_in.sum()
        self.norm_out_sum += norm_out.sum()
        self.ratio_sum += (norm_out / torch.where(norm_in.abs() < NORM_FLOOR, 1.0, norm_in)).sum()
        self.cossim_sum += torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-12).sum()
        self.out_sq_sum += norm_out.pow(2).sum()
        self.dot_sum += (x * x_hat).sum()
        self.l0_sum += (latents != 0).sum()
        self.l1_sum += latents.sum(dtype=torch.float64)
        positive = latents > 0  # [B, n_latents]
        self.fires += positive.sum(0)
        if seqs is not None:
            rows, columns = positive.nonzero(as_tuple=True)
            self.pairs.append(torch.unique(seqs.to(positive.device).long()[rows] * self.n_latents + columns))

    def scalars(self) -> dict[str, float]:
        """The reconstruction, shrinkage and sparsity metrics, by SAEBench name."""
        rows = max(self.rows, 1)
        values = {
            "explained_variance": 1 - fvu_from_moments(self.error_sum / rows, self.x_sum, self.x_sq_sum, rows),
            "explained_variance_legacy": self.legacy_sum / rows,
            "mse": self.error_sum / rows,
            "cossim": self.cossim_sum / rows,
            "l2_norm_in": self.norm_in_sum / rows,
            "l2_norm_out": self.norm_out_sum / rows,
            "l2_ratio": self.ratio_sum / rows,
            "relative_reconstruction_bias": self.out_sq_sum / self.dot_sum,
            "l0": self.l0_sum / rows,
            "l1": self.l1_sum / rows,
        }
        return {name: defined(float(value)) for name, value in values.items()}

    def per_latent(self) -> dict[str, Tensor]:
        """`feature_density` and `consistent_activation_heuristic` per latent (the latter -1 for a
        latent that never fired, or everywhere when the rows carry no context)."""
        density = self.fires / max(self.rows, 1)
        if not self.pairs:
            return {"feature_density": density, "consistent_activation_heuristic": torch.full_like(density, -1.0)}
        latents = torch.unique(torch.cat(self.pairs)) % self.n_latents
        contexts = torch.bincount(latents, minlength=self.n_latents).double()  # contexts each latent fires in
        heuristic = torch.where(contexts > 0, self.fires / contexts.clamp_min(1), -1.0)
        return {"feature_density": density, "consistent_activation_heuristic": heuristic}


def defined(value: float) -> float:
    """SAEBench's convention: a NaN (or infinite) metric is written as -1."""
    return value if math.isfinite(value) else -1.0


def weight_metrics(W_enc: Tensor, W_dec: Tensor, b_enc: Tensor, same_space: bool = True) -> dict[str, Tensor]:
    """SAEBench's feature-wise weight metrics of a dictionary (`W_enc [d, n]`, `W_dec [n, d]`); a
    transcoder's encoder and decoder rows live in different spaces (`same_space` False): their cosine is
    undefined (-1)."""
    encoders = W_enc.detach().float().t()  # [n, d_in]
    decoders = W_dec.detach().float()  # [n, d_out]
    if same_space:
        cosines = torch.nn.functional.cosine_similarity(encoders, decoders, dim=-1)
    else:
        cosines = torch.full((len(decoders),), -1.0, device=decoders.device)
    return {
        "encoder_bias": b_enc.detach().float(),
        "encoder_norm": encoders.norm(dim=-1),
        "encoder_decoder_cosine_sim": cosines,
        "max_encoder_cosine_sim": max_cosine(encoders, encoders, exclude_self=True),
        "max_decoder_cosine_sim": max_cosine(decoders, decoders, exclude_self=True),
    }


def misc_metrics(feature_density: Tensor, max_encoder: Tensor, max_decoder: Tensor) -> dict[str, float]:
    """SAEBench's `misc_metrics` from the per-latent density and largest cosines."""
    density = feature_density.double()
    total = float(density.sum())
    return {
        "freq_over_1_percent": float((density > 0.01).double().mean()),
        "freq_over_10_percent": float((density > 0.1).double().mean()),
        "normalized_freq_over_1_percent": float(density[density > 0.01].sum()) / total if total > 0 else 0.0,
        "normalized_freq_over_10_percent": float(density[density > 0.1].sum()) / total if total > 0 else 0.0,
        "average_max_encoder_cosine_sim": float(max_encoder.double().mean()),
        "average_max_decoder_cosine_sim": float(max_decoder.double().mean()),
        "frac_alive": float((density > 0).double().mean()),
    }


def core_metrics(sums: CoreSums, weights: dict[str, Tensor]) -> dict:
    """SAEBench's `eval_result_metrics` (category -> metric -> value) and `eval_result_details`
    (one record per latent), from the sums and `weight_metrics`; the spliced categories -1 until
    `with_splice` fills them (SAEBench writes what it could not measure as -1)."""
    per_latent = sums.per_latent()
    values = {
        **{name: -1.0 for name in SPLICE_METRICS},
        **sums.scalars(),
        "total_tokens_eval_reconstruction": 0,
        "total_tokens_eval_sparsity_variance": int(sums.rows),
        **misc_metrics(
            per_latent["feature_density"], weights["max_encoder_cosine_sim"], weights["max_decoder_cosine_sim"]
        ),
    }
    columns = {**per_latent, **weights}
    lists = {name: [round(float(v), 10) for v in columns[name].tolist()] for name in DETAIL_FIELDS[1:]}
    details = [
        {"index": index, **{name: lists[name][index] for name in DETAIL_FIELDS[1:]}} for index in range(sums.n_latents)
    ]
    return {
        "metrics": {category: {name: values[name] for name in names} for category, names in CATEGORIES.items()},
        "details": details,
    }


def with_splice(metrics: dict[str, dict], spliced: dict[str, float], tokens: int) -> dict[str, dict]:
    """`metrics` (by category) with the spliced evaluation's SAEBench-named values over `tokens` positions."""
    filled = {category: dict(values) for category, values in metrics.items()}
    for category in ("model_behavior_preservation", "model_performance_preservation"):
        for name in CATEGORIES[category]:
            if name in spliced:
                filled[category][name] = defined(float(spliced[name]))
    if any(name in spliced for name in SPLICE_METRICS):
        filled["token_stats"]["total_tokens_eval_reconstruction"] = int(tokens)
    return filled


def flat_metrics(metrics: dict[str, dict]) -> dict[str, float]:
    """The core metrics measured on the eval rows as one level, by our metric keys (`eval/<key>` in
    MLflow, index.json, saes.csv): SAEBench's names, except `mse` (ours is per element: `mse_per_token`).
    The spliced ones come from the spliced evaluation under the same names."""
    return {
        FLAT_NAMES.get(name, name): float(value)
        for category, values in metrics.items()
        if category not in ("model_behavior_preservation", "model_performance_preservation", "token_stats")
        for name, value in values.items()
    }


def core_output(result: dict, eval_config: dict, sae_cfg: dict, sae_id: str, release: str, producer: str) -> dict:
    """A CoreEvalOutput as SAEBench writes it (`to_json_file`: field names and nesting as its pydantic
    schema); what SAEBench has no field for goes under `eval_result_unstructured`."""
    return {
        "eval_type_id": "core",
        "eval_config": eval_config,
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": result["metrics"],
        "eval_result_details": result["details"],
        "sae_bench_commit_hash": "unknown",  # measured by dictsweep, not SAEBench: see eval_result_unstructured
        "sae_lens_id": sae_id,
        "sae_lens_release_id": release,
        "sae_lens_version": (sae_cfg.get("metadata") or {}).get("sae_lens_version"),
        "sae_cfg_dict": sae_cfg,
        "eval_result_unstructured": {"producer": producer, "definitions": SAEBENCH_REFERENCE},
    }


def core_eval_config(**values) -> dict:
    """SAEBench's CoreEvalConfig with its defaults, updated by `values` (its field names only)."""
    config = {
        "model_name": "",
        "llm_dtype": "float32",
        "batch_size_prompts": 16,
        "n_eval_reconstruction_batches": 10,
        "n_eval_sparsity_variance_batches": 1,
        "dataset": "Skylion007/openwebtext",
        "context_size": 128,
        "compute_kl": False,
        "compute_ce_loss": False,
        "compute_l2_norms": False,
        "compute_sparsity_metrics": False,
        "compute_variance_metrics": False,
        "compute_featurewise_density_statistics": False,
        "compute_featurewise_weight_based_metrics": False,
        "exclude_special_tokens_from_reconstruction": False,
        "verbose": False,
    }
    unknown = set(values) - set(config)
    if unknown:
        raise ValueError(f"not CoreEvalConfig fields: {sorted(unknown)}")
    return {**config, **values}
