"""Dictionaries on disk in SAELens v6 format, and the module that loads them for analysis.

A dictionary is a folder with `cfg.json`, `sae_weights.safetensors` (`W_enc [d_in, d_sae]`,
`b_enc [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]`, and `threshold [d_sae]` for jumprelu) and
`sparsity.safetensors` (`sparsity [d_sae]`, log10 firing frequency). This module makes and reads the
files' bytes; where they are stored is the caller's business (`cfg.json` comes last in the mapping,
so a writer that keeps the order never leaves a folder that looks finished but is not).
"""

from __future__ import annotations

import json
from typing import Callable

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from dictsweep.errors import InputError
from dictsweep.sae.ensemble import Ensemble

SAELENS_VERSION = "6.0.0"
WEIGHT_NAMES = {"standard": ("W_enc", "b_enc", "W_dec", "b_dec"),
                "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
                "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}


def saelens_config(architecture: str, d_in: int, d_sae: int, extra: dict, metadata: dict) -> dict:
    """The `cfg.json` of one dictionary: SAELens fields, then our own keys under `metadata`."""
    return {"architecture": architecture, "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
            "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
            "reshape_activations": "none", **extra,
            "metadata": {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": SAELENS_VERSION,
                         **metadata}}


def dictionary_files(config: dict, weights: dict[str, Tensor], log10_frequency: Tensor) -> dict[str, bytes]:
    """The files of one dictionary folder, name -> bytes, `cfg.json` last."""
    names = WEIGHT_NAMES[config["architecture"]]
    tensors = {name: weights[name].detach().float().cpu().contiguous() for name in names}
    sparsity = {"sparsity": log10_frequency.detach().float().cpu().contiguous()}
    return {"sae_weights.safetensors": save_safetensors(tensors),
            "sparsity.safetensors": save_safetensors(sparsity),
            "cfg.json": json.dumps(config, indent=2).encode()}


def member_files(ensemble: Ensemble, index: int, log10_frequency: Tensor, metadata: dict) -> dict[str, bytes]:
    """The dictionary folder of member `index` of an ensemble (input scale folded in)."""
    config = saelens_config(ensemble.saelens_architecture, ensemble.d_model, ensemble.n_latents,
                            ensemble.member_config(index), metadata)
    return dictionary_files(config, ensemble.member_state(index), log10_frequency)


class Dictionary(nn.Module):
    """An exported dictionary for analysis: `encode`, `decode`, `forward` on raw activations."""

    def __init__(self, config: dict, weights: dict[str, Tensor], sparsity: Tensor | None = None):
        super().__init__()
        self.cfg, self.architecture = config, config["architecture"]
        self.metadata = config.get("metadata", {})
        self.k = int(config.get("k", 0))
        for name in WEIGHT_NAMES[self.architecture]:
            self.register_parameter(name, nn.Parameter(weights[name], requires_grad=False))
        self.register_buffer("sparsity", sparsity)

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations `[..., d_sae]` of activations `[..., d_in]`."""
        sae_in = x - self.b_dec if self.cfg.get("apply_b_dec_to_input", True) else x
        pre = sae_in @ self.W_enc + self.b_enc
        if self.architecture == "topk":
            values, indices = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, indices, values.relu())
        if self.architecture == "jumprelu":
            return pre.relu() * (pre > self.threshold)
        return pre.relu()

    def decode(self, latents: Tensor) -> Tensor:
        """Reconstruction `[..., d_in]` of latent activations `[..., d_sae]`."""
        return latents @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def read_dictionary(read: Callable[[str], bytes | None], where: str) -> Dictionary:
    """A dictionary from its files; `read(name)` gives a file's bytes or None when it is absent."""
    raw_config = read("cfg.json")
    if raw_config is None:
        raise InputError(f"{where} has no cfg.json: not an exported dictionary, or its export did not finish")
    config = json.loads(raw_config)
    architecture = config.get("architecture")
    if architecture not in WEIGHT_NAMES:
        raise InputError(f"{where}/cfg.json: field 'architecture' is {architecture!r}; "
                         f"expected one of {sorted(WEIGHT_NAMES)}")
    raw_weights = read("sae_weights.safetensors")
    if raw_weights is None:
        raise InputError(f"{where} has cfg.json but no sae_weights.safetensors")
    weights = load_safetensors(raw_weights)
    missing = set(WEIGHT_NAMES[architecture]) - set(weights)
    if missing:
        raise InputError(f"{where}/sae_weights.safetensors lacks {sorted(missing)}")
    raw_sparsity = read("sparsity.safetensors")
    sparsity = load_safetensors(raw_sparsity)["sparsity"] if raw_sparsity is not None else None
    return Dictionary(config, weights, sparsity)
