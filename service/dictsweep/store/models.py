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
            raise InputError(f"--model {name_or_path}: the folder is not a Hugging Face model "
                             f"({what}: {error})") from None
    if name_or_path.startswith((".", "/", "~")):
        raise InputError(f"--model {name_or_path}: no such folder")
    try:
        return loader.from_pretrained(name_or_path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as cached_error:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or \
            os.environ.get("TRANSFORMERS_OFFLINE", "") not in ("", "0")
        if offline:
            raise InputError(f"--model {name_or_path}: not a local folder and not in the Hugging Face "
                             f"cache, and HF_HUB_OFFLINE is set ({what}: {cached_error}); download it "
                             "first or pass a local model folder") from None
    try:
        return loader.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as error:
        raise InputError(f"--model {name_or_path}: not a local folder, not in the Hugging Face cache, "
                         f"and the hub could not provide it ({what}: {error}); check the name and the "
                         "network, or pass a local model folder") from None


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


def find_module(model: torch.nn.Module, hook: str) -> torch.nn.Module:
    """The module at path `hook`; InputError naming the hook and the nearest module names if absent."""
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
    raise InputError(f"--hook {hook!r}: no such module in {type(model).__name__}; {where} "
                     f"{', '.join(children[:SUGGESTIONS]) or 'nothing'}; did you mean "
                     f"{' or '.join(repr(name) for name in suggestions)}? (hooks are paths from "
                     "model.named_modules(), e.g. 'encoder.layer.3')")


class StopForward(Exception):
    """Raised inside the last needed hook to skip the layers after it."""


class Capture:
    """The outputs of named modules during `run`; see `capture_outputs`."""

    def __init__(self, model: torch.nn.Module, hooks: list[str], stop_early: bool):
        self.model, self.hooks, self.stop_early = model, list(hooks), stop_early
        self.outputs: dict[str, torch.Tensor] = {}

    def _record(self, hook: str, output) -> None:
        if isinstance(output, (tuple, list)) or hasattr(output, "to_tuple"):
            output = output[0]
        self.outputs[hook] = output
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
            raise InputError(f"--hook {', '.join(missing)}: the module(s) did not run in the model's "
                             "forward pass; choose modules on the forward path")
        return self.outputs


@contextmanager
def capture_outputs(model: torch.nn.Module, hooks: list[str], stop_early: bool = True) -> Iterator[Capture]:
    """Forward hooks on the modules named `hooks` for the duration of the block.

    With `stop_early`, the forward pass stops once every hooked module has run, so harvesting
    layer 3 of a 6-layer model costs half the model.
    """
    capture = Capture(model, hooks, stop_early)
    handles = [find_module(model, hook).register_forward_hook(
        lambda module, args, output, hook=hook: capture._record(hook, output)) for hook in hooks]
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()
