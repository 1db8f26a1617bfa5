"""Reading exported transcoders: a cfg.json that leaves out `apply_b_dec_to_input` reads the input as
SAELens writes transcoders (b_dec is the output's bias), a stray `d_out` does not change a plain SAE,
and a transcoder whose tensors do not fit its cfg.json is refused naming the file and `d_out`."""

import json

import pytest
import torch
from safetensors.torch import load, save

from dictsweep import load_dictionary
from dictsweep.errors import InputError
from dictsweep.sae import Member, build_ensemble
from dictsweep.sae.export import member_files

D_IN, N_LATENTS = 16, 32


def exported(folder, architecture: str, d_out: int = 0, change=None):
    """Member 0 of a fresh ensemble (its b_dec and skip path moved off zero), exported; `change(config,
    weights)` edits the files' contents first."""
    options = {"d_out": d_out} if d_out else {}
    ensemble = build_ensemble(architecture, D_IN, N_LATENTS, [Member(lr=1e-3, seed=4, l1_coef=1.0)], **options)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in ("b_dec", "b_enc", "W_skip"):
            if hasattr(ensemble, name):
                getattr(ensemble, name).copy_(torch.randn(getattr(ensemble, name).shape, generator=generator))
    files = member_files(ensemble, 0, torch.zeros(N_LATENTS), {})
    config, weights = json.loads(files["cfg.json"]), load(files["sae_weights.safetensors"])
    if change is not None:
        change(config, weights)
    files = {**files, "cfg.json": json.dumps(config).encode(), "sae_weights.safetensors": save(weights)}
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("d_out", [D_IN, 12])  # as wide as the input, a subtracted b_dec would go unnoticed
def test_a_transcoder_without_apply_b_dec_to_input_reads_its_input_unshifted(tmp_path, d_out):
    written = load_dictionary(str(exported(tmp_path / "written", "relu_skip_transcoder", d_out)))
    left_out = load_dictionary(
        str(exported(tmp_path / "left_out", "relu_skip_transcoder", d_out, lambda c, w: c.pop("apply_b_dec_to_input")))
    )
    assert written.cfg["apply_b_dec_to_input"] is False and "apply_b_dec_to_input" not in left_out.cfg
    x = torch.randn(20, D_IN, generator=torch.Generator().manual_seed(6))
    expected = (x @ left_out.W_enc + left_out.b_enc).relu()  # [20, n_latents]: no b_dec in the encoder
    torch.testing.assert_close(left_out.encode(x), expected)
    torch.testing.assert_close(left_out(x), written(x))
    assert left_out(x).shape == (20, d_out)


@pytest.mark.parametrize("stray", [5, "five", None])
def test_a_stray_d_out_does_not_change_a_plain_sae(tmp_path, stray):
    sae = load_dictionary(str(exported(tmp_path / "sae", "relu", change=lambda c, w: c.update(d_out=stray))))
    assert sae.W_dec.shape == (N_LATENTS, D_IN) and sae.b_dec.shape == (D_IN,)


@pytest.mark.parametrize(
    "change, file, words",
    [
        (lambda c, w: c.update(d_out=13), "sae_weights.safetensors", ["'W_dec'", "[32, 12]", "d_out=13", "[32, 13]"]),
        (lambda c, w: c.pop("d_out"), "cfg.json", ["'d_out'", "missing"]),
        (lambda c, w: c.update(d_out=True), "cfg.json", ["'d_out'", "an integer"]),
        (lambda c, w: c.update(d_out=0), "cfg.json", ["'d_out'", "> 0"]),
        (
            lambda c, w: w.update(W_skip=w["W_skip"].t().contiguous()),
            "sae_weights.safetensors",
            ["'W_skip'", "d_out=12"],
        ),
        (lambda c, w: c.update(apply_b_dec_to_input=True), "cfg.json", ["'apply_b_dec_to_input'", "output's bias"]),
    ],
)
def test_a_transcoder_that_does_not_fit_its_cfg_is_refused_naming_d_out(tmp_path, change, file, words):
    folder = exported(tmp_path / "tc", "relu_skip_transcoder", 12, change)
    with pytest.raises(InputError) as raised:
        load_dictionary(str(folder))
    message = str(raised.value)
    assert message.startswith(f"{folder}/{file}") and all(word in message for word in words), message
