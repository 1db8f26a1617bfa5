"""Checkpoint files: tensors in safetensors, everything else as JSON in the same file's header.

Nothing in a checkpoint is code: loading one never unpickles. A state is a tree of dicts (string
keys), lists, tensors and plain values (str, int, float, bool, None); each tensor is stored under
its path in the tree (`trainers.0.state.ensemble.W_enc`) and the JSON tree names it in its place.
Tensors come back on the CPU, bit for bit (dtype, shape and bytes as saved).
"""

from __future__ import annotations

import json

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from dictsweep.errors import InputError

FORMAT = "dictsweep-checkpoint/1"
PLAIN = (str, int, float, bool, type(None))


def flatten(state, path: str, tensors: dict[str, torch.Tensor], seen: set[int]):
    """The JSON-ready tree of `state`, each tensor replaced by {"tensor": key} and put in `tensors`."""
    if isinstance(state, torch.Tensor):
        tensor = state.detach().to("cpu").contiguous()
        if tensor.data_ptr() in seen or tensor.data_ptr() == state.data_ptr():
            tensor = tensor.clone()  # safetensors stores no shared or borrowed memory
        seen.add(tensor.data_ptr())
        tensors[path] = tensor
        return {"tensor": path}
    if isinstance(state, dict):
        if not all(isinstance(key, str) for key in state):
            raise TypeError(f"checkpoint state {path or '(root)'}: keys must be strings")
        return {
            "dict": {
                key: flatten(value, f"{path}.{key}" if path else key, tensors, seen) for key, value in state.items()
            }
        }
    if isinstance(state, (list, tuple)):
        return {
            "list": [
                flatten(value, f"{path}.{index}" if path else str(index), tensors, seen)
                for index, value in enumerate(state)
            ]
        }
    if isinstance(state, PLAIN):
        return {"value": state}
    raise TypeError(f"checkpoint state {path or '(root)'}: {type(state).__name__} is neither a tensor nor plain data")


def unflatten(tree, tensors: dict[str, torch.Tensor]):
    """The state `flatten` was given, from its tree and tensors (raises KeyError/TypeError if malformed)."""
    if not isinstance(tree, dict) or len(tree) != 1:
        raise TypeError(f"malformed node {str(tree)[:80]!r}")
    ((kind, content),) = tree.items()
    if kind == "tensor":
        return tensors[content]
    if kind == "dict" and isinstance(content, dict):
        return {key: unflatten(value, tensors) for key, value in content.items()}
    if kind == "list" and isinstance(content, list):
        return [unflatten(value, tensors) for value in content]
    if kind == "value" and isinstance(content, PLAIN):
        return content
    raise TypeError(f"malformed node {kind!r}")


def checkpoint_bytes(state: dict) -> bytes:
    """One checkpoint file's bytes."""
    tensors: dict[str, torch.Tensor] = {}
    tree = flatten(state, "", tensors, set())
    return save(tensors, metadata={"format": FORMAT, "state": json.dumps(tree)})


def read_checkpoint(data: bytes, name: str) -> dict:
    """The state in a checkpoint file's bytes; an InputError naming the file (`name`) when they are
    not a checkpoint of this format (e.g. a pickle): nothing in them is run."""
    try:
        tensors = load(data)
        header_size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}, expected {FORMAT!r}")
        return unflatten(json.loads(metadata["state"]), tensors)
    except (SafetensorError, ValueError, KeyError, TypeError, OverflowError, RecursionError) as error:
        why = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise InputError(f"{name}: not a dictsweep checkpoint ({why}); delete it to start afresh") from None
