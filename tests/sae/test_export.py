"""Exports load back (ours and SAELens v6) and reproduce the trained module on raw activations."""

import json

import pytest
import sae_lens
import torch

from dictsweep import load_dictionary
from dictsweep.config import TrainConfig
from dictsweep.errors import InputError
from dictsweep.sae import Member, build_ensemble
from dictsweep.sae.export import member_files
from dictsweep.store.models import export_names
from dictsweep.train.loop import EnsembleTrainer

D_MODEL, N_LATENTS, SCALE = 12, 40, 3.5


pytestmark = pytest.mark.usefixtures("one_thread")


MEMBERS = {
    "relu": [Member(lr=3e-3, seed=4, l1_coef=0.5), Member(lr=3e-3, seed=5, l1_coef=2.0)],
    "jumprelu": [Member(lr=3e-3, seed=4, l1_coef=0.05), Member(lr=3e-3, seed=5, l1_coef=0.2)],
    "topk": [Member(lr=3e-3, seed=4, k=3), Member(lr=3e-3, seed=5, k=6)],
    "batchtopk": [Member(lr=3e-3, seed=4, k=3), Member(lr=3e-3, seed=5, k=6)],
}
SAELENS_ARCHITECTURE = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk", "batchtopk": "jumprelu"}


def trained(architecture):
    generator = torch.Generator().manual_seed(0)
    ensemble = build_ensemble(architecture, D_MODEL, N_LATENTS, MEMBERS[architecture])
    ensemble.input_scale.fill_(SCALE)
    trainer = EnsembleTrainer(ensemble, TrainConfig(tokens=3200, batch_rows=64, lr_warmup_steps=2), 50)
    for _ in range(50):
        trainer.step(torch.randn(64, D_MODEL, generator=generator) + 2.0)
    # move the biases away from zero so that folding the scale into them is exercised
    with torch.no_grad():
        ensemble.b_enc.add_(0.05)
        ensemble.b_dec.add_(0.3)
    return ensemble, trainer


def dense_latents(ensemble, x):
    """Inference latents `[K, B, n_latents]` of raw activations, in raw units."""
    values, indices = ensemble.encode(x * SCALE)
    return (values if indices is None else ensemble.densify(values, indices)) / SCALE


def write(folder, files):
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


@pytest.mark.parametrize("architecture", sorted(MEMBERS))
def test_export_reproduces_trained_module(tmp_path, architecture):
    ensemble, trainer = trained(architecture)
    x = torch.randn(100, D_MODEL, generator=torch.Generator().manual_seed(1)) + 2.0
    with torch.no_grad():  # no gradients: batchtopk keeps what is above its learned threshold
        out = ensemble(x * SCALE)
    for index in range(ensemble.n_members):
        folder = tmp_path / f"member{index}"
        write(
            folder,
            member_files(
                ensemble,
                index,
                trainer.firing.log10_frequency()[index],
                {"model_name": "toy", "hook_name": "h", "dictsweep": {"seed": index}},
            ),
        )
        loaded = load_dictionary(str(folder))
        torch.testing.assert_close(loaded(x), out.sae_out[index] / SCALE, rtol=1e-5, atol=1e-5)
        latents = loaded.encode(x)
        assert float((latents > 0).sum(-1).float().mean()) == pytest.approx(float(out.l0[index]))
        config = json.loads((folder / "cfg.json").read_text())
        assert config["normalize_activations"] == "none" and config["metadata"]["hook_name"] == "h"
        assert config["architecture"] == SAELENS_ARCHITECTURE[architecture]
        assert loaded.sparsity.shape == (N_LATENTS,)


