"""`dictsweep eval` on a MiniLM harvest: SAEBench's core JSON per dictionary (read through a copy of
its schema) whose numbers equal a direct computation over every eval row, KL scores from the spliced
model, and sparse probing whose dense ceiling beats a random SAE's latents."""

import json

import pytest
import torch

from dictsweep import load_dictionary
from dictsweep.store.dataset import ActivationDataset
from tests.analysis.conftest import data_dictionary
from tests.sae.saebench_schema import CoreEvalOutput


@pytest.fixture(scope="module")
def evaluated(minilm_harvest, tmp_path_factory, run_cli_module):
    uri, _ = minilm_harvest
    tmp = tmp_path_factory.mktemp("eval")
    data_dictionary(tmp / "dicts" / "n48", uri, 48, seed=0)
    data_dictionary(tmp / "dicts" / "n96", uri, 96, seed=1, architecture="topk", k=12)
    (tmp / "dicts" / "index.json").write_text(json.dumps([{"path": "n48"}, {"path": "n96"}]))
    args = ["eval", str(tmp / "dicts"), "--data", uri, "--out", str(tmp / "out"), "--device", "cpu"]
    code, output = run_cli_module(*args, "--splice-tokens", "256", "--min-letters", "2", "--k", "1", "--k", "2")
    assert code == 0, output
    return uri, tmp, output


def test_core_json_reads_through_saebench_schema_and_equals_a_direct_computation(evaluated):
    uri, tmp, output = evaluated
    dataset = ActivationDataset.open(uri)
    x = torch.cat([dataset.read_shard(i, "eval").float() for i in range(len(dataset.shards("eval")))]).double()
    for name in ("n48", "n96"):
        document = CoreEvalOutput.model_validate_json((tmp / "out" / name / "saebench_core.json").read_text())
        sae = load_dictionary(str(tmp / "dicts" / name)).double()
        with torch.no_grad():
            latents = sae.encode(x)
            x_hat = sae.decode(latents)
        metrics = document.eval_result_metrics
        error = (x - x_hat).pow(2).sum(-1)
        assert metrics.reconstruction_quality.explained_variance == pytest.approx(
            float(1 - error.mean() / (x - x.mean(0)).pow(2).sum(-1).mean()), rel=1e-5
        )
        assert metrics.reconstruction_quality.mse == pytest.approx(float(error.mean()), rel=1e-5)
        assert metrics.sparsity.l0 == pytest.approx(float((latents != 0).sum(-1).double().mean()), rel=1e-6)
        assert metrics.shrinkage.l2_ratio == pytest.approx(
            float((x_hat.norm(dim=-1) / x.norm(dim=-1)).mean()), rel=1e-5
        )
        density = [d.feature_density for d in document.eval_result_details]
        assert density == pytest.approx((latents > 0).double().mean(0).tolist(), abs=1e-9)
        assert metrics.misc_metrics.frac_alive == pytest.approx(float(((latents > 0).any(0)).double().mean()))
        assert metrics.token_stats.total_tokens_eval_sparsity_variance == len(x)
        # MiniLM has no LM head: KL of the tied readout, no CE (-1, as SAEBench writes what it could not measure)
        assert 0 < metrics.model_behavior_preservation.kl_div_score < 1
        assert metrics.model_performance_preservation.ce_loss_score == -1
        assert document.eval_config.compute_kl and not document.eval_config.compute_ce_loss
        assert document.sae_cfg_dict["d_sae"] == sae.W_dec.shape[0] and document.sae_lens_id == name
    assert "n48" in output and "expl_var" in output


def test_probing_results_and_summary(evaluated):
    _, tmp, _ = evaluated
    summary = json.loads((tmp / "out" / "eval.json").read_text())
    assert set(summary["metrics"]) == {"n48", "n96"}
    probing = json.loads((tmp / "out" / "n48" / "probing.json").read_text())
    tasks = {row["dataset_name"]: row for row in probing["sparse_probing"]["details"]}
    assert "word_start" in tasks and "punctuation" in tasks
    assert any("capitalised left out" in note for note in summary["notes"])  # MiniLM is uncased
    for row in tasks.values():  # the dense probe on 384 dimensions is the ceiling of a 1-latent probe
        assert row["llm_test_accuracy"] >= 0.8 and row["llm_test_accuracy"] >= row["sae_top_1_test_accuracy"] - 0.05
        assert 0.3 <= row["sae_top_1_test_accuracy"] <= 1.0 and "sae_top_2_test_accuracy" in row
    flat = summary["metrics"]["n48"]
    assert flat["llm_test_accuracy"] == pytest.approx(sum(r["llm_test_accuracy"] for r in tasks.values()) / len(tasks))
    assert flat["sae_top_1_test_accuracy"] == probing["sparse_probing"]["sae"]["sae_top_1_test_accuracy"]
    absorption = probing["absorption"]
    assert absorption["not_measured"] is None, absorption["not_measured"]  # --min-letters 2: MiniLM has a few
    letters = absorption["details"]
    assert len(letters) >= 2 and all(row["num_probe_true_positives"] > 0 for row in letters)
    assert flat["mean_absorption_fraction_score"] == pytest.approx(
        sum(row["mean_absorption_fraction"] for row in letters) / len(letters)
    )
    assert all(0 <= row["mean_absorption_fraction"] <= 1 and row["num_split_features"] >= 1 for row in letters)


@pytest.mark.parametrize("k", ["0", "-1"])
def test_a_k_below_one_is_refused_by_its_flag(k, tmp_path, run_cli):
    code, output = run_cli("eval", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--k", k)
    assert code == 2 and f"--k: Input should be greater than 0 (got {k})" in output and "--ks" not in output
    assert list(tmp_path.iterdir()) == []


def test_a_manifest_context_that_is_no_number_is_refused_before_any_work(synthetic, tmp_path, run_cli):
    import shutil

    data = tmp_path / "ds"
    shutil.copytree(synthetic, data)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "source": {"context": "long"}}))
    data_dictionary(tmp_path / "dict", str(data), 16)
    code, output = run_cli("eval", str(tmp_path / "dict"), "--data", str(data), "--out", str(tmp_path / "out"))
    assert code == 2, output
    assert f"{data}/manifest.json: field 'source.context' should be a whole number of tokens (got 'long')" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dict", "ds"]  # no --out written
