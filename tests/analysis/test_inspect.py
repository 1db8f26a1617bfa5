"""`dictsweep inspect` on a MiniLM harvest and on synthetic data: every number in the data file
equals the same statistic computed directly from all rows at once."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dictsweep import load_dictionary
from dictsweep.analysis import feature_matches, top_contexts
from dictsweep.store.dataset import ActivationDataset
from dictsweep.store.harvest import read_contexts
from tests.analysis.conftest import data_dictionary

TOP = 5


def all_rows(uri: str) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Every train row [rows, d_model] (float32) and its columns, in manifest order."""
    data = ActivationDataset.open(uri)
    parts = [data.read_shard(index, columns=True) for index in range(len(data.shards()))]
    columns = {name: np.concatenate([part[1][name] for part in parts]) for name in parts[0][1]}
    return torch.cat([part[0] for part in parts]).float(), columns


@pytest.fixture(scope="module")
def inspected(minilm_harvest, tmp_path_factory, run_cli_module):
    """Two dictionary sizes (48 and 96 latents) in a folder with index.json, inspected by the CLI."""
    uri, _ = minilm_harvest
    tmp = tmp_path_factory.mktemp("inspect")
    data_dictionary(tmp / "dicts" / "n48", uri, 48, seed=0)
    data_dictionary(tmp / "dicts" / "n96", uri, 96, seed=1, architecture="topk", k=12)
    (tmp / "dicts" / "index.json").write_text(json.dumps([{"path": "n48"}, {"path": "n96"}]))
    code, output = run_cli_module(
        "inspect",
        str(tmp / "dicts"),
        "--data",
        uri,
        "--out",
        str(tmp / "out"),
        "--top",
        str(TOP),
        "--quantile-contexts",
        "3",
        "--neighbours",
        "3",
        "--batch-rows",
        "300",
        "--device",
        "cpu",
    )
    assert code == 0, output
    return uri, tmp


def test_statistics_and_contexts_equal_a_direct_computation(inspected):
    uri, tmp = inspected
    rows, columns = all_rows(uri)
    contexts = read_contexts(uri)
    for name in ("n48", "n96"):
        sae = load_dictionary(str(tmp / "dicts" / name))
        acts = sae.encode(rows)  # [rows, n_latents]: fine for a test's few thousand rows
        table = pq.read_table(tmp / "out" / name / "latents.parquet")
        meta = json.loads(table.schema.metadata[b"dictsweep.inspect"])
        assert meta["rows"] == len(rows) and meta["notes"] == []
        records = table.to_pylist()
        assert [r["latent"] for r in records] == list(range(acts.shape[1]))
        fired = (acts > 0).sum(0)
        assert [r["fire_count"] for r in records] == fired.tolist()
        assert np.allclose([r["frequency"] for r in records], (fired / len(rows)).numpy())
        assert np.allclose([r["max_act"] for r in records], acts.max(0).values.numpy())
        assert np.allclose([r["mean_act"] for r in records], (acts.sum(0) / fired.clamp(min=1)).numpy(), rtol=1e-4)
        assert [sum(r["hist"]) for r in records] == fired.tolist()
        top_values = acts.topk(TOP, dim=0).values.t()  # [n_latents, TOP]
        where = {(int(s), int(p)): i for i, (s, p) in enumerate(zip(columns["seq"], columns["pos"]))}
        for record in records:
            latent, expected = record["latent"], top_values[record["latent"]]
            assert np.allclose(record["top_acts"], expected[expected > 0].numpy())
            tops = [c for c in record["contexts"] if c["kind"] == "top"]
            assert len(tops) == len(record["top_acts"])
            lower = [c for c in record["contexts"] if c["kind"] != "top"]
            assert 1 <= len(lower) <= 3 if record["fire_count"] > TOP else True
            for context in record["contexts"]:
                row = where[(context["seq"], context["pos"])]
                assert context["act"] == pytest.approx(acts[row, latent].item(), rel=1e-5)
                assert context["token_ids"][context["center"]] == contexts[context["seq"]][context["pos"]]
                # the window's activations come from running the model again on the context
                assert context["token_acts"][context["center"]] == pytest.approx(context["act"], rel=1e-3, abs=1e-3)
            for kept, value in zip(tops, record["top_acts"]):
                assert kept["act"] == pytest.approx(value)


