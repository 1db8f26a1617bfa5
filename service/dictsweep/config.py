"""The sweep spec: what to train, on which data, and where results go (pydantic, from YAML).

Every field carries a one-line description; the same text is the CLI help and the spec reference
(docs/reference.md). Reading a spec file and naming its errors: `spec_file`.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dictsweep.architecture_keys import ArchitectureKeys
from dictsweep.errors import distinct, number_not_boolean
from dictsweep.store.synth import SynthConfig


def one_item_list(value):
    """A scalar where a list is expected, as a one-item list (`--set grid.n_latents=64`)."""
    return [value] if isinstance(value, (str, int, float)) else value


class Section(BaseModel):
    """A spec section: unknown keys are errors, so a typo never passes silently."""

    # nan and inf are errors everywhere (a sweep would train on them, then fail naming nothing)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value, info):
        return number_not_boolean(cls, info.field_name, value)


AUTO_BATCH_STEPS = 4096  # the default batch gives about this many optimizer steps (within the bounds below)
AUTO_BATCH_ROWS = (256, 4096)
STEP_ROWS_MIN = 64  # the smallest default optimizer step of architectures that take several a batch


def default_batch_rows(tokens: int) -> int:
    """A power of two near tokens / AUTO_BATCH_STEPS, within AUTO_BATCH_ROWS: small budgets are limited by
    updates, not rows (recovery at 1M tokens: 1024-row steps 0.83, 256-row 0.94); large ones keep big batches."""
    low, high = AUTO_BATCH_ROWS
    return min(high, max(low, 2 ** round(math.log2(max(tokens, 1) / AUTO_BATCH_STEPS))))


class TrainConfig(Section):
    """How every SAE of the sweep is trained."""

    tokens: int = Field(2_000_000, gt=0, description="Training tokens (activation rows) per SAE.")
    batch_rows: int = Field(
        None,
        gt=0,
        description="Rows per training batch, shared by every SAE (default: train.tokens / 4096 to the nearest power of two, within 256-4096).",
    )
    step_rows: int | None = Field(
        None,
        gt=0,
        description="Rows per optimizer step, a divisor of train.batch_rows: each batch is trained as consecutive steps of this many rows (default: the whole batch, except relu: at least train.tokens / 16384 and 64 rows; smaller steps recover rarer features at small budgets).",
    )
    lr_warmup_steps: int = Field(100, ge=0, description="Optimizer steps of linear learning-rate warm-up from 0.")
    lr_decay_fraction: float = Field(
        0.2, ge=0, le=1, description="Final fraction of steps over which the learning rate decays linearly to 0."
    )
    l1_warmup_fraction: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Initial fraction of steps of the sparsity warm-up: relu's and jumprelu's coefficient ramps up from 0, the top-k family's k falls from 4k (at most d_model / 4) to k (latents find rare features before sparsity is whole).",
    )
    target_l0_fraction: float = Field(
        0.95,
        gt=0,
        le=1,
        description="With grid.target_l0: initial fraction of steps over which each SAE's sparsity coefficient is steered to its L0 target (after the sparsity warm-up); then it is held (the default steers through most of the learning-rate decay, in which a held relu SAE's L0 rises).",
    )
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clip per SAE (0 turns clipping off).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2.")
    adam_eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    dead_window_tokens: int = Field(
        1_000_000, gt=0, description="A latent that has not fired for this many tokens counts as dead."
    )
    dense_threshold: float = Field(
        0.1, gt=0, le=1, description="A latent firing on more than this fraction of tokens counts as dense."
    )
    kernel: Literal["auto", "bmm", "loop", "compile"] = Field(
        "auto",
        description="Ensemble matmul kernel: batched (bmm), one matmul per member (loop), torch.compile'd, or auto (chosen by measurement on the device; compile only when the planned steps repay its build time).",
    )
    decode: Literal["auto", "dense", "sparse"] = Field(
        "auto",
        description="Top-k family decoder: gather the k active decoder rows (sparse; a Triton kernel on GPUs), a dense matmul, or auto (on GPUs chosen by measurement at the sweep's shapes; on CPUs sparse when k <= n_latents / 32).",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Forward precision: bf16 autocast with fp32 master weights, fp32, or auto (bf16 on GPUs, fp32 on CPU).",
    )
    auxk_coef: float = Field(
        1 / 32,
        ge=0,
        description="AuxK loss coefficient for dead latents of topk and batchtopk (Gao et al.: 1/32; 0 turns AuxK off).",
    )
    auxk_k: int = Field(0, ge=0, description="Dead latents per row that AuxK uses (0 = d_model // 2).")
    auxk_window_tokens: int = Field(
        0,
        ge=0,
        description="AuxK counts a latent dead once it has not fired for this many tokens (0 = train.tokens / 16, at most Gao et al.'s 10M).",
    )
    resample_every_tokens: int = Field(
        500_000,
        ge=0,
        description="relu: tokens between resamplings of latents dead for a window (Anthropic 2023; 0 turns it off).",
    )
    resample_until_fraction: float = Field(
        0.5, ge=0, le=1, description="relu: resample only within this initial fraction of training."
    )
    log_every_tokens: int = Field(100_000, gt=0, description="Tokens between training metrics logged per SAE.")
    eval_tokens: int = Field(
        262_144, gt=0, description="Held-out tokens (from the eval shards) used for the final metrics of every SAE."
    )
    checkpoint_every_tokens: int = Field(
        0, ge=0, description="Tokens between checkpoints of every trainer to the sweep's storage (0: only at the end)."
    )

    @model_validator(mode="before")
    @classmethod
    def _batch_from_budget(cls, data):
        # unset (or null): from the budget; on assignment pydantic passes the current value, kept as is
        if isinstance(data, dict) and data.get("batch_rows") is None:
            tokens = data.get("tokens", cls.model_fields["tokens"].default)
            try:  # a wrong tokens value is reported by its own field; the batch is then the default budget's
                tokens = int(tokens) if not isinstance(tokens, bool) and int(tokens) > 0 else None
            except (TypeError, ValueError):
                tokens = None
            data = {**data, "batch_rows": default_batch_rows(tokens or cls.model_fields["tokens"].default)}
        return data

    def rows_per_step(self, budget_steps: int) -> int:
        """Rows per optimizer step of an architecture that declares `budget_steps` (0: none):
        `step_rows`, else the whole batch, or with `budget_steps` the batch split into equal steps
        of at least tokens / budget_steps and `STEP_ROWS_MIN` rows. (relu, 1M tokens, 128
        dimensions, 512 features of which 157 fire fewer than 3,000 times: mean max cosine to them
        0.87 in steps of 256 rows, 0.93 of 128, 0.94 of 64, 0.93 of 32; on MiniLM the FVU at L0
        16-64 is the same within 0.002.)"""
        if self.step_rows:
            return self.step_rows
        if not budget_steps:
            return self.batch_rows
        least = max(STEP_ROWS_MIN, self.tokens / budget_steps)
        parts = max(1, int(self.batch_rows // least))
        while self.batch_rows % parts:
            parts -= 1
        return self.batch_rows // parts

    @model_validator(mode="after")
    def _steps_split_batches(self):
        if self.step_rows is not None and self.batch_rows % self.step_rows:
            raise ValueError(f"step_rows ({self.step_rows}) must divide batch_rows ({self.batch_rows})")
        return self


class DataConfig(Section):
    """The activation dataset every SAE of the sweep trains on."""

    uri: str = Field(description="Dataset prefix: a folder, file:// or s3:// URI holding manifest.json.")
    synth: SynthConfig | None = Field(
        None, description="If set and no dataset is at `uri`, write a synthetic one with these settings first."
    )


class GridConfig(Section, ArchitectureKeys):
    """The grid: for each architecture, the product of the keys that apply to it."""

    architecture: list[str] = Field(["relu"], min_length=1, description="Architectures (docs/architectures.md).")
    n_latents: list[int] = Field(min_length=1, description="Dictionary sizes (number of latents).")
    l1_coef: list[float] = Field([1.0], min_length=1, description="Sparsity coefficients (relu: L1; jumprelu: L0).")
    target_l0: list[float] | None = Field(
        None,
        min_length=1,
        description="Instead of l1_coef (relu, jumprelu): the L0 each SAE is steered to; its coefficient is adapted early in training, then held (train.target_l0_fraction), and exported as its l1_coef.",
    )
    k: list[int] = Field([32], min_length=1, description="Active latents per row (the top-k family).")
    lr: list[float] | None = Field(
        None,
        min_length=1,
        description="Learning rates (default: one per SAE from its width, Gao et al. 2024's 2e-4 * sqrt(2^14 / n_latents) times 3, for every architecture, at most 1e-2).",
    )
    seed: list[int] = Field([0], min_length=1, description="Initialisation seeds.")

    @field_validator("architecture", "n_latents", "l1_coef", "target_l0", "k", "lr", "seed", mode="before")
    @classmethod
    def _one_value_is_a_list(cls, value):
        return one_item_list(value)

    @field_validator("architecture")
    @classmethod
    def _known_architectures(cls, names: list[str]) -> list[str]:
        from dictsweep.sae import ARCHITECTURES

        unknown = [name for name in names if name not in ARCHITECTURES]
        if unknown:
            raise ValueError(f"unknown architecture(s) {unknown}; known: {sorted(ARCHITECTURES)}")
        return names

    @field_validator("n_latents", "k")
    @classmethod
    def _positive(cls, values: list[int]) -> list[int]:
        bad = [str(value) for value in values if value <= 0]
        if bad:
            raise ValueError(f"every value must be > 0, got {', '.join(bad)}")
        return values

    @field_validator("target_l0")
    @classmethod
    def _positive_targets(cls, values: list[float] | None) -> list[float] | None:
        if values is not None and any(value <= 0 for value in values):
            raise ValueError(f"every target must be > 0, got {values}")
        return values

    @field_validator("l1_coef", "lr")
    @classmethod
    def _non_negative(cls, values: list[float] | None) -> list[float] | None:
        bad = [f"{value:g}" for value in values or [] if value < 0]
        if bad:
            raise ValueError(f"every value must be >= 0, got {', '.join(bad)}")
        return values


class StreamConfig(Section):
    """How shards are read, shuffled and broadcast to the trainers."""

    seed: int = Field(
        0, ge=0, description="Seed of the shard and row order: every SAE sees the same rows in the same order."
    )
    shuffle_shards: int = Field(4, gt=0, description="Shards whose rows are mixed together in the shuffle buffer.")
    readers_per_node: int = Field(
        2,
        gt=0,
        description="Reader actors per node, each producing one window (shuffle buffer) at a time from its shards fetched concurrently.",
    )
    batches_in_flight: int = Field(8, gt=0, description="Batches queued per trainer ahead of its current step.")
    windows_per_node: int = Field(
        3,
        gt=0,
        description="Windows (shuffle buffers of shuffle_shards shards) a node's object store holds per split, from the slowest trainer's on: how far the readers work ahead (backpressure bound).",
    )


class ResourcesConfig(Section):
    """Where the trainers run."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Train on GPUs (cuda), CPU, or GPUs where the cluster has them (auto)."
    )
    trainers: int = Field(0, ge=0, description="Trainer actors; 0 = one per gpus_per_trainer GPUs, or one CPU trainer.")
    gpus_per_trainer: float = Field(
        1.0,
        gt=0,
        le=1,
        description="GPUs per trainer actor: 1, or a fraction so that several trainers share a GPU (its memory split among them).",
    )
    cpus_per_trainer: float = Field(1.0, gt=0, description="Ray CPUs reserved per trainer actor.")
    torch_threads: int = Field(
        0, ge=0, description="Torch threads in a CPU trainer (0 = the cores of its node / trainers)."
    )
    max_members: int = Field(16, gt=0, description="Most SAEs stacked in one ensemble.")
    max_restarts: int = Field(
        3,
        ge=0,
        description="Times Ray restarts a crashed trainer (it resumes from its checkpoint) before its SAEs count as failed.",
    )
    memory_headroom: float = Field(0.2, ge=0, lt=1, description="Fraction of device memory the plan leaves free.")
    device_memory_gb: float = Field(
        0, ge=0, description="Memory per device for planning (0 = measured; CPU: a quarter of RAM)."
    )
    zero: Literal["auto", "always", "never"] = Field(
        "auto",
        description="DeepSpeed ZeRO data parallelism for SAEs that fit no single device (auto), for every SAE (always), or never.",
    )
    zero_workers: int = Field(0, ge=0, description="Workers (devices) per ZeRO SAE; 0 = the fewest whose memory fits.")
    zero_stage: Literal[2, 3] = Field(
        2,
        description="DeepSpeed ZeRO stage for an SAE too large for one device, trained data-parallel over several (2: gradients and Adam state partitioned; 3: the weights too between steps, gathered whole for each step).",
    )
    zero_offload: bool = Field(
        False,
        description="With ZeRO, keep the optimizer state (Adam moments, fp32 master weights) in host memory instead of on the devices.",
    )


