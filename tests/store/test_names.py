"""Portable names in exports: the model's hub id (never a local path) and TransformerLens hook names
for the families that have them."""

import pytest

from dictsweep.store.models import export_names, hub_name, transformer_lens_hook


@pytest.mark.parametrize(
    "hook, family, expected",
    [
        ("transformer.h.3", "gpt2", "blocks.3.hook_resid_post"),
        ("h.11", "gpt2", "blocks.11.hook_resid_post"),
        ("h.2.attn", "gpt2", "blocks.2.hook_attn_out"),
        ("h.2.mlp", "gpt2", "blocks.2.hook_mlp_out"),
        ("h.2.mlp.act", "gpt2", "blocks.2.mlp.hook_post"),
        ("layers.4", "gpt_neox", "blocks.4.hook_resid_post"),
        ("gpt_neox.layers.4.attention", "gpt_neox", "blocks.4.hook_attn_out"),
        ("layers.12.mlp", "gemma2", "blocks.12.hook_mlp_out"),
        ("model.layers.7.self_attn", "llama", "blocks.7.hook_attn_out"),
        ("layers.0.input_layernorm", "llama", "blocks.0.ln1.hook_normalized"),
        ("encoder.layer.3", "bert", None),  # no TransformerLens name for BERT's module paths here
        ("h.3", "bert", None),  # the family decides when it is known
        ("h.3", None, "blocks.3.hook_resid_post"),  # older datasets: the path alone
        ("h.3.attn.c_attn", "gpt2", None),
    ],
)
def test_transformer_lens_names(hook, family, expected):
    assert transformer_lens_hook(hook, family) == expected


def test_model_names_are_portable(tmp_path):
    assert hub_name("EleutherAI/pythia-70m") == "EleutherAI/pythia-70m"
    cached = tmp_path / "hub" / "models--google--gemma-2-2b" / "snapshots" / "0123abc"
    cached.mkdir(parents=True)
    assert hub_name(str(cached)) == "google/gemma-2-2b"
    folder = tmp_path / "my-minilm"
    folder.mkdir()
    assert hub_name(str(folder)) == "my-minilm"
    names = export_names({"model": str(folder), "hook": "encoder.layer.3", "model_type": "bert"})
    assert names == {"model_name": "my-minilm", "hook_name": "encoder.layer.3"}
    given = export_names(
        {
            "model": str(folder),
            "model_name": "sentence-transformers/all-MiniLM-L6-v2",
            "hook": "h.3",
            "model_type": "gpt2",
        }
    )
    assert given["model_name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert given["hook_name_transformer_lens"] == "blocks.3.hook_resid_post"
