"""What `dictsweep harvest` reads, runs and writes: its settings, as the CLI and the plan see them."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator

from dictsweep.errors import CliOptions, distinct

WORK_DIR = "_harvest"  # plan and per-block progress; removed once the manifests are written
PLAN_KEYS = (
    "model",
    "hooks",
    "target_hooks",
    "text",
    "text_field",
    "text_split",
    "context",
    "max_tokens",
    "dtype",
    "seed",
    "eval_fraction",
    "shard_rows",
    "shuffle_rows",
    "include_special",
)


class HarvestConfig(CliOptions):
    """What `dictsweep harvest` reads, runs and writes."""

    flags = {"hooks": "--hook", "target_hooks": "--target-hook"}
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="Hugging Face model: a local folder, or a hub name (cached, or fetched where the hub is reachable)."
    )
    hooks: list[str] = Field(
        min_length=1,
        description="Module paths whose outputs are harvested, e.g. encoder.layer.3 (first element of a tuple output).",
    )
    target_hooks: list[str] = Field(
        [],
        description="A transcoder dataset: module paths whose outputs are each row's `target` (e.g. an MLP's output, encoder.layer.3.output.dense, with --hook encoder.layer.3.attention.output, its input); one per --hook, paired in order.",
    )
    text: str = Field(
        description="Text: a .txt file, a JSONL file (one document per line), a folder of them, a saved `datasets` folder, or a Hugging Face dataset name (NAME or NAME:CONFIG)."
    )
    out: str = Field(
        description="Dataset prefix (folder, file:// or s3://); with several hooks each goes to <out>/<hook>/."
    )
    context: int = Field(256, gt=1, description="Tokens per context (template tokens such as [CLS]/[SEP] included).")
    max_tokens: int | None = Field(
        None,
        gt=0,
        description="Most tokens fed to the model (contexts' tokens, train and eval); default: all of the text.",
    )
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Stored dtype, and the model's dtype on GPU (on CPU the model runs in float32)."
    )
    seed: int = Field(0, ge=0, description="Seed of the eval hold-out and of the row shuffle.")
    eval_fraction: float = Field(
        0.02, ge=0, lt=1, description="Fraction of contexts held out, whole, as the eval split."
    )
    shard_rows: int = Field(65_536, gt=0, description="Most rows per shard file.")
    shuffle_rows: int = Field(
        262_144,
        gt=0,
        description="Rows shuffled together before they are written (a block of contexts; memory: rows x d_model x dtype bytes per hook).",
    )
    batch_size: int = Field(32, gt=0, description="Contexts per forward pass.")
    include_special: bool = Field(
        False, description="Also store rows at special tokens ([CLS], [SEP], BOS/EOS separators)."
    )
    text_field: str = Field("text", description="Field holding the text in JSONL records and datasets.")
    text_split: str = Field("train", description="Split of a Hugging Face dataset.")
    workers: int = Field(
        0,
        ge=0,
        description="Workers (Ray actors); 0 = one per GPU, or 1 on CPU. One worker without --address runs in this process.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the model runs: cuda, cpu, or cuda where available (auto)."
    )
    address: str | None = Field(
        None, description="Ray cluster address; default: a local Ray when more than one worker is needed."
    )
    model_name: str | None = Field(
        None,
        description="The model's name in the dataset and in exported dictionaries (cfg.json model_name); default: --model when it is a hub id, else the hub id of a Hugging Face cache folder, else the folder's name.",
    )

    @field_validator("hooks")
    @classmethod
    def _distinct(cls, hooks: list[str]) -> list[str]:
        return distinct(hooks, "hook(s)")

    @field_validator("target_hooks")
    @classmethod
    def _pairs(cls, targets: list[str], info: ValidationInfo) -> list[str]:
        """One target per --hook, in order (or none), and none the hook itself."""
        hooks = info.data.get("hooks") or []
        if targets and len(targets) != len(hooks):
            raise ValueError(
                f"{len(hooks)} --hook and {len(targets)} --target-hook: give one --target-hook per --hook "
                "(paired in order), or none"
            )
        same = [hook for hook, target in zip(hooks, targets) if hook == target]
        if same:
            raise ValueError(f"{same[0]} is also its own --hook: a transcoder maps one activation to another")
        return targets

    def targets(self) -> dict[str, str]:
        """hook -> the hook whose output is its rows' target ({} for an SAE dataset)."""
        return dict(zip(self.hooks, self.target_hooks))

    def plan_settings(self) -> dict:
        """The settings that decide the dataset's contents (a rerun must match them to resume)."""
        return {key: getattr(self, key) for key in PLAN_KEYS}