class TrackingConfig(Section):
    """Where runs are recorded."""

    uri: str | None = Field(
        None,
        description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory).",
    )
    experiment: str | None = Field(None, description="MLflow experiment (default: the sweep's name).")


class ExportConfig(Section):
    """Which dictionaries are exported, and where."""

    dir: str | None = Field(
        None, description="Folder or URI for the selected dictionaries and index.json (default ./dictionaries/<name>)."
    )
    registry: bool = Field(True, description="Register the selected dictionaries in the MLflow model registry.")


class EvaluationConfig(Section):
    """What a finished sweep measures beyond the eval-shard metrics: the model with a dictionary spliced in, and baselines."""

    splice: bool = Field(
        True,
        description="Splice each finished dictionary into the dataset's source model (manifest `source`) over held-out contexts and report loss recovered; skipped, with a note, when the dataset has no loadable source model (synthetic data).",
    )
    splice_selected_only: bool = Field(
        False,
        description="Splice only the selected dictionaries (for big sweeps) instead of every finished SAE; select.metric loss_recovered needs every one spliced.",
    )
    splice_tokens: int = Field(
        65_536,
        gt=0,
        description="Held-out tokens (whole eval contexts, from `contexts/`) the spliced evaluation runs over.",
    )
    splice_baselines: bool = Field(
        True,
        description="Splice the baseline dictionaries too, so they can be compared with the SAEs on loss recovered.",
    )
    baseline_rows: int = Field(
        1_048_576,
        gt=0,
        description="Most training rows the baselines are fitted on: whole train batches spread evenly over the stream (PCA covariance over all of them).",
    )
    ica_rows: int = Field(65_536, gt=0, description="Most of those rows kept for FastICA (a share of each batch).")
    inspect: bool = Field(
        False,
        description="Run `dictsweep inspect` over the selected dictionaries at the end: per-latent statistics, contexts and neighbours as a data file and a feature browser per dictionary, logged as artifacts `inspect/` of its run.",
    )
    inspect_tokens: int = Field(1_048_576, gt=0, description="Most train rows the end-of-sweep inspect pass reads.")
    probing: bool = Field(False, description="Sparse probing and first-letter absorption of every SAE at the end.")


