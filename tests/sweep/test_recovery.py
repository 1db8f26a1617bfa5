"""`dictsweep bench recovery`: the defaults trained on a synthetic shape, scored against its ground truth."""

import json

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_recovery_scores_every_sae_and_picks_the_best_at_or_above_the_feature_count(run_cli):
    code, out = run_cli(
        "bench", "recovery", "--d-model", "16", "--n-features", "16", "--decay", "1", "--active", "2",
        "--sizes", "0.5", "--sizes", "1", "--architecture", "relu", "--architecture", "topk",
        "--tokens", "65536", "--json",
    )  # fmt: skip
    assert code == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["batch_rows"] == 256  # the default batch for this budget
    assert result["rarest_feature_fires"] == pytest.approx(65536 * 2 / 16)  # decay 1: every feature alike
    assert result["features_under_100_fires"] == 0
    for architecture, sparsity in (("relu", ("l0_2", "l0_4")), ("topk", ("k2", "k4"))):
        scores = {
            key.split("/")[1]: value
            for key, value in result.items()
            if key.startswith(f"mmcs_ground_truth/{architecture}-")
        }
        assert len(scores) == 4, scores  # two sizes x two sparsities
        assert all(any(part in name for part in sparsity) for name in scores)
        at_or_above = {name: value for name, value in scores.items() if "-n16-" in name}
        assert all(0 <= value <= 1 for value in scores.values())
        assert result[f"{architecture}/best"] in at_or_above  # 8 latents for 16 features never count as the best
        assert result[f"{architecture}/best_mmcs_ground_truth"] == max(at_or_above.values())
        assert result[f"{architecture}/best_mmcs_ground_truth"] > 0.9  # 16 equally frequent features in 16 dims: easy
        # decay 1: every feature fires 8,192 times, one band holding them all, scored as the whole
        assert result[f"{architecture}/features_fires_1000_10000"] == 16
        assert result[f"{architecture}/best_mmcs_fires_1000_10000"] == result[f"{architecture}/best_mmcs_ground_truth"]
        assert not [
            key for key in result if key.startswith(f"{architecture}/features_fires_") and "1000_10000" not in key
        ]


def test_recovery_by_fires_splits_the_features_by_decade_of_expected_fires():
    import numpy as np

    from dictsweep.sweep.recovery import by_fires

    fires = np.array([3.0, 9.9, 10.0, 99.0, 5_000.0, 10_000.0, 250_000.0])
    cosines = np.array([0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 1.0])
    result = by_fires("relu", cosines, fires)
    assert result == {
        "relu/features_fires_under_10": 2,
        "relu/best_mmcs_fires_under_10": pytest.approx(0.2),
        "relu/features_fires_10_100": 2,
        "relu/best_mmcs_fires_10_100": pytest.approx(0.6),
        "relu/features_fires_1000_10000": 1,  # no feature fires 100-1,000 times: no band for it
        "relu/best_mmcs_fires_1000_10000": pytest.approx(0.9),
        "relu/features_fires_10000_up": 2,
        "relu/best_mmcs_fires_10000_up": pytest.approx(0.975),
    }


@pytest.mark.parametrize(
    "args, named",
    [
        (("--architecture", "nope"), "--architecture"),
        (("--sizes", "0"), "--sizes"),
        (("--sparsity", "-1"), "--sparsity"),
        (("--active", "40", "--n-features", "8"), "--active"),
    ],
)
def test_bench_recovery_names_a_wrong_option(run_cli, args, named):
    code, out = run_cli("bench", "recovery", "--tokens", "1024", *args)
    assert code == 2
    assert named in out


def test_bench_recovery_scores_transcoders_against_the_target_features(run_cli):
    """A synthetic transcoder dataset (--d-target): each transcoder maps the rows to their targets and
    is scored against the target features, beside SAEs of the same rows scored against the input's."""
    code, out = run_cli(
        "bench", "recovery", "--d-model", "16", "--d-target", "12", "--n-features", "16", "--decay", "1",
        "--active", "2", "--sizes", "2", "--sparsity", "2", "--tokens", "20000",
        "--architecture", "relu_transcoder", "--architecture", "matryoshka_batchtopk_transcoder",
        "--architecture", "matryoshka_batchtopk", "--json",
    )  # fmt: skip
    assert code == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["d_target"] == 12
    assert result["relu_transcoder/best"] == "relu_transcoder-n32-l0_2-lr0.01-s0"  # an L0 target, as relu's
    # 12-wide decoder rows against the 12-wide target features: at 16 features, 20k tokens, near exact
    assert result["relu_transcoder/best_mmcs_ground_truth"] > 0.97
    assert result["matryoshka_batchtopk_transcoder/best_mmcs_ground_truth"] > 0.6
    assert result["matryoshka_batchtopk/best"] == "matryoshka_batchtopk-n32-k2-m0.0625_0.25-lr0.01-s0"
    assert result["matryoshka_batchtopk/best_mmcs_ground_truth"] > 0.6
    code, out = run_cli("bench", "recovery", "--tokens", "1024", "--architecture", "relu_transcoder")
    assert code == 2 and "--d-target" in out
