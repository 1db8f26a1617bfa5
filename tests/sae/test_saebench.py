"""SAEBench's core metrics: every number equals its definition computed directly over all rows at
once, and the core output reads back through a copy of SAEBench's schema (names, nesting, types)."""

import math

import pytest
import torch

from dictsweep.sae.metrics import max_cosine
from dictsweep.sae.saebench import (
    CATEGORIES,
    CoreSums,
    core_eval_config,
    core_metrics,
    core_output,
    flat_metrics,
    misc_metrics,
    weight_metrics,
    with_splice,
)
from tests.sae.saebench_schema import CoreEvalOutput

D_MODEL, N_LATENTS, ROWS, BATCH = 6, 10, 50, 20


def data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, D_MODEL, generator=generator) + 3.0  # a mean far from 0: variance != E|x|^2
    x[7] = 0.0  # a zero input: l2_ratio divides by 1 there
    W_enc = torch.randn(D_MODEL, N_LATENTS, generator=generator)
    b_enc = torch.randn(N_LATENTS, generator=generator) - 2.0
    W_dec = torch.randn(N_LATENTS, D_MODEL, generator=generator)
    latents = (x @ W_enc + b_enc).relu()  # [ROWS, N_LATENTS]
    latents[:, 9] = 0.0  # a latent that never fires
    x_hat = latents @ W_dec * 0.1 + x.mean(0)
    seqs = torch.arange(ROWS) // 5  # 10 contexts of 5 rows
    return x, x_hat, latents, seqs, (W_enc, W_dec, b_enc)


@pytest.fixture(scope="module")
def measured():
    x, x_hat, latents, seqs, weights = data()
    sums = CoreSums(N_LATENTS, D_MODEL)
    for start in range(0, ROWS, BATCH):
        part = slice(start, start + BATCH)
        sums.add(x[part], x_hat[part], latents[part], seqs[part])
    return sums, (x, x_hat, latents, seqs, weights)


def test_scalars_equal_their_definitions_over_all_rows(measured):
    sums, (x, x_hat, latents, _, _) = measured
    x, x_hat, latents = x.double(), x_hat.double(), latents.double()
    got = sums.scalars()
    error = (x - x_hat).pow(2).sum(-1)
    assert got["explained_variance"] == pytest.approx(1 - error.mean() / (x - x.mean(0)).pow(2).sum(-1).mean())
    assert got["mse"] == pytest.approx(error.mean())  # per token, summed over d_model
    legacy = torch.cat(
        [
            1 - error[s : s + BATCH] / (x[s : s + BATCH] - x[s : s + BATCH].mean(0)).pow(2).sum(-1)
            for s in range(0, ROWS, BATCH)
        ]
    )
    assert got["explained_variance_legacy"] == pytest.approx(legacy.mean())
    norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)
    assert got["l2_norm_in"] == pytest.approx(norm_in.mean())
    assert got["l2_norm_out"] == pytest.approx(norm_out.mean())
    ratio = norm_out / torch.where(norm_in < 1e-4, torch.ones_like(norm_in), norm_in)
    assert got["l2_ratio"] == pytest.approx(ratio.mean())
    assert got["relative_reconstruction_bias"] == pytest.approx(norm_out.pow(2).mean() / (x * x_hat).sum(-1).mean())
    cos = torch.stack(
        [
            torch.dot(a, b) / (a.norm() * b.norm()) if a.norm() > 0 else torch.tensor(0.0).double()
            for a, b in zip(x, x_hat)
        ]
    )
    assert got["cossim"] == pytest.approx(cos.mean())
    assert got["l0"] == pytest.approx((latents != 0).sum(-1).double().mean())
    assert got["l1"] == pytest.approx(latents.sum(-1).mean())


def test_per_latent_density_and_consistent_activation_heuristic(measured):
    sums, (_, _, latents, seqs, _) = measured
    per_latent = sums.per_latent()
    fired = latents > 0
    torch.testing.assert_close(per_latent["feature_density"], fired.double().mean(0))
    for latent in range(N_LATENTS):
        contexts = len(torch.unique(seqs[fired[:, latent]]))
        expected = fired[:, latent].sum().item() / contexts if contexts else -1.0
        assert per_latent["consistent_activation_heuristic"][latent].item() == pytest.approx(expected)
    assert per_latent["consistent_activation_heuristic"][9] == -1.0  # never fired: SAEBench's NaN


