import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dictsweep.errors import InputError
from dictsweep.store.dataset import ActivationDataset
from dictsweep.store.synth import SynthConfig, build_model, firing_probabilities, sample_rows, synth_dataset


def _sample(config: SynthConfig, rows: int, stream: int = 1):
    return sample_rows(build_model(config), config, rows, np.random.default_rng([config.seed, stream]))


def test_firing_probabilities_sum_to_active_and_decay():
    probabilities = firing_probabilities(SynthConfig(n_features=512, active=5.0, decay=0.99))
    assert probabilities.sum() == pytest.approx(5.0, abs=1e-9)
    assert probabilities[1] / probabilities[0] == pytest.approx(0.99)
    clipped = firing_probabilities(SynthConfig(n_features=6, active=4.0, decay=0.5))
    assert clipped.sum() == pytest.approx(4.0, abs=1e-9)
    assert clipped[0] == clipped[1] == clipped[2] == 1.0 and 0 < clipped[3] < 1


def test_ground_truth_rows_are_unit_and_seeded():
    features = build_model(SynthConfig(d_model=16, n_features=40, seed=3)).features  # [40, 16]
    assert features.shape == (40, 16) and features.dtype == torch.float32
    torch.testing.assert_close(features.norm(dim=1), torch.ones(40))
    assert torch.equal(features, build_model(SynthConfig(d_model=16, n_features=40, seed=3)).features)
    assert not torch.equal(features, build_model(SynthConfig(d_model=16, n_features=40, seed=4)).features)


def test_rows_are_coefficients_times_features():
    config = SynthConfig(d_model=8, n_features=30, active=3.0, decay=0.9)
    acts, coefficients = _sample(config, 50)
    dense = coefficients.to_dense()  # [50, 30]
    torch.testing.assert_close(acts, dense @ build_model(config).features)
    assert dense.min() >= 0 and dense.max() < 1


def test_mean_active_count_and_per_feature_rates():
    config = SynthConfig(d_model=8, n_features=64, active=5.0, decay=0.95)
    fires = _sample(config, 40_000)[1].to_dense() > 0  # [40000, 64]
    assert fires.sum(1).float().mean().item() == pytest.approx(5.0, abs=0.05)
    rates = fires.float().mean(0).numpy()
    np.testing.assert_allclose(rates[:8], firing_probabilities(config)[:8], atol=0.01)


def test_correlated_firing_keeps_the_rates_and_correlates_features():
    base = dict(d_model=8, n_features=32, active=4.0, decay=0.95)
    correlated = _sample(SynthConfig(**base, correlation=0.9), 20_000)[1].to_dense() > 0
    independent = _sample(SynthConfig(**base), 20_000)[1].to_dense() > 0
    assert correlated.sum(1).float().mean().item() == pytest.approx(4.0, abs=0.08)

    def max_off_diagonal_correlation(fires):
        matrix = np.corrcoef(fires[:, :16].numpy().T)
        return np.abs(matrix - np.eye(16)).max()

    assert max_off_diagonal_correlation(independent) < 0.05
    assert max_off_diagonal_correlation(correlated) > 0.2


def test_noise_has_the_configured_std():
    config = SynthConfig(d_model=16, n_features=20, active=2.0, noise=0.5)
    acts, coefficients = _sample(config, 5000)
    residual = acts - coefficients.to_dense() @ build_model(config).features
    assert residual.std().item() == pytest.approx(0.5, rel=0.02)


def test_synth_dataset_writes_a_dataset_with_ground_truth(tmp_path):
    config = SynthConfig(d_model=8, n_features=24, active=3.0, rows=1000, eval_rows=300, shard_rows=256, seed=7)
    manifest = synth_dataset(str(tmp_path / "a"), config)
    dataset = ActivationDataset.open(str(tmp_path / "a"))
    assert manifest.n_rows == dataset.n_rows == 1000 and dataset.n_eval_rows == 300
    assert [s.rows for s in dataset.shards()] == [256, 256, 256, 232]
    assert {"model", "hook", "dataset", "created"} <= set(dataset.manifest.source)
    assert dataset.manifest.source["model"] == "synthetic" and "n_features=24" in dataset.manifest.source["dataset"]
    assert torch.equal(dataset.ground_truth(), build_model(config).features)

    train = torch.cat([dataset.read_shard(i) for i in range(4)])  # [1000, 8]
    assert torch.equal(train, _sample(config, 1000, stream=1)[0])
    assert not torch.equal(dataset.read_shard(0, "eval")[:10], train[:10])  # a different stream
    assert dataset.mean_sq_norm() == pytest.approx(float((train.double() ** 2).sum(1).mean()), rel=1e-9)

    # the same seed gives the same data, whatever the shard size; another seed does not
    synth_dataset(str(tmp_path / "b"), config.model_copy(update={"shard_rows": 1000}))
    assert torch.equal(ActivationDataset.open(str(tmp_path / "b")).read_shard(0), train)
    synth_dataset(str(tmp_path / "c"), config.model_copy(update={"seed": 8}))
    assert not torch.equal(ActivationDataset.open(str(tmp_path / "c")).read_shard(0), train[:256])


def test_synth_bfloat16(tmp_path):
    config = SynthConfig(d_model=8, n_features=16, rows=100, eval_rows=0, dtype="bfloat16", correlation=0.5)
    synth_dataset(str(tmp_path), config)
    dataset = ActivationDataset.open(str(tmp_path))
    assert dataset.read_shard(0).dtype == torch.bfloat16 and dataset.shards("eval") == []


def test_config_errors_name_the_option():
    with pytest.raises(InputError, match=r"--d-model: Input should be greater than 0 \(got 0\)"):
        SynthConfig.from_cli(d_model=0)
    with pytest.raises(InputError, match="--active: 20.0 active features on average needs n_features >= 20.0, got 10"):
        SynthConfig.from_cli(n_features=10, active=20.0)
    with pytest.raises(InputError, match="--dtype: Input should be 'float16', 'bfloat16' or 'float32'"):
        SynthConfig.from_cli(dtype="int8")


def test_cli_synth(tmp_path, run_cli):
    out = str(tmp_path / "ds")
    args = [
        "synth",
        "--out",
        out,
        "--d-model",
        "8",
        "--n-features",
        "16",
        "--active",
        "2",
        "--rows",
        "300",
        "--eval-rows",
        "50",
        "--shard-rows",
        "128",
        "--seed",
        "1",
    ]
    code, printed = run_cli(*args)
    assert code == 0 and f"wrote 300 train + 50 eval rows (3 + 1 shards, d_model=8, float32) to {out}" in printed
    assert "writing 300 + 50 synthetic rows to /" in printed  # the step shown while it runs
    assert ActivationDataset.open(out).n_rows == 300
    code, printed = run_cli(*args)
    assert code == 2 and "already holds a dataset" in printed
    code, printed = run_cli(*args, "--overwrite", "--rows", "10")
    assert code == 0 and ActivationDataset.open(out).n_rows == 10
    code, printed = run_cli("synth", "--out", out, "--decay", "1.5")
    assert code == 2 and "--decay: Input should be less than or equal to 1" in printed


def test_cli_entry_point_exits_2_on_a_bad_value(tmp_path):
    executable = Path(sys.executable).parent / "dictsweep"
    result = subprocess.run(
        [str(executable), "synth", "--out", str(tmp_path), "--rows", "-5"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "--rows: Input should be greater than 0" in result.stderr
    assert not (tmp_path / "manifest.json").exists()
