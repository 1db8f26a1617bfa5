"""`dictsweep eval` of transcoders on a synthetic transcoder dataset: SAEBench's core metrics are
against each row's target, by the transcoder's whole output (its skip path included), also when the
target has the input's width; sparse probing reads a transcoder's latents, absorption is not measured."""

import json

import numpy as np
import pytest
import torch

from dictsweep import load_dictionary
from dictsweep.analysis.config import EvalConfig
from dictsweep.analysis.evaluation import ProbingData, probe_dictionary
from dictsweep.analysis.probing import Task
from dictsweep.sae.export import dictionary_files, saelens_config
from dictsweep.store.dataset import ActivationDataset
from dictsweep.store.synth import SynthConfig, synth_dataset
from tests.sae.saebench_schema import CoreEvalOutput


def write_transcoder(folder, architecture: str, d_in: int, d_out: int, n_latents: int, seed: int) -> None:
    """A random transcoder (latents firing on about half the rows) in the exported format; latent 0
    reads the input's first coordinate alone."""
    generator = torch.Generator().manual_seed(seed)
    weights = {
        "W_enc": torch.randn(d_in, n_latents, generator=generator) / d_in**0.5,
        "b_enc": torch.zeros(n_latents),
        "W_dec": torch.randn(n_latents, d_out, generator=generator) / n_latents**0.5,
        "b_dec": torch.randn(d_out, generator=generator) * 0.1,
        "W_skip": torch.randn(d_out, d_in, generator=generator) / d_in**0.5,
    }
    weights["W_enc"][:, 0] = torch.nn.functional.one_hot(torch.tensor(0), d_in)
    config = saelens_config(architecture, d_in, n_latents, {"d_out": d_out, "apply_b_dec_to_input": False}, {})
    folder.mkdir(parents=True)
    for name, data in dictionary_files(config, weights, torch.zeros(n_latents)).items():
        (folder / name).write_bytes(data)


def transcoder_data(tmp_path, d_target: int) -> str:
    uri = str(tmp_path / "data")
    config = SynthConfig(d_model=16, d_target=d_target, n_features=40, rows=600, eval_rows=300, shard_rows=128, seed=2)
    synth_dataset(uri, config)
    return uri


@pytest.mark.parametrize("d_target", [16, 12])  # 16: a target as wide as the input is not mistaken for it
def test_core_metrics_of_a_transcoder_are_against_its_target(tmp_path, run_cli, d_target):
    uri = transcoder_data(tmp_path, d_target)
    write_transcoder(tmp_path / "dicts" / "skip", "skip_transcoder", 16, d_target, 24, seed=0)
    write_transcoder(tmp_path / "dicts" / "plain", "transcoder", 16, d_target, 32, seed=1)
    (tmp_path / "dicts" / "index.json").write_text(json.dumps([{"path": "skip"}, {"path": "plain"}]))
    code, output = run_cli("eval", str(tmp_path / "dicts"), "--data", uri, "--out", str(tmp_path / "out"))
    assert code == 0, output
    dataset = ActivationDataset.open(uri)
    pairs = [dataset.read_shard(i, "eval", columns=True) for i in range(len(dataset.shards("eval")))]
    x = torch.cat([acts for acts, _ in pairs]).double()
    target = torch.cat([columns["target"] for _, columns in pairs]).double()  # [300, d_target]
    for name in ("skip", "plain"):
        document = CoreEvalOutput.model_validate_json((tmp_path / "out" / name / "saebench_core.json").read_text())
        sae = load_dictionary(str(tmp_path / "dicts" / name)).double()
        with torch.no_grad():
            out, latents = sae(x), sae.encode(x)
        error = (target - out).pow(2).sum(-1)
        metrics = document.eval_result_metrics
        assert metrics.reconstruction_quality.explained_variance == pytest.approx(
            float(1 - error.mean() / (target - target.mean(0)).pow(2).sum(-1).mean()), rel=1e-5
        )
        assert metrics.reconstruction_quality.mse == pytest.approx(float(error.mean()), rel=1e-5)
        assert metrics.shrinkage.l2_norm_in == pytest.approx(float(target.norm(dim=-1).mean()), rel=1e-5)
        assert metrics.sparsity.l0 == pytest.approx(float((latents != 0).sum(-1).double().mean()), rel=1e-6)
        assert metrics.token_stats.total_tokens_eval_sparsity_variance == 300
        assert {d.encoder_decoder_cosine_sim for d in document.eval_result_details} == {-1.0}  # other spaces
        summary = json.loads((tmp_path / "out" / "eval.json").read_text())
        assert summary["metrics"][name]["explained_variance"] == metrics.reconstruction_quality.explained_variance


def test_a_transcoder_of_another_target_width_exits_2_naming_d_out(tmp_path, run_cli):
    uri = transcoder_data(tmp_path, 12)
    write_transcoder(tmp_path / "dicts" / "wide", "transcoder", 16, 16, 8, seed=0)
    code, output = run_cli("eval", str(tmp_path / "dicts" / "wide"), "--data", uri, "--out", str(tmp_path / "out"))
    assert code == 2, output
    assert "d_out=16" in output and "target of width 12" in output


def test_probing_reads_a_transcoders_latents_and_skips_absorption(tmp_path):
    write_transcoder(tmp_path / "tc", "transcoder", 8, 6, 16, seed=3)
    sae = load_dictionary(str(tmp_path / "tc"))
    generator = torch.Generator().manual_seed(4)
    train_x, test_x = torch.randn(60, 8, generator=generator), torch.randn(60, 8, generator=generator)
    labels = [(x[:, 0] > 0).numpy().astype(np.int64) for x in (train_x, test_x)]
    task = Task("sign", np.arange(60), labels[0], np.arange(60), labels[1])
    letters = torch.arange(60) % 26
    words = {"train_x": train_x, "test_x": test_x, "train_letters": letters, "test_letters": letters}
    probes = (torch.randn(26, 8, generator=generator), torch.zeros(26))
    data = ProbingData(train_x, test_x, [task], {"sign": {"llm_test_accuracy": 1.0}}, words, probes, [])
    result = probe_dictionary(sae, data, EvalConfig(target="tc", data="unused", ks=[1]), "cpu")
    assert "transcoder" in result["absorption"]["not_measured"] and result["absorption"]["mean"] == {}
    accuracy = result["sparse_probing"]["sae"]["sae_top_1_test_accuracy"]
    assert accuracy >= 0.85  # latent 0 is relu(x[:, 0]): the input's latents, whatever the decoder writes