def test_neighbours_matches_and_token_effects(inspected, minilm_harvest):
    uri, tmp = inspected
    _, model_path = minilm_harvest
    small, large = (load_dictionary(str(tmp / "dicts" / name)) for name in ("n48", "n96"))
    records = pq.read_table(tmp / "out" / "n48" / "latents.parquet").to_pylist()
    unit = torch.nn.functional.normalize(small.W_dec, dim=-1)
    cosines = unit @ unit.t()
    cosines.fill_diagonal_(-2)
    matches = feature_matches(small, large, 3)
    direct = unit @ torch.nn.functional.normalize(large.W_dec, dim=-1).t()  # [48, 96]
    from transformers import AutoModel

    embedding = AutoModel.from_pretrained(model_path, local_files_only=True).get_input_embeddings().weight
    logits = unit @ embedding.detach().t()  # [48, vocab]
    for record in records:
        latent = record["latent"]
        assert [n["latent"] for n in record["neighbours"]] == cosines[latent].topk(3).indices.tolist()
        assert [m["latent"] for m in record["matches"]] == direct[latent].topk(3).indices.tolist()
        assert {m["dictionary"] for m in record["matches"]} == {"n96"}
        assert matches.indices[latent].tolist() == direct[latent].topk(3).indices.tolist()
        assert [t["token_id"] for t in record["promoted"]] == logits[latent].topk(10).indices.tolist()
        assert [t["token_id"] for t in record["suppressed"]] == logits[latent].topk(10, largest=False).indices.tolist()


def test_a_latent_found_by_inspect_fires_on_the_contexts_top_contexts_returns(inspected):
    uri, tmp = inspected
    records = pq.read_table(tmp / "out" / "n96" / "latents.parquet").to_pylist()
    chosen = max(records, key=lambda record: record["max_act"])  # the strongest latent of the browser
    found = top_contexts(str(tmp / "dicts" / "n96"), uri, chosen["latent"], top=TOP, batch_rows=500)
    assert [c.act for c in found] == pytest.approx(chosen["top_acts"])
    tops = [c for c in chosen["contexts"] if c["kind"] == "top"]
    assert [(c.seq, c.pos) for c in found] == [(c["seq"], c["pos"]) for c in tops]
    for context in found:
        assert context.act > 0 and context.token_acts[context.center] > 0  # it fires there, in the model too
        assert (
            context.tokens[context.center] == tops[found.index(context)]["tokens"][tops[found.index(context)]["center"]]
        )


def test_synthetic_data_gets_every_statistic_but_contexts(synthetic, tmp_path, run_cli):
    folder = data_dictionary(tmp_path / "synthetic-sae", synthetic, 40)
    code, output = run_cli(
        "inspect", str(folder), "--data", synthetic, "--out", str(tmp_path / "out"), "--top", "4", "--device", "cpu"
    )
    assert code == 0, output
    assert "no contexts/" in output
    table = pq.read_table(tmp_path / "out" / "synthetic-sae" / "latents.parquet")
    assert "no contexts/" in json.loads(table.schema.metadata[b"dictsweep.inspect"])["notes"][0]
    rows, _ = all_rows(synthetic)
    acts = load_dictionary(str(folder)).encode(rows)
    records = table.to_pylist()
    assert [r["fire_count"] for r in records] == (acts > 0).sum(0).tolist()
    assert all(r["contexts"] == [] and r["promoted"] == [] for r in records)
    assert np.allclose(
        [r["top_acts"][0] for r in records if r["fire_count"]], acts.max(0).values[acts.max(0).values > 0]
    )
    assert all(len(r["neighbours"]) == 8 for r in records)
    assert (tmp_path / "out" / "synthetic-sae" / "index.html").exists()


def test_a_dictionary_of_another_width_exits_2_naming_both(minilm_harvest, synthetic, tmp_path, run_cli):
    uri, _ = minilm_harvest
    folder = data_dictionary(tmp_path / "minilm-sae", uri, 16)
    code, output = run_cli("inspect", str(folder), "--data", synthetic, "--out", str(tmp_path / "out"))
    assert code == 2
    assert "d_in=384" in output and "d_model=32" in output and str(folder) in output and synthetic in output
    assert not (tmp_path / "out").exists()
