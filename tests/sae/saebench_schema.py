"""A local copy of the fields of SAEBench's core output schema (SAEBench 0.6.0,
`sae_bench/evals/core/eval_output.py`, `eval_config.py` and `base_eval_output.py`): names, types,
nesting and which are required, so that a test can check our `saebench_core.json` as SAEBench's
pydantic dataclasses would read it. Unknown fields are errors here (stricter than SAEBench), so
that a misspelt name cannot pass."""

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class CoreEvalConfig(Strict):
    model_name: str = ""
    llm_dtype: str = "float32"
    batch_size_prompts: int = 16
    n_eval_reconstruction_batches: int = 10
    n_eval_sparsity_variance_batches: int = 1
    dataset: str = "Skylion007/openwebtext"
    context_size: int = 128
    compute_kl: bool = False
    compute_ce_loss: bool = False
    compute_l2_norms: bool = False
    compute_sparsity_metrics: bool = False
    compute_variance_metrics: bool = False
    compute_featurewise_density_statistics: bool = False
    compute_featurewise_weight_based_metrics: bool = False
    exclude_special_tokens_from_reconstruction: bool = False
    verbose: bool = False


class ModelBehaviorPreservationMetrics(Strict):
    kl_div_score: float
    kl_div_with_ablation: float
    kl_div_with_sae: float


class ModelPerformancePreservationMetrics(Strict):
    ce_loss_score: float
    ce_loss_with_ablation: float
    ce_loss_with_sae: float
    ce_loss_without_sae: float


class ReconstructionQualityMetrics(Strict):
    explained_variance: float
    explained_variance_legacy: float
    mse: float
    cossim: float


class ShrinkageMetrics(Strict):
    l2_norm_in: float
    l2_norm_out: float
    l2_ratio: float
    relative_reconstruction_bias: float


class SparsityMetrics(Strict):
    l0: float
    l1: float


class MiscMetrics(Strict):
    freq_over_1_percent: float
    freq_over_10_percent: float
    normalized_freq_over_1_percent: float
    normalized_freq_over_10_percent: float
    average_max_encoder_cosine_sim: float
    average_max_decoder_cosine_sim: float
    frac_alive: float


class TokenStatsMetrics(Strict):
    total_tokens_eval_reconstruction: int
    total_tokens_eval_sparsity_variance: int


class CoreMetricCategories(Strict):
    model_behavior_preservation: ModelBehaviorPreservationMetrics
    model_performance_preservation: ModelPerformancePreservationMetrics
    reconstruction_quality: ReconstructionQualityMetrics
    shrinkage: ShrinkageMetrics
    sparsity: SparsityMetrics
    token_stats: TokenStatsMetrics
    misc_metrics: MiscMetrics


class CoreFeatureMetric(Strict):
    index: int
    feature_density: float
    consistent_activation_heuristic: float
    encoder_bias: float
    encoder_norm: float
    encoder_decoder_cosine_sim: float
    max_decoder_cosine_sim: float
    max_encoder_cosine_sim: float


class CoreEvalOutput(Strict):
    eval_type_id: str = "core"
    eval_config: CoreEvalConfig
    eval_id: str
    datetime_epoch_millis: int
    eval_result_metrics: CoreMetricCategories
    eval_result_details: list[CoreFeatureMetric] = []
    sae_bench_commit_hash: str
    sae_lens_id: str | None
    sae_lens_release_id: str | None
    sae_lens_version: str | None
    sae_cfg_dict: dict[str, Any] | None
    eval_result_unstructured: Any | None = None

    @field_validator("datetime_epoch_millis")
    @classmethod
    def _unix_time(cls, value: int) -> int:  # as SAEBench's BaseEvalOutput
        if not 0 <= value <= 9999999999999:
            raise ValueError("Unix time out of range")
        return value
