"""`bench train` of transcoders: batches carry each row's target (`--d-target`), the ensemble and the
one-at-a-time reference train the same transcoders; a transcoder without a target width is refused,
and `bench sweep --compare` times a transcoder sweep's ensembles at their target width."""

import subprocess
import sys

import pytest

from dictsweep.config import TrainConfig
from dictsweep.errors import InputError
from dictsweep.sae import Member
from dictsweep.sae.ensemble import build_ensemble
from dictsweep.sweep.throughput import bench_train_equivalent
from dictsweep.train.bench import bench_train
from dictsweep.train.device import DeviceLoop, EnsembleSpec


@pytest.mark.parametrize("architecture", ["relu_skip_transcoder", "batchtopk_transcoder"])
def test_bench_train_of_a_transcoder_trains_it_on_its_targets(architecture):
    result = bench_train(16, 64, 128, 3, steps=2, architecture=architecture, kernels=("bmm",), rounds=1, d_target=12)
    assert (result["architecture"], result["d_model"], result["d_target"]) == (architecture, 16, 12)
    assert result["max_abs_weight_diff_vs_reference"] < 1e-5
    # encoder matmuls at d_model, decoder ones at d_target: 2 x 128 x 64 x 3 x (2 x 16 + 3 x 12) flops a step
    flops_per_step = 2 * 128 * 64 * 3 * (2 * 16 + 3 * 12)
    samples = 3 * 128
    assert result["achieved_gflops"] == pytest.approx(flops_per_step * result["sae_samples_per_s"] / samples / 1e9)


@pytest.mark.parametrize(
    "architecture,d_target,words",
    [("relu_transcoder", 0, "needs its target's width"), ("relu", 8, "only a transcoder architecture")],
)
def test_bench_train_without_a_fitting_target_width_exits_2(architecture, d_target, words):
    command = ["bench", "train", "--architecture", architecture, "--d-target", str(d_target), "--d-model", "8"]
    out = subprocess.run([sys.executable, "-m", "dictsweep.cli", *command], capture_output=True, text=True)
    assert out.returncode == 2 and f"--d-target is {d_target}" in out.stderr and words in out.stderr, out.stderr
    with pytest.raises(InputError, match="--d-target"):
        bench_train(8, 16, 8, 1, 1, architecture, d_target=d_target)


def test_a_transcoder_needs_its_output_width():
    with pytest.raises(ValueError, match="d_out"):
        build_ensemble("relu_transcoder", 16, 32, [Member(lr=1e-3, seed=0, l1_coef=1.0)])


def test_bench_sweep_compare_times_a_transcoder_sweeps_ensembles_at_their_target_width():
    config = TrainConfig(tokens=64 * 4, batch_rows=64, kernel="bmm")
    specs = [EnsembleSpec("relu_transcoder", 32, (Member(lr=1e-3, seed=1, l1_coef=1.0),), ("a",))]
    usage = DeviceLoop(specs, 16, config, 4, 1.0, "float32", "cpu", target=(12, 1.0)).usage()
    assert usage["ensembles"][0]["d_target"] == 12
    trainer = {"key": "w0-t0", "device": "cpu", "device_share": 1.0, "steps": 4, "ensembles": usage["ensembles"]}
    compared = bench_train_equivalent({"trainers": [trainer], "sae_samples": 256, "sae_samples_per_s": 1.0}, 2, 1)
    assert compared["bench_train"][0]["d_target"] == 12 and compared["bench_train"][0]["sae_samples_per_s"] > 0
    assert compared["bench_train_sae_samples_per_s"] == pytest.approx(compared["bench_train"][0]["sae_samples_per_s"])
