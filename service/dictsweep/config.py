"""The sweep spec: what to train, on which data, and where results go (pydantic, from YAML).

Every field carries a one-line description; the same text is the CLI help and the README's spec
reference. Errors name the file and the field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """A spec section: unknown keys are errors, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainConfig(Section):
    """How every SAE of the sweep is trained."""

    tokens: int = Field(2_000_000, gt=0, description="Training tokens (activation rows) per SAE.")
    batch_rows: int = Field(1024, gt=0, description="Rows per training batch, shared by every SAE.")
    lr_warmup_steps: int = Field(100, ge=0, description="Steps of linear learning-rate warm-up from 0.")
    lr_decay_fraction: float = Field(0.2, ge=0, le=1, description="Final fraction of steps over which the learning rate decays linearly to 0.")
    l1_warmup_fraction: float = Field(0.05, ge=0, le=1, description="Initial fraction of steps over which the sparsity coefficient ramps up from 0.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clip per SAE (0 turns clipping off).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2.")
    adam_eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    dead_window_tokens: int = Field(1_000_000, gt=0, description="A latent that has not fired for this many tokens counts as dead.")
    dense_threshold: float = Field(0.1, gt=0, le=1, description="A latent firing on more than this fraction of tokens counts as dense.")
    kernel: Literal["auto", "bmm", "loop", "compile"] = Field("auto", description="Ensemble matmul kernel: batched (bmm), one matmul per member (loop), torch.compile'd, or auto (chosen by measurement on the device).")
    log_every_tokens: int = Field(100_000, gt=0, description="Tokens between training metrics logged per SAE.")
