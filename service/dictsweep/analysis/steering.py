"""Activation addition: a direction added at a module's output during the model's forward."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from dictsweep.errors import InputError
from dictsweep.store.models import find_module


@contextmanager
def steer(model: torch.nn.Module, hook: str, direction: Tensor, scale: float = 1.0) -> Iterator[None]:
    """Within the block, the output of module `hook` (its first element when it is a tuple) is
    `output + scale * direction` at every position: a latent's decoder row (`sae.W_dec[latent]`)
    or a baseline's component (PCA) as a steering vector."""
    if direction.ndim != 1:
        raise InputError(f"steer: direction must be one vector [d_model], got shape {list(direction.shape)}")
    module = find_module(model, hook)

    def shifted(output: Tensor) -> Tensor:
        if output.shape[-1] != direction.shape[0]:
            raise InputError(
                f"steer: the direction has {direction.shape[0]} dimensions but {hook} outputs {output.shape[-1]}"
            )
        return output + scale * direction.to(output.device, output.dtype)

    def add(module, args, output):
        if isinstance(output, Tensor):
            return shifted(output)
        if isinstance(output, tuple):
            return (shifted(output[0]), *output[1:])
        if isinstance(output, list):
            return [shifted(output[0]), *output[1:]]
        first = next(iter(output.keys()))  # a transformers ModelOutput
        output[first] = shifted(output[first])
        return output

    handle = module.register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()
