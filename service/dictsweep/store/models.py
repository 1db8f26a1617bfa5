"""Hugging Face models for harvesting (and spliced evaluation): loading, hook lookup, capture.

A hook is a module path from `model.named_modules()` (`encoder.layer.3`); its activation is the
module's output, or the first element when the output is a tuple (or a ModelOutput).
A local folder is always loaded with `local_files_only` (no network); a hub name is looked up in
the local cache first and fetched only where the hub is reachable and HF_HUB_OFFLINE is not set.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from dictsweep.errors import InputError

if TYPE_CHECKING:
    import torch

SUGGESTIONS = 6  # module names offered when a hook does not exist


def is_local(name_or_path: str) -> bool:
    """Whether `name_or_path` is a model folder on this machine (rather than a hub name)."""
    return os.path.isdir(os.path.expanduser(name_or_path))


def from_pretrained(loader, name_or_path: str, what: str, **kwargs):
    """`loader.from_pretrained` without network for local folders and cached hub names."""
    if is_local(name_or_path):
        try:
            return loader.from_pretrained(os.path.expanduser(name_or_path), local_files_only=True, **kwargs)
        except (OSError, ValueError) as error:
            raise InputError(
                f"--model {name_or_path}: the folder is not a Hugging Face model ({what}: {error})"
            ) from None
    if name_or_path.startswith((".", "/", "~")):
        raise InputError(f"--model {name_or_path}: no such folder")
    try:
        return loader.from_pretrained(name_or_path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as cached_error:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get(
            "TRANSFORMERS_OFFLINE", ""
        ) not in ("", "0")
        if offline:
            raise InputError(
                f"--model {name_or_path}: not a local folder and not in the Hugging Face "
                f"cache, and HF_HUB_OFFLINE is set ({what}: {cached_error}); download it "
                "first or pass a local model folder"
            ) from None
    try:
        return loader.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as error:
        raise InputError(
            f"--model {name_or_path}: not a local folder, not in the Hugging Face cache, "
            f"and the hub could not provide it ({what}: {error}); check the name and the "
            "network, or pass a local model folder"
        ) from None


def load_tokenizer(name_or_path: str):
    """The model's (fast where available) tokenizer."""
    from transformers import AutoTokenizer

    return from_pretrained(AutoTokenizer, name_or_path, "tokenizer")


def load_structure(name_or_path: str) -> torch.nn.Module:
    """The model built on the meta device: its modules and config, no weights (cheap to check hooks)."""
    import torch
    from transformers import AutoConfig, AutoModel

    config = from_pretrained(AutoConfig, name_or_path, "config")
    with torch.device("meta"):
        return AutoModel.from_config(config)


def load_model(name_or_path: str, device: str = "cpu", dtype: str = "float32"):
    """(model in eval mode on `device` with weights in `dtype`, tokenizer); any AutoModel."""
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars from every worker are noise
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    model = from_pretrained(AutoModel, name_or_path, "model", dtype=torch_dtype)
    return model.to(device).eval(), load_tokenizer(name_or_path)


def find_module(model: torch.nn.Module, hook: str, option: str = "--hook") -> torch.nn.Module:
    """The module at path `hook`; InputError naming the hook (as `option`) and the nearest module names if absent."""
    modules = dict(model.named_modules())
    if hook in modules and hook:
        return modules[hook]
    names = [name for name in modules if name]
    # the deepest existing parent and its children, then names that look alike
    parent = hook
    while parent and parent not in modules:
        parent = parent.rpartition(".")[0]
    children = [f"{parent}.{name}" if parent else name for name, _ in modules[parent].named_children()]
    close = difflib.get_close_matches(hook, names, n=SUGGESTIONS, cutoff=0.5)
    suggestions = list(dict.fromkeys(close + children))[:SUGGESTIONS]
    where = f"'{parent}' holds" if parent else "top-level modules are"
    raise InputError(
        f"{option} {hook!r}: no such module in {type(model).__name__}; {where} "
        f"{', '.join(children[:SUGGESTIONS]) or 'nothing'}; did you mean "
        f"{' or '.join(repr(name) for name in suggestions)}? (hooks are paths from "
        "model.named_modules(), e.g. 'encoder.layer.3')"
    )


class StopForward(Exception):
    """Raised inside the last needed hook to skip the layers after it."""


def first_output(output):
    """A module's activation: its output, or the first element of a tuple (or ModelOutput)."""
    return output[0] if isinstance(output, (tuple, list)) or hasattr(output, "to_tuple") else output


class Capture:
    """The outputs of named modules during `run`; see `capture_outputs`."""

    def __init__(self, model: torch.nn.Module, hooks: list[str], stop_early: bool):
        self.model, self.hooks, self.stop_early = model, list(hooks), stop_early
        self.outputs: dict[str, torch.Tensor] = {}

    def _record(self, hook: str, output) -> None:
        self.outputs[hook] = first_output(output)
        if self.stop_early and len(self.outputs) == len(self.hooks):
            raise StopForward

    def run(self, **inputs) -> dict[str, torch.Tensor]:
        """Call the model on `inputs` (no grad) and return {hook: output} for this call."""
        import torch

        self.outputs = {}
        with torch.inference_mode():
            try:
                self.model(**inputs)
            except StopForward:
                pass
        missing = [hook for hook in self.hooks if hook not in self.outputs]
        if missing:
            raise InputError(
                f"--hook {', '.join(missing)}: the module(s) did not run in the model's "
                "forward pass; choose modules on the forward path"
            )
        return self.outputs