class SelectConfig(Section):
    """Which finished dictionaries are selected (exported, registered, starred): per dictionary size,
    among those inside the L0 band and the quality bounds, the best by `metric` or its Pareto front."""

    l0: list[float] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="Eval L0 band [low, high] a selected dictionary lies in (default [1, d_model / 3]: denser codes barely compress).",
    )
    max_fvu: float = Field(
        0.5,
        gt=0,
        description="Largest eval FVU a selected dictionary may have (1 is no better than predicting the mean).",
    )
    max_dead_fraction: float = Field(
        0.5, ge=0, le=1, description="Largest fraction of latents dead on the eval rows a selected dictionary may have."
    )
    metric: Literal["fvu", "loss_recovered"] = Field(
        "fvu",
        description="What `best` ranks by and the front trades against L0: eval fvu (lower is better), or loss_recovered (spliced into the source model; higher is better; needs a dataset with a source model).",
    )
    per_size: Literal["best", "front"] = Field(
        "best",
        description="Per dictionary size: the one best dictionary inside the band (best), or every point of the (L0, metric) Pareto front inside it (front).",
    )

    @field_validator("l0")
    @classmethod
    def _ordered_band(cls, band: list[float] | None) -> list[float] | None:
        if band is not None and not 0 <= band[0] <= band[1]:
            raise ValueError(f"expected [low, high] with 0 <= low <= high, got {list(band)}")
        return band

    def l0_band(self, d_model: int) -> tuple[float, float]:
        """The L0 band for a dataset of width `d_model`: `l0`, else [1, d_model / 3]."""
        return (float(self.l0[0]), float(self.l0[1])) if self.l0 is not None else (1.0, d_model / 3)


