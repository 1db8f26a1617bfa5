"""Transcoders spliced into MiniLM-L6: the transcoder reads its hook's output and its output replaces the
target hook's. A perfect map recovers all of the loss, a zero map scores as zero ablation of the
target, and the map is fed the hook's rows (not the target's own)."""

import pytest
import torch

from dictsweep.errors import InputError
from dictsweep.sae.export import dictionary_files, saelens_config
from dictsweep.store.dataset import ActivationDataset
from dictsweep.store.harvest.tokens import tokenizer_template
from dictsweep.sweep.splice import Readout, held_out_contexts, splice_eval, splice_losses, splice_source

from tests.sweep.test_splice import CONTEXT, MINILM, harvest_to

LAYER = 3
MLP_IN, MLP_OUT = f"encoder.layer.{LAYER}.attention.output", f"encoder.layer.{LAYER}.output.dense"
NEURONS = f"encoder.layer.{LAYER}.intermediate"  # the MLP's GELU outputs: output.dense is linear in them


def harvest_pair(folder, hook: str, target: str) -> str:
    return harvest_to(folder, MINILM, hook, 3000, target)


@pytest.fixture(scope="module")
def mlp_data(tmp_path_factory):
    """Layer 3's MLP input (the attention block's output) and output (before the residual)."""
    return harvest_pair(tmp_path_factory.mktemp("mlp"), MLP_IN, MLP_OUT)


def transcoder_folder(folder, architecture: str, weights: dict) -> str:
    d_in, d_sae = weights["W_enc"].shape
    config = saelens_config(
        architecture, d_in, d_sae, {"d_out": weights["W_dec"].shape[1], "apply_b_dec_to_input": False}, {}
    )
    folder.mkdir(parents=True)
    for name, data in dictionary_files(config, weights, torch.zeros(d_sae)).items():
        (folder / name).write_bytes(data)
    return str(folder)


def test_splice_reads_the_hook_and_replaces_the_target(mlp_data):
    dataset = ActivationDataset.open(mlp_data)
    source = splice_source(dataset)
    assert (source.hook, source.target_hook) == (MLP_IN, MLP_OUT)
    readout = Readout(MINILM)
    block = readout.model.encoder.layer[LAYER]

    def mlp(rows):  # not through output.dense's module: the splice's hook is on it
        return torch.nn.functional.linear(block.intermediate(rows), block.output.dense.weight, block.output.dense.bias)

    template = tokenizer_template(readout.tokenizer)
    contexts = held_out_contexts(dataset, 256)
    losses = splice_losses(
        readout,
        MLP_IN,
        contexts,
        {
            "mlp": mlp,  # the MLP itself: exact
            "zeros": lambda rows: torch.zeros(len(rows), 384),
            "half": lambda rows: 0.5 * mlp(rows),
        },
        template.special_ids,
        template.pad_id,
        target_hook=MLP_OUT,
    )
    assert losses.clean == 0 and losses.zero > 1e-3  # erasing layer 3's MLP output moves the output (0.0085)
    assert losses.spliced["mlp"] < 1e-6 * losses.zero  # fed MLP_IN's rows: MLP(rows) is the clean output
    assert losses.spliced["zeros"] == pytest.approx(losses.zero, rel=1e-6)
    assert 0 < losses.spliced["half"] < losses.zero
    # an SAE splice at MLP_OUT (its own rows) of the same map is far from clean: the rows differ
    wrong = splice_losses(
        readout,
        MLP_OUT,
        contexts,
        {"mlp": mlp},
        template.special_ids,
        template.pad_id,
    )
    assert wrong.spliced["mlp"] > 0.1 * losses.zero
    with pytest.raises(InputError, match="ran before"):  # a target that runs before the hook
        splice_losses(readout, MLP_OUT, contexts[:1], {"x": lambda rows: rows}, [], 0, target_hook=MLP_IN)


