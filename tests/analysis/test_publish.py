"""`dictsweep publish`: a Hugging Face repository that SAELens's from_pretrained loads as it would
from the Hub (read here through a Hugging Face cache holding the published folder, offline), and
Neuronpedia's import layout checked against the columns of Neuronpedia's own database schema."""

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from dictsweep import load_dictionary
from dictsweep.store.dataset import ActivationDataset
from tests.analysis.conftest import data_dictionary

MODEL, HOOK = "sentence-transformers/all-MiniLM-L6-v2", "encoder.layer.3"
NAMES = ("relu-n48-l0_8-lr0.003-s0", "relu-n96-l0_8-lr0.002-s0")


@pytest.fixture(scope="module")
def export(minilm_harvest, tmp_path_factory, run_cli_module):
    """An export folder of two dictionaries with index.json, inspected into `inspect/` as a sweep's is."""
    uri, _ = minilm_harvest
    folder = tmp_path_factory.mktemp("publish") / "toy-sweep"
    metadata = {"model_name": MODEL, "hook_name": HOOK, "dictsweep": {"sweep": "toy-sweep"}}
    index = []
    for seed, (name, n_latents) in enumerate(zip(NAMES, (48, 96))):
        data_dictionary(folder / name, uri, n_latents, seed=seed, metadata=metadata)
        metrics = {"fvu": 0.2 - 0.05 * seed, "l0": 8.1 + seed, "dead_fraction": 0.0, "mse": 0.01}
        index.append({"path": name, "architecture": "relu", "n_latents": n_latents, "target_l0": 8,
                      "selected": seed == 1, "why": "test", "metrics": metrics})  # fmt: skip
    (folder / "index.json").write_text(json.dumps(index))
    code, output = run_cli_module(
        "inspect", str(folder), "--data", uri, "--out", str(folder / "inspect"), "--top", "6", "--device", "cpu"
    )
    assert code == 0, output
    return folder, uri