class StorageConfig(Section):
    """The sweep's own working storage: checkpoints and every finished SAE."""

    dir: str | None = Field(
        None, description="Folder or URI for checkpoints and finished SAEs (default ./sweeps/<name>)."
    )


class SweepSpec(Section):
    """A sweep: a grid of SAEs over one dataset."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Sweep name: the MLflow experiment, the registered model, the export folder.",
    )
    data: DataConfig = Field(description="The activation dataset.")
    grid: GridConfig = Field(description="The grid of SAEs.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training settings shared by every SAE.")
    stream: StreamConfig = Field(default_factory=StreamConfig, description="Data streaming.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Placement.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="Export.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Working storage.")
    evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig, description="Spliced evaluation and baselines at the end of the sweep."
    )
    select: SelectConfig = Field(default_factory=SelectConfig, description="Which dictionaries are selected.")
    baselines: list[Literal["pca", "ica", "random", "identity"]] = Field(
        [],
        description="Baselines fitted on the same stream and evaluated and exported like the SAEs, as top-k dictionaries matched to the selected SAEs' L0: pca, ica, random, identity.",
    )

    @field_validator("baselines", mode="before")
    @classmethod
    def _one_baseline_is_a_list(cls, value):
        return one_item_list(value)

    @field_validator("baselines")
    @classmethod
    def _distinct_baselines(cls, kinds: list[str]) -> list[str]:
        return distinct(kinds, "baseline(s)")

    @model_validator(mode="after")
    def _ranked_by_what_is_measured(self) -> "SweepSpec":
        if self.select.metric == "loss_recovered" and (
            not self.evaluation.splice or self.evaluation.splice_selected_only
        ):
            raise ValueError(
                "select.metric loss_recovered needs every SAE spliced: evaluation.splice true and "
                "evaluation.splice_selected_only false"
            )
        return self

    @property
    def export_dir(self) -> str:
        return self.export.dir or f"./dictionaries/{self.name}"

    @property
    def storage_dir(self) -> str:
        return self.storage.dir or f"./sweeps/{self.name}"

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name
