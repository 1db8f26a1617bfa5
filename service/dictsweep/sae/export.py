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
WEIGHT_NAMES = {
    "standard": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
    # transcoders (SAELens' names): W_dec [d_sae, d_out], b_dec [d_out], W_skip [d_out, d_in]
    "transcoder": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "skip_transcoder": ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip"),
    "jumprelu_transcoder": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
    "jumprelu_skip_transcoder": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"),
}


def saelens_config(architecture: str, d_in: int, d_sae: int, extra: dict, metadata: dict) -> dict:
    """The `cfg.json` of one dictionary: SAELens fields, then our own keys under `metadata`."""
    return {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **extra,
        "metadata": {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": SAELENS_VERSION, **metadata},
    }


def dictionary_files(config: dict, weights: dict[str, Tensor], log10_frequency: Tensor) -> dict[str, bytes]:
    """The files of one dictionary folder, name -> bytes, `cfg.json` last."""
    names = WEIGHT_NAMES[config["architecture"]]
    tensors = {name: weights[name].detach().float().cpu().contiguous() for name in names}
    sparsity = {"sparsity": log10_frequency.detach().float().cpu().contiguous()}
    return {
        "sae_weights.safetensors": save_safetensors(tensors),
        "sparsity.safetensors": save_safetensors(sparsity),
        "cfg.json": json.dumps(config, indent=2).encode(),
    }


def member_files(ensemble: Ensemble, index: int, log10_frequency: Tensor, metadata: dict) -> dict[str, bytes]:
    """The dictionary folder of member `index` of an ensemble (input scale folded in)."""
    config = saelens_config(
        ensemble.saelens_architecture, ensemble.d_model, ensemble.n_latents, ensemble.member_config(index), metadata
    )
    return dictionary_files(config, ensemble.member_state(index), log10_frequency)


class Dictionary(nn.Module):
    """An exported dictionary for analysis: `encode`, `decode`, `forward` on raw activations."""

    def __init__(self, config: dict, weights: dict[str, Tensor], sparsity: Tensor | None = None):
        super().__init__()
        self.cfg, self.architecture = config, config["architecture"]
        self.metadata = config.get("metadata", {})
        self.k = int(config.get("k", 0))
        self.transcoder = self.architecture.endswith("transcoder")  # reads x, writes its target [..., d_out]
        for name in WEIGHT_NAMES[self.architecture]:
            self.register_parameter(name, nn.Parameter(weights[name], requires_grad=False))
        self.register_buffer("sparsity", sparsity)

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations `[..., d_sae]` of activations `[..., d_in]`."""
        sae_in = x - self.b_dec if self.cfg.get("apply_b_dec_to_input", not self.transcoder) else x
        pre = sae_in @ self.W_enc + self.b_enc
        if self.architecture == "topk":
            values, indices = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, indices, values.relu())
        if self.architecture.startswith("jumprelu"):
            return pre.relu() * (pre > self.threshold)
        return pre.relu()

    def decode(self, latents: Tensor) -> Tensor:
        """Reconstruction `[..., d_in]` (a transcoder's: `[..., d_out]`, without its skip path) of latent
        activations `[..., d_sae]`."""
        return latents @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.output(x, self.encode(x))

    def output(self, x: Tensor, latents: Tensor) -> Tensor:
        """What the dictionary writes for activations `x` whose latents are `latents`: `decode`, plus a skip
        transcoder's skip path (the reconstruction an SAE, or a transcoder's target, is measured against)."""
        out = self.decode(latents)
        return out + x @ self.W_skip.t() if "skip" in self.architecture else out


def read_dictionary(read: Callable[[str], bytes | None], where: str) -> Dictionary:
    """A dictionary from its files; `read(name)` gives a file's bytes or None when it is absent.

    The files may come from anywhere: cfg.json is checked against the tensors (shapes, dtypes, `k`,
    booleans), and every error is an InputError naming the file and the field.
    """
    config = read_config(read("cfg.json"), f"{where}/cfg.json")
    architecture, d_in, d_sae = config["architecture"], config["d_in"], config["d_sae"]
    d_out = config["d_out"] if architecture.endswith("transcoder") else d_in  # a stray d_out elsewhere means nothing
    weights = read_tensors(read("sae_weights.safetensors"), f"{where}/sae_weights.safetensors", required=True)
    shapes = {
        "W_enc": (d_in, d_sae),
        "b_enc": (d_sae,),
        "W_dec": (d_sae, d_out),
        "b_dec": (d_out,),
        "threshold": (d_sae,),
        "W_skip": (d_out, d_in),
    }
    sizes = {"d_in": d_in, "d_sae": d_sae, **({"d_out": d_out} if architecture.endswith("transcoder") else {})}
    check_tensors(
        weights,
        {name: shapes[name] for name in WEIGHT_NAMES[architecture]},
        f"{where}/sae_weights.safetensors",
        sizes,
    )
    sparsity = read_tensors(read("sparsity.safetensors"), f"{where}/sparsity.safetensors", required=False)
    if sparsity is not None:
        check_tensors(sparsity, {"sparsity": (d_sae,)}, f"{where}/sparsity.safetensors", sizes, finite=False)
        sparsity = sparsity["sparsity"]
    return Dictionary(config, weights, sparsity)


JSON_KINDS = {bool: "true or false", int: "an integer", str: "a string", dict: "an object"}
FLOAT_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def read_config(raw: bytes | None, where: str) -> dict:
    """cfg.json parsed and its fields checked (types and ranges; the tensors are checked after)."""
    if raw is None:
        raise InputError(f"{where} is missing: not an exported dictionary, or its export did not finish")
    try:
        config = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{where} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise InputError(f"{where}: expected a JSON object, found {type(config).__name__}")

    def field(name: str, kind: type, required: bool = True):
        value = config.get(name)
        if value is None:
            if required:
                raise InputError(f"{where}: field {name!r} is missing")
            return None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InputError(f"{where}: field {name!r} must be {JSON_KINDS[kind]}, found {value!r}")
        return value

    architecture = field("architecture", str)
    if architecture not in WEIGHT_NAMES:
        raise InputError(f"{where}: field 'architecture' is {architecture!r}; expected one of {sorted(WEIGHT_NAMES)}")
    for name in ("d_in", "d_sae", *(["d_out"] if architecture.endswith("transcoder") else [])):
        if field(name, int) <= 0:
            raise InputError(f"{where}: field {name!r} must be > 0, found {config[name]}")
    dtype = field("dtype", str, required=False)
    if dtype is not None and dtype.removeprefix("torch.") not in FLOAT_DTYPES:
        raise InputError(f"{where}: field 'dtype' is {dtype!r}; expected one of {sorted(FLOAT_DTYPES)}")
    for name in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm"):
        field(name, bool, required=False)
    if config.get("rescale_acts_by_decoder_norm"):
        raise InputError(
            f"{where}: field 'rescale_acts_by_decoder_norm' is true, which this loader does not "
            "apply; load the folder with SAELens instead"
        )
    for name in ("normalize_activations", "reshape_activations"):
        if field(name, str, required=False) not in (None, "none"):
            raise InputError(
                f"{where}: field {name!r} is {config[name]!r}; this loader reads only 'none' "
                "(dictsweep folds the scale into the weights); load the folder with SAELens instead"
            )
    field("metadata", dict, required=False)
    if architecture.endswith("transcoder") and config.get("apply_b_dec_to_input"):
        raise InputError(f"{where}: field 'apply_b_dec_to_input' is true; a transcoder's b_dec is its output's bias")
    if architecture == "topk":
        k = field("k", int)
        if not 0 < k <= config["d_sae"]:
            raise InputError(f"{where}: field 'k' is {k}; a topk dictionary needs 0 < k <= d_sae ({config['d_sae']})")
    return config


def read_tensors(raw: bytes | None, where: str, required: bool) -> dict[str, Tensor] | None:
    """The tensors of a safetensors file (None when absent and not required)."""
    if raw is None:
        if required:
            raise InputError(f"{where} is missing: the dictionary has no weights")
        return None
    try:
        return load_safetensors(raw)
    except Exception as error:  # safetensors raises its own error types for bad files
        raise InputError(f"{where}: not a readable safetensors file ({error})") from None


def check_tensors(
    tensors: dict[str, Tensor],
    shapes: dict[str, tuple[int, ...]],
    where: str,
    sizes: dict[str, int],
    finite: bool = True,
) -> None:
    """Each named tensor present, floating, of the shape cfg.json's `sizes` (d_in, d_sae, a transcoder's
    d_out) imply (and finite); one dtype for all."""
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise InputError(f"{where} lacks {missing}")
    for name, shape in shapes.items():
        tensor = tensors[name]
        if tensor.dtype not in FLOAT_DTYPES.values():
            raise InputError(f"{where}: tensor {name!r} is {tensor.dtype}; expected a float dtype")
        if tuple(tensor.shape) != shape:
            raise InputError(
                f"{where}: tensor {name!r} has shape {list(tensor.shape)}, but cfg.json "
                f"({', '.join(f'{key}={value}' for key, value in sizes.items())}) implies {list(shape)}"
            )
        if finite and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{where}: tensor {name!r} holds NaN or infinite values")
    dtypes = {name: str(tensors[name].dtype).removeprefix("torch.") for name in shapes}
    if len(set(dtypes.values())) > 1:
        raise InputError(f"{where}: tensors of different dtypes {dtypes}; a dictionary's weights share one dtype")