@pytest.mark.parametrize("architecture", sorted(MEMBERS))
def test_saelens_loads_export(tmp_path, architecture):
    ensemble, trainer = trained(architecture)
    folder = tmp_path / "sae"
    # the names a GPT-2 harvest from a local Hugging Face cache folder exports
    source = {
        "model": "/home/someone/.cache/huggingface/hub/models--openai-community--gpt2/snapshots/607a30d",
        "model_type": "gpt2",
        "hook": "transformer.h.3",
    }
    write(folder, member_files(ensemble, 1, trainer.firing.log10_frequency()[1], export_names(source)))
    sae = sae_lens.SAE.load_from_disk(str(folder))
    assert sae.cfg.metadata.model_name == "openai-community/gpt2" and sae.cfg.metadata.hook_name == "transformer.h.3"
    assert (
        json.loads((folder / "cfg.json").read_text())["metadata"]["hook_name_transformer_lens"]
        == "blocks.3.hook_resid_post"
    )
    x = torch.randn(50, D_MODEL, generator=torch.Generator().manual_seed(2)) + 2.0
    with torch.no_grad():
        expected = ensemble(x * SCALE).sae_out[1] / SCALE
        torch.testing.assert_close(sae(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.encode(x), dense_latents(ensemble, x)[1], rtol=1e-5, atol=1e-5)
    assert sae.cfg.d_sae == N_LATENTS and sae.cfg.metadata.sae_lens_version >= "6.0.0"


def hostile(files: dict[str, bytes], change: str) -> dict[str, bytes]:
    """A topk dictionary's files with one thing wrong, as someone else's folder might have it."""
    from safetensors.torch import load, save

    config, weights = json.loads(files["cfg.json"]), load(files["sae_weights.safetensors"])
    if change == "garbled cfg.json":
        return {**files, "cfg.json": files["cfg.json"][:-7]}
    if change == "cfg.json a list":
        return {**files, "cfg.json": b"[1, 2]"}
    if change == "garbled weights":
        return {**files, "sae_weights.safetensors": files["sae_weights.safetensors"][:50]}
    if change == "transposed W_enc":
        weights["W_enc"] = weights["W_enc"].T.contiguous()
    elif change == "integer W_dec":
        weights["W_dec"] = weights["W_dec"].round().to(torch.int32)
    elif change == "NaN in b_dec":
        weights["b_dec"][3] = float("nan")
    elif change == "half b_enc":
        weights["b_enc"] = weights["b_enc"].half()
    elif change == "no b_dec":
        del weights["b_dec"]
    elif change == "sparsity of another size":
        return {**files, "sparsity.safetensors": save({"sparsity": torch.zeros(N_LATENTS + 1)})}
    else:
        field, value = change.split("=", 1)
        config[field] = json.loads(value)
    return {**files, "cfg.json": json.dumps(config).encode(), "sae_weights.safetensors": save(weights)}


@pytest.mark.parametrize(
    "change, file, words",
    [
        ("garbled cfg.json", "cfg.json", ["not valid JSON"]),
        ("cfg.json a list", "cfg.json", ["JSON object"]),
        ("garbled weights", "sae_weights.safetensors", ["not a readable safetensors"]),
        (
            f"d_sae={N_LATENTS * 2}",
            "sae_weights.safetensors",
            ["'W_enc'", f"[{D_MODEL}, {N_LATENTS}]", f"d_sae={N_LATENTS * 2}"],
        ),
        (f"d_in={D_MODEL + 1}", "sae_weights.safetensors", ["'W_enc'", f"d_in={D_MODEL + 1}"]),
        ("transposed W_enc", "sae_weights.safetensors", ["'W_enc'", f"[{N_LATENTS}, {D_MODEL}]"]),
        ("integer W_dec", "sae_weights.safetensors", ["'W_dec'", "int32"]),
        ("NaN in b_dec", "sae_weights.safetensors", ["'b_dec'", "NaN"]),
        ("half b_enc", "sae_weights.safetensors", ["different dtypes", "float16"]),
        ("no b_dec", "sae_weights.safetensors", ["['b_dec']"]),
        ("sparsity of another size", "sparsity.safetensors", ["'sparsity'", f"[{N_LATENTS + 1}]"]),
        ('apply_b_dec_to_input="false"', "cfg.json", ["'apply_b_dec_to_input'", "true or false", "'false'"]),
        ("rescale_acts_by_decoder_norm=true", "cfg.json", ["'rescale_acts_by_decoder_norm'"]),
        (f"k={N_LATENTS + 1}", "cfg.json", ["'k'", f"k <= d_sae ({N_LATENTS})"]),
        ("k=0", "cfg.json", ["'k'"]),
        ("k=3.0", "cfg.json", ["'k'", "an integer"]),
        ("k=true", "cfg.json", ["'k'", "an integer"]),
        ("k=null", "cfg.json", ["'k'", "missing"]),
        ("d_sae=true", "cfg.json", ["'d_sae'", "an integer"]),
        ("d_in=-4", "cfg.json", ["'d_in'", "> 0"]),
        ('architecture="gated"', "cfg.json", ["'architecture'", "'gated'"]),
        ('architecture=["topk"]', "cfg.json", ["'architecture'", "a string"]),
        ('dtype="int8"', "cfg.json", ["'dtype'", "'int8'"]),
        ('normalize_activations="expected_average_only_in"', "cfg.json", ["'normalize_activations'"]),
        ("metadata=[]", "cfg.json", ["'metadata'", "an object"]),
    ],
)
def test_hostile_folder_is_refused_naming_file_and_field(tmp_path, change, file, words):
    ensemble = build_ensemble("topk", D_MODEL, N_LATENTS, MEMBERS["topk"])
    folder = tmp_path / "sae"
    write(folder, hostile(member_files(ensemble, 0, torch.zeros(N_LATENTS), {"model_name": "toy"}), change))
    with pytest.raises(InputError) as raised:
        load_dictionary(str(folder))
    message = str(raised.value)
    assert message.startswith(f"{folder}/{file}") and all(word in message for word in words), message


def test_untouched_folder_loads(tmp_path):
    """The hostile cases above start from a folder that loads: what fails is the one change."""
    ensemble = build_ensemble("topk", D_MODEL, N_LATENTS, MEMBERS["topk"])
    write(tmp_path / "sae", member_files(ensemble, 0, torch.zeros(N_LATENTS), {"model_name": "toy"}))
    loaded = load_dictionary(str(tmp_path / "sae"))
    assert loaded.k == 3 and loaded.W_enc.shape == (D_MODEL, N_LATENTS)
    write(
        tmp_path / "false", hostile(member_files(ensemble, 0, torch.zeros(N_LATENTS), {}), "apply_b_dec_to_input=false")
    )
    x = torch.randn(5, D_MODEL)
    unshifted = load_dictionary(str(tmp_path / "false"))  # a real false is honoured
    torch.testing.assert_close(unshifted.encode(x), loaded.encode(x + loaded.b_dec))