@contextmanager
def capture_outputs(model: torch.nn.Module, hooks: list[str], stop_early: bool = True) -> Iterator[Capture]:
    """Forward hooks on the modules named `hooks` for the duration of the block.

    With `stop_early`, the forward pass stops once every hooked module has run, so harvesting
    layer 3 of a 6-layer model costs half the model.
    """
    capture = Capture(model, hooks, stop_early)
    handles = [
        find_module(model, hook).register_forward_hook(
            lambda module, args, output, hook=hook: capture._record(hook, output)
        )
        for hook in hooks
    ]
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()


# -- portable names in exports: the hub id and, where the family has one, the TransformerLens hook ----------
# HF module path (as harvested by AutoModel, with or without the causal-LM wrapper's prefix) -> TL hook,
# per model family (`config.model_type`); {n} is the layer
TRANSFORMER_LENS_HOOKS = {
    "gpt2": (
        r"(?:transformer\.)?h\.{n}",
        r"(?:transformer\.)?h\.{n}\.attn",
        r"(?:transformer\.)?h\.{n}\.mlp",
        r"(?:transformer\.)?h\.{n}\.mlp\.act",
        r"(?:transformer\.)?h\.{n}\.ln_1",
        r"(?:transformer\.)?h\.{n}\.ln_2",
    ),
    "gpt_neox": (
        r"(?:gpt_neox\.)?layers\.{n}",
        r"(?:gpt_neox\.)?layers\.{n}\.attention",
        r"(?:gpt_neox\.)?layers\.{n}\.mlp",
        r"(?:gpt_neox\.)?layers\.{n}\.mlp\.act",
        r"(?:gpt_neox\.)?layers\.{n}\.input_layernorm",
        r"(?:gpt_neox\.)?layers\.{n}\.post_attention_layernorm",
    ),
    "llama": (
        r"(?:model\.)?layers\.{n}",
        r"(?:model\.)?layers\.{n}\.self_attn",
        r"(?:model\.)?layers\.{n}\.mlp",
        None,
        r"(?:model\.)?layers\.{n}\.input_layernorm",
        r"(?:model\.)?layers\.{n}\.post_attention_layernorm",
    ),
}
TRANSFORMER_LENS_HOOKS.update(
    {family: TRANSFORMER_LENS_HOOKS["llama"] for family in ("gemma", "gemma2", "gemma3", "gemma3_text", "mistral")}
)
TL_NAMES = (
    "blocks.{n}.hook_resid_post",
    "blocks.{n}.hook_attn_out",
    "blocks.{n}.hook_mlp_out",
    "blocks.{n}.mlp.hook_post",
    "blocks.{n}.ln1.hook_normalized",
    "blocks.{n}.ln2.hook_normalized",
)


def transformer_lens_hook(hook: str, model_type: str | None) -> str | None:
    """The TransformerLens hook name of a harvested module path (`transformer.h.3` ->
    `blocks.3.hook_resid_post`), or None where the family or the module has none. Without a
    recorded model type (datasets from before it was recorded) the module path alone decides."""
    import re

    families = [model_type] if model_type else list(TRANSFORMER_LENS_HOOKS)
    for family in families:
        for pattern, name in zip(TRANSFORMER_LENS_HOOKS.get(family, ()), TL_NAMES):
            found = pattern and re.fullmatch(pattern.format(n=r"(\d+)"), hook)
            if found:
                return name.format(n=found.group(1))
    return None


def hub_name(name_or_path: str) -> str:
    """A model's name that means the same on any machine: the hub id as given, the `ORG/NAME` of a
    folder in the Hugging Face cache (`models--ORG--NAME/snapshots/...`), else the folder's name."""
    if not is_local(name_or_path) and not name_or_path.startswith((".", "/", "~")):
        return name_or_path
    path = os.path.abspath(os.path.expanduser(name_or_path))
    for part in reversed(path.split(os.sep)):
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/", 1)
    return os.path.basename(path.rstrip(os.sep))


def export_names(source: dict) -> dict:
    """SAELens `metadata` naming of a dataset's source (manifest `source`): `model_name` (portable),
    `hook_name` as harvested, and `hook_name_transformer_lens` where there is one; for a transcoder
    dataset `hook_name_out` (its target hook) and `hook_name_out_transformer_lens` likewise."""
    model, hook = source.get("model"), source.get("hook")
    names = {"model_name": source.get("model_name") or (hub_name(model) if model else None), "hook_name": hook}
    lens = transformer_lens_hook(hook, source.get("model_type")) if hook else None
    if lens:
        names["hook_name_transformer_lens"] = lens
    target = source.get("target_hook")  # a transcoder's output hook (SAELens: `hook_name_out`)
    if target:
        names["hook_name_out"] = target
        lens = transformer_lens_hook(target, source.get("model_type"))
        if lens:
            names["hook_name_out_transformer_lens"] = lens
    return names