def test_hf_layout_loads_in_saelens_as_from_the_hub(export, tmp_path, run_cli):
    folder, uri = export
    out = tmp_path / "hub-repo"
    code, output = run_cli("publish", str(folder), "--out", str(out), "--format", "hf", "--repo-id", "me/toy-saes")
    assert code == 0, output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "index.json", *NAMES]
    for name in NAMES:
        assert sorted(p.name for p in (out / name).iterdir()) == [
            "cfg.json",
            "sae_weights.safetensors",
            "sparsity.safetensors",
        ]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: saelens\n") and f"base_model: {MODEL}\n" in card
    assert f'SAE.from_pretrained("me/toy-saes", "{NAMES[0]}")' in card
    assert f"| `{NAMES[1]}` | standard | 96 | L0 target 8 | 9.1 | 0.1500 | 0.000 | yes |" in card
    assert json.loads((out / "index.json").read_text())[1]["path"] == NAMES[1]

    # a Hugging Face cache holding the repository as the Hub would serve it, read offline
    cache = tmp_path / "hf-cache"
    snapshot = cache / "models--me--toy-saes" / "snapshots" / ("0" * 40)
    shutil.copytree(out, snapshot)
    (cache / "models--me--toy-saes" / "refs").mkdir()
    (cache / "models--me--toy-saes" / "refs" / "main").write_text("0" * 40)
    rows = ActivationDataset.open(uri).read_shard(0, "eval").float()[:64]  # [64, d_model]
    torch.save(rows, tmp_path / "rows.pt")
    script = (
        "import sys, torch\n"
        "from sae_lens import SAE\n"
        "rows = torch.load(sys.argv[2])\n"
        "sae = SAE.from_pretrained('me/toy-saes', sys.argv[1])\n"
        "torch.save((sae.encode(rows), sae.decode(sae.encode(rows))), sys.argv[3])\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    for name in NAMES:
        done = subprocess.run(
            [sys.executable, "-c", script, name, str(tmp_path / "rows.pt"), str(tmp_path / "out.pt")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        latents, reconstruction = torch.load(tmp_path / "out.pt")
        ours = load_dictionary(str(folder / name))
        assert latents.shape == (64, 48 if name == NAMES[0] else 96)
        assert torch.allclose(latents, ours.encode(rows), atol=1e-5)
        assert torch.allclose(reconstruction, ours.decode(ours.encode(rows)), atol=1e-5)
        assert (latents > 0).float().mean() > 0.01  # the latents fire: the comparison is not of zeros


# Columns of Neuronpedia's database tables (apps/webapp/prisma/schema.prisma of hijohnnylin/neuronpedia),
# which its import inserts each JSON line into: every key must be a column, and the required columns
# (no default, not optional) must be there with a value of their type.
COLUMNS = {
    "Neuron": {
        "required": {"modelId": str, "layer": str, "index": str},
        "optional": {
            "sourceSetName",
            "creatorId",
            "createdAt",
            "maxActApprox",
            "hasVector",
            "vector",
            "vectorLabel",
            "vectorDefaultSteerStrength",
            "hookName",
            "topkCosSimIndices",
            "topkCosSimValues",
            "neuron_alignment_indices",
            "neuron_alignment_values",
            "neuron_alignment_l1",
            "correlated_neurons_indices",
            "correlated_neurons_pearson",
            "correlated_neurons_l1",
            "correlated_features_indices",
            "correlated_features_pearson",
            "correlated_features_l1",
            "neg_str",
            "neg_values",
            "pos_str",
            "pos_values",
            "frac_nonzero",
            "freq_hist_data_bar_heights",
            "freq_hist_data_bar_values",
            "logits_hist_data_bar_heights",
            "logits_hist_data_bar_values",
            "decoder_weights_dist",
            "umap_cluster",
            "umap_log_feature_sparsity",
            "umap_x",
            "umap_y",
        },
    },  # fmt: skip
    "Activation": {
        "required": {
            "id": str,
            "tokens": list,
            "index": str,
            "layer": str,
            "modelId": str,
            "maxValue": float,
            "maxValueTokenIndex": int,
            "minValue": float,
            "values": list,
            "creatorId": str,
        },
        "optional": {
            "dataSource",
            "dataIndex",
            "dfaValues",
            "dfaTargetIndex",
            "dfaMaxValue",
            "createdAt",
            "lossValues",
            "logitContributions",
            "binMin",
            "binMax",
            "binContains",
            "qualifyingTokenIndex",
        },
    },  # fmt: skip
    "Model": {
        "required": {"id": str, "creatorId": str, "layers": int, "neuronsPerLayer": int, "owner": str},
        "optional": {
            "displayNameShort",
            "displayName",
            "tlensId",
            "dimension",
            "visibility",
            "instruct",
            "inferenceEnabled",
            "createdAt",
            "updatedAt",
            "website",
        },
    },  # fmt: skip
    "SourceSet": {
        "required": {"modelId": str, "name": str, "description": str, "creatorName": str, "creatorId": str},
        "optional": {
            "hasDashboards",
            "allowInferenceSearch",
            "visibility",
            "type",
            "urls",
            "creatorEmail",
            "releaseName",
            "createdAt",
        },
    },  # fmt: skip
    "Source": {
        "required": {"id": str, "modelId": str, "setName": str, "creatorId": str},
        "optional": {
            "hasDashboards",
            "inferenceEnabled",
            "saelensConfig",
            "saelensRelease",
            "saelensSaeId",
            "hfRepoId",
            "hfFolderId",
            "visibility",
            "num_prompts",
            "num_tokens_in_prompt",
            "dataset",
            "notes",
            "createdAt",
        },
    },  # fmt: skip
    "SourceRelease": {
        "required": {"name": str, "description": str, "creatorName": str, "creatorId": str},
        "optional": {
            "visibility",
            "isNewUi",
            "featured",
            "descriptionShort",
            "urls",
            "creatorEmail",
            "creatorNameShort",
            "defaultSourceSetName",
            "defaultSourceId",
            "createdAt",
        },
    },  # fmt: skip
}
FILES = {
    "release.jsonl": "SourceRelease",
    "model.jsonl": "Model",
    "sourceset.jsonl": "SourceSet",
    "source.jsonl": "Source",
}


def rows_of(path: Path, table: str) -> list[dict]:
    """The JSON lines of a file, each checked against the table's columns."""
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    columns = COLUMNS[table]
    for row in rows:
        unknown = set(row) - set(columns["required"]) - columns["optional"]
        assert not unknown, f"{path}: {sorted(unknown)} are not columns of Neuronpedia's {table}"
        for key, kind in columns["required"].items():
            assert isinstance(row.get(key), kind if kind is not float else (int, float)), (
                f"{path}: {key} = {row.get(key)!r}"
            )
    return rows


def test_neuronpedia_layout_from_the_inspect_data(export, tmp_path, run_cli):
    folder, _ = export
    out = tmp_path / "np"
    code, output = run_cli("publish", str(folder), "--out", str(out), "--format", "neuronpedia")
    assert code == 0, output
    assert [p.name for p in out.iterdir()] == ["all-minilm-l6-v2"]  # one folder per model
    sources = sorted(p.name for p in (out / "all-minilm-l6-v2").iterdir())
    assert sources == ["3-toy-sweep-relu-n48-l0-8-lr0-003-s0", "3-toy-sweep-relu-n96-l0-8-lr0-002-s0"]
    with_contexts = 0
    for name, source in zip(NAMES, sources):
        here = out / "all-minilm-l6-v2" / source
        assert sorted(p.name for p in here.iterdir()) == [
            "activations", "explanations", "features", "model.jsonl", "release.jsonl", "source.jsonl", "sourceset.jsonl",
        ]  # fmt: skip
        meta = {file: rows_of(here / file, table) for file, table in FILES.items()}
        assert all(len(rows) == 1 for rows in meta.values())
        (source_row,), (set_row,) = meta["source.jsonl"], meta["sourceset.jsonl"]
        assert source_row["id"] == f"3-{source_row['setName']}" == source and set_row["name"] == source_row["setName"]
        assert meta["model.jsonl"][0]["id"] == set_row["modelId"] == "all-minilm-l6-v2"
        assert meta["model.jsonl"][0]["neuronsPerLayer"] == 384
        assert source_row["saelensConfig"]["d_sae"] == (48 if name == NAMES[0] else 96)

        features = [
            row for path in sorted((here / "features").glob("batch-*.jsonl.gz")) for row in rows_of(path, "Neuron")
        ]
        activations = [r for path in sorted((here / "activations").glob("batch-*.jsonl.gz")) for r in rows_of(path, "Activation")]  # fmt: skip
        records = pq.read_table(folder / "inspect" / name / "latents.parquet").to_pylist()
        assert [row["index"] for row in features] == [str(record["latent"]) for record in records]
        for row, record in zip(features, records):
            assert row["layer"] == source and row["modelId"] == "all-minilm-l6-v2"
            assert row["frac_nonzero"] == pytest.approx(record["frequency"])
            assert row["maxActApprox"] == pytest.approx(record["max_act"], rel=1e-6)
            heights, values = row["freq_hist_data_bar_heights"], row["freq_hist_data_bar_values"]
            assert len(heights) == len(values) and sum(heights) == sum(record["hist"])  # parallel: one bar each
            assert values == sorted(values) and all(v > 0 for v in values)
            assert row["pos_str"] == [item["token"] for item in record["promoted"]]
            assert row["topkCosSimIndices"] == [item["latent"] for item in record["neighbours"]]
        keys = {(row["modelId"], row["layer"], row["index"]) for row in features}
        assert len({row["id"] for row in activations}) == len(activations)
        for row in activations:
            assert (row["modelId"], row["layer"], row["index"]) in keys  # each belongs to a published latent
            assert len(row["tokens"]) == len(row["values"]) and all(isinstance(t, str) for t in row["tokens"])
            assert row["values"][row["maxValueTokenIndex"]] == row["maxValue"] == max(row["values"])
            assert row["minValue"] == min(row["values"])
        busiest = max(records, key=lambda record: record["fire_count"])
        tops = [r for r in activations if r["index"] == str(busiest["latent"]) and r["binMin"] == -1.0]
        assert tops and max(r["maxValue"] for r in tops) == pytest.approx(busiest["top_acts"][0], rel=1e-5)
        with_contexts += len(activations)
    assert with_contexts > 0


def test_publish_refuses_what_it_cannot_do_and_writes_nothing(export, tmp_path, run_cli):
    folder, _ = export
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    code, output = run_cli("publish", str(folder), "--out", str(taken), "--format", "hf")
    assert code == 2 and "not an empty folder" in output and (taken / "mine.txt").read_text() == "keep"
    code, output = run_cli("publish", str(tmp_path / "nothing"), "--out", str(tmp_path / "a"), "--format", "hf")
    assert code == 2 and "dictsweep pull" in output
    code, output = run_cli(
        "publish", str(folder), "--out", str(tmp_path / "b"), "--format", "neuronpedia", "--inspect", str(tmp_path)
    )
    assert code == 2 and f"no inspect data for {NAMES[0]}" in output
    code, output = run_cli("publish", str(folder), "--out", str(tmp_path / "c"), "--format", "zip")
    assert code == 2 and "hf or neuronpedia" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # nothing half written, no scratch left


def test_neuronpedia_refuses_a_model_id_that_is_a_path(export, tmp_path, run_cli):
    folder, _ = export
    around = sorted(tmp_path.parent.iterdir())
    for model_id in ("../..", str(tmp_path / "elsewhere"), "a/b", ""):
        out = tmp_path / "np"
        code, output = run_cli("publish", str(folder), "--out", str(out), "--format", "neuronpedia", "--model-id", model_id)  # fmt: skip
        assert code == 2 and f"--model-id: the name {model_id!r} is not a safe folder name" in output, output
    assert list(tmp_path.iterdir()) == [] and sorted(tmp_path.parent.iterdir()) == around  # nothing written anywhere


def broken_parquet(path: Path, how: str) -> None:
    """Rewrite an inspect data file as an untrusted one might come: a field null, retyped or gone."""
    import pyarrow as pa

    table = pq.read_table(path)
    records = table.to_pylist()
    if how == "latent":
        records[1]["latent"] = None
        table = pa.Table.from_pylist(records, schema=table.schema)
    elif how == "neighbours.latent":
        records[0]["neighbours"] = [{"latent": None, "cosine": 0.5}]
        table = pa.Table.from_pylist(records, schema=table.schema)
    elif how == "contexts.center":
        records[2]["contexts"] = [{**records[2]["contexts"][0], "center": None}]
        table = pa.Table.from_pylist(records, schema=table.schema)
    elif how == "neighbours":
        table = table.set_column(table.schema.get_field_index("neighbours"), "neighbours", pa.array(["x"] * len(table)))
    elif how == "dictsweep.inspect":
        table = table.replace_schema_metadata({})
    elif how == "dictsweep.inspect.hist_edges":
        meta = json.loads(table.schema.metadata[b"dictsweep.inspect"])
        table = table.replace_schema_metadata({"dictsweep.inspect": json.dumps({**meta, "hist_edges": [1.0, "2"]})})
    if how == "not parquet":
        path.write_bytes(b"PAR1 but no more")
    else:
        pq.write_table(table, path)


@pytest.mark.parametrize(
    "how, said",
    [
        ("latent", "field 'latent' holds an empty value (null)"),
        ("neighbours.latent", "field 'neighbours.latent' holds an empty value (null)"),
        ("contexts.center", "field 'contexts.center' holds an empty value (null)"),
        ("neighbours", "field 'neighbours' should be list<item: struct<latent: int32, cosine: float>> (found string)"),
        ("dictsweep.inspect", "field 'dictsweep.inspect' of its metadata is missing or not JSON"),
        ("dictsweep.inspect.hist_edges", "field 'dictsweep.inspect.hist_edges' should be 65 rising positive numbers"),
        ("not parquet", "not a readable Parquet data file"),
    ],
)
def test_neuronpedia_names_the_file_and_field_of_a_broken_inspect_file(export, tmp_path, run_cli, how, said):
    from dictsweep.analysis.stats import HIST_BINS

    folder, _ = export
    inspected = tmp_path / "inspect"
    shutil.copytree(folder / "inspect", inspected)
    broken = inspected / NAMES[1] / "latents.parquet"
    broken_parquet(broken, how)
    out = tmp_path / "np"
    code, output = run_cli("publish", str(folder), "--out", str(out), "--format", "neuronpedia", "--inspect", str(inspected))  # fmt: skip
    assert code == 2, output
    assert f"{broken}: {said.replace('65', str(HIST_BINS + 1))}" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inspect"]  # no --out, no scratch left


def test_publish_names_a_cfg_json_whose_dictsweep_metadata_is_no_object(export, tmp_path, run_cli):
    folder, _ = export
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    cfg = copy / NAMES[0] / "cfg.json"
    config = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**config, "metadata": {**config["metadata"], "dictsweep": "toy-sweep"}}))
    for form in ("hf", "neuronpedia"):
        code, output = run_cli("publish", str(copy), "--out", str(tmp_path / form), "--format", form)
        assert code == 2, output
        assert (
            f"{copy / NAMES[0]}/cfg.json: field 'metadata.dictsweep' should be a JSON object (got 'toy-sweep')"
            in output
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