def test_a_perfect_exported_transcoder_recovers_everything_and_a_zero_one_nothing(tmp_path):
    """output.dense is linear in the MLP's neurons: a skip transcoder whose skip path is that layer's
    weight is exact, one with every weight zero outputs zeros."""
    data = harvest_pair(tmp_path, NEURONS, MLP_OUT)
    assert ActivationDataset.open(data).d_model == 1536 and ActivationDataset.open(data).d_target == 384
    dense = Readout(MINILM).model.encoder.layer[LAYER].output.dense
    d_sae = 8
    zeros = {
        "W_enc": torch.zeros(1536, d_sae),
        "b_enc": torch.zeros(d_sae),
        "W_dec": torch.zeros(d_sae, 384),
        "b_dec": torch.zeros(384),
    }
    folders = {
        "perfect": transcoder_folder(
            tmp_path / "perfect",
            "skip_transcoder",
            {**zeros, "W_skip": dense.weight.detach().clone(), "b_dec": dense.bias.detach().clone()},
        ),
        "zero": transcoder_folder(tmp_path / "zero", "transcoder", zeros),
    }
    outcome = splice_eval(data, folders, tokens=256)
    perfect, zero = outcome.metrics["perfect"], outcome.metrics["zero"]
    assert outcome.kind == "kl" and outcome.contexts == 4 and outcome.tokens == 4 * CONTEXT
    assert zero["kl_zero"] > 1e-3
    assert perfect["kl_spliced"] < 1e-5 * zero["kl_zero"]
    assert perfect["loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert zero["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert zero["kl_spliced"] == pytest.approx(zero["kl_zero"], rel=1e-6)
    # an SAE of the hook's rows is spliced at its own hook: zeroing the neurons is not zeroing the MLP's
    # output (output.dense adds its bias)
    sae = tmp_path / "sae"
    sae.mkdir()
    config = saelens_config("standard", 1536, d_sae, {}, {})
    weights = {**zeros, "W_dec": torch.zeros(d_sae, 1536), "b_dec": torch.zeros(1536)}
    for name, content in dictionary_files(config, weights, torch.zeros(d_sae)).items():
        (sae / name).write_bytes(content)
    own = splice_eval(data, {"sae": str(sae)}, tokens=256).metrics["sae"]
    assert own["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert abs(own["kl_zero"] - zero["kl_zero"]) > 1e-3 * zero["kl_zero"]
    with pytest.raises(InputError, match="splice SAEs and transcoders separately"):
        splice_eval(data, {"sae": str(sae), "zero": folders["zero"]}, tokens=64)
    wide = transcoder_folder(tmp_path / "wide", "transcoder", weights)  # writes 1536: not the target's 384
    with pytest.raises(InputError, match="wide: a transcoder of d_in=1536, d_out=1536 cannot be spliced"):
        splice_eval(data, {"wide": wide}, tokens=64)


def test_a_transcoder_sweep_runs_from_harvest_to_inspect(tmp_path, monkeypatch, ray_local, mlp_data):
    """Trained on the MLP pair, selected by loss recovered (spliced at the MLP's output), exported with
    both hooks named, and inspected: a data file and a browser per selected transcoder, whose latents
    read the MLP's input and promote tokens through their decoder rows (the MLP's output space)."""
    import json

    import pyarrow.parquet as pq
    import yaml

    from dictsweep.spec_file import load_spec
    from dictsweep.sweep.run import run_sweep
    from tests.analysis.test_browser import CHROMIUM, SCREENSHOTS, chromium, rendered

    monkeypatch.chdir(tmp_path)
    spec = {
        "name": "minilm-tc",
        "data": {"uri": mlp_data},
        "grid": {"architecture": ["batchtopk_skip_transcoder"], "n_latents": [256], "k": [8, 16], "lr": [0.002]},
        "train": {
            "tokens": 8192,
            "batch_rows": 256,
            "lr_warmup_steps": 4,
            "log_every_tokens": 4096,
            "eval_tokens": 256,
            "kernel": "bmm",
        },
        "stream": {"shuffle_shards": 2},
        "evaluation": {"splice_tokens": 256, "inspect": True, "inspect_tokens": 1000},
        "select": {"metric": "loss_recovered", "max_fvu": 10.0, "max_dead_fraction": 1.0},
        "export": {"registry": False},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = run_sweep(load_spec(str(tmp_path / "spec.yaml")))

    assert len(result.finished) == 2 and not result.failed
    recovered = {name: r.metrics["loss_recovered"] for name, r in result.finished.items()}
    for metrics in (r.metrics for r in result.finished.values()):
        assert metrics["kl_clean"] == 0 and metrics["kl_zero"] > 1e-3  # the MLP's output zeroed, not layer 3's
        assert metrics["loss_recovered"] == pytest.approx(1 - metrics["kl_spliced"] / metrics["kl_zero"])
        assert metrics["loss_recovered"] > 0  # better than no MLP at all
    export = tmp_path / "dictionaries" / "minilm-tc"
    [entry] = json.loads((export / "index.json").read_text())  # per size, the best by loss recovered
    assert recovered[entry["path"]] == max(recovered.values()) == entry["metrics"]["loss_recovered"]
    cfg = json.loads((export / entry["path"] / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_skip_transcoder" and cfg["d_in"] == cfg["d_out"] == 384
    assert (cfg["metadata"]["hook_name"], cfg["metadata"]["hook_name_out"]) == (MLP_IN, MLP_OUT)

    folder = export / "inspect" / entry["path"]
    table = pq.read_table(folder / "latents.parquet")
    meta = json.loads(table.schema.metadata[b"dictsweep.inspect"])
    assert table.num_rows == 256 and meta["rows"] == 1000
    assert (meta["d_in"], meta["d_out"], meta["hook"], meta["target_hook"]) == (384, 384, MLP_IN, MLP_OUT)
    records = table.to_pylist()
    firing = [record for record in records if record["fire_count"] > 0]
    assert firing and all(record["contexts"] for record in firing)
    assert all(len(record["promoted"]) > 0 for record in records)  # decoder rows through the word embeddings
    busiest = max(firing, key=lambda record: record["fire_count"])
    # the window's activation at the row's own token is the one the pass read: the model ran to MLP_IN
    context = busiest["contexts"][0]
    assert context["token_acts"][context["center"]] == pytest.approx(context["act"], rel=1e-4, abs=1e-5)
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: the browser is written, not rendered")
    view, errors = rendered(tmp_path, folder / "index.html", f"#latent={busiest['latent']}")
    assert errors == "" and view["view"] == "latent" and int(view["contexts"]) > 0
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = tmp_path / "inspect-transcoder.png"
    chromium(tmp_path, (folder / "index.html").as_uri() + f"#latent={busiest['latent']}", f"--screenshot={shot}")
    assert shot.stat().st_size > 10_000
    import shutil

    shutil.copy(shot, SCREENSHOTS / shot.name)