def test_weight_metrics_against_brute_force(measured):
    _, (_, _, _, _, (W_enc, W_dec, b_enc)) = measured
    got = weight_metrics(W_enc, W_dec, b_enc)
    for latent in range(N_LATENTS):
        others = [j for j in range(N_LATENTS) if j != latent]
        enc, dec = W_enc[:, latent], W_dec[latent]
        best_enc = max(torch.cosine_similarity(enc, W_enc[:, j], dim=0).item() for j in others)
        best_dec = max(torch.cosine_similarity(dec, W_dec[j], dim=0).item() for j in others)
        assert got["max_encoder_cosine_sim"][latent].item() == pytest.approx(best_enc, abs=1e-6)
        assert got["max_decoder_cosine_sim"][latent].item() == pytest.approx(best_dec, abs=1e-6)
        assert got["encoder_decoder_cosine_sim"][latent].item() == pytest.approx(
            torch.cosine_similarity(enc, dec, dim=0).item(), abs=1e-6
        )
        assert got["encoder_norm"][latent].item() == pytest.approx(enc.norm().item())
    assert max_cosine(torch.ones(1, 3), torch.ones(1, 3), exclude_self=True).tolist() == [-1.0]  # no other latent
    rows = torch.randn(7, 5, generator=torch.Generator().manual_seed(3))
    cosines = torch.nn.functional.cosine_similarity(rows[:, None], rows[None], dim=-1).fill_diagonal_(-2)
    chunked = max_cosine(rows, rows, chunk=3, exclude_self=True)  # the masked diagonal crosses chunks
    assert torch.allclose(chunked, cosines.max(-1).values, atol=1e-6) and (chunked < 0.999).all()


def test_misc_metrics_of_a_known_density():
    density = torch.tensor([0.0, 0.005, 0.02, 0.2, 0.5])
    got = misc_metrics(density, torch.tensor([0.1, 0.3]), torch.tensor([0.2, 0.6]))
    assert got["frac_alive"] == pytest.approx(0.8)
    assert got["freq_over_1_percent"] == pytest.approx(0.6)
    assert got["freq_over_10_percent"] == pytest.approx(0.4)
    assert got["normalized_freq_over_1_percent"] == pytest.approx(0.72 / 0.725)
    assert got["normalized_freq_over_10_percent"] == pytest.approx(0.7 / 0.725)
    assert got["average_max_encoder_cosine_sim"] == pytest.approx(0.2)
    assert got["average_max_decoder_cosine_sim"] == pytest.approx(0.4)


def test_core_output_reads_through_saebench_schema(measured):
    sums, (_, _, _, _, (W_enc, W_dec, b_enc)) = measured
    result = core_metrics(sums, weight_metrics(W_enc, W_dec, b_enc))
    assert result["metrics"]["model_behavior_preservation"]["kl_div_score"] == -1.0  # not spliced yet
    spliced = {"kl_div_score": 0.8, "kl_div_with_sae": 0.1, "kl_div_with_ablation": 0.5, "loss_recovered": 0.8}
    metrics = with_splice(result["metrics"], spliced, tokens=256)
    config = core_eval_config(model_name="m", compute_kl=True, context_size=64)
    document = core_output(
        {"metrics": metrics, "details": result["details"]}, config, {"d_sae": 10}, "sae", "sweep", "t"
    )
    parsed = CoreEvalOutput.model_validate(document)
    assert parsed.eval_result_metrics.model_behavior_preservation.kl_div_score == 0.8
    assert parsed.eval_result_metrics.model_performance_preservation.ce_loss_score == -1.0  # BERT: no CE
    assert parsed.eval_result_metrics.token_stats.total_tokens_eval_reconstruction == 256
    assert parsed.eval_result_metrics.token_stats.total_tokens_eval_sparsity_variance == ROWS
    assert [d.index for d in parsed.eval_result_details] == list(range(N_LATENTS))
    assert parsed.eval_config.context_size == 64 and parsed.sae_lens_id == "sae"
    assert list(document["eval_result_metrics"]) == list(CATEGORIES)  # SAEBench's order
    flat = flat_metrics(metrics)
    assert flat["mse_per_token"] == metrics["reconstruction_quality"]["mse"] and "mse" not in flat
    assert "kl_div_score" not in flat  # the spliced ones are logged by the splice itself
    with pytest.raises(ValueError, match="not CoreEvalConfig fields"):
        core_eval_config(context=64)


def test_undefined_values_are_written_as_minus_one():
    sums = CoreSums(3, 2)
    sums.add(torch.ones(4, 2), torch.zeros(4, 2), torch.zeros(4, 3))  # every row the same: no variance
    scalars = sums.scalars()
    assert scalars["explained_variance"] == -1.0 and not math.isnan(scalars["relative_reconstruction_bias"])
