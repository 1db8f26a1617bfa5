"""The optimizer, clipping and schedules of the training step."""

import json
import subprocess
import sys

import pytest
import torch

from dictsweep.config import TrainConfig
from dictsweep.train.loop import lr_factor, sparsity_factor
from dictsweep.train.optim import StackedAdam, clip_grad_norm_per_member


def test_stacked_adam_matches_torch_adam_per_member():
    torch.manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(3, 4, 5))
    lrs = torch.tensor([1e-3, 1e-2, 3e-2])
    singles = [torch.nn.Parameter(stacked[i].detach().clone()) for i in range(3)]
    optimizer = StackedAdam([stacked], lrs, betas=(0.9, 0.99), eps=1e-6)
    references = [torch.optim.Adam([p], lr=float(lr), betas=(0.9, 0.99), eps=1e-6) for p, lr in zip(singles, lrs)]
    for step in range(10):
        grad = torch.randn(3, 4, 5)
        stacked.grad = grad.clone()
        optimizer.step(lr_factor=0.5)
        for i, (param, reference) in enumerate(zip(singles, references)):
            for group in reference.param_groups:
                group["lr"] = float(lrs[i]) * 0.5
            param.grad = grad[i].clone()
            reference.step()
    for i in range(3):
        torch.testing.assert_close(stacked[i], singles[i])


def test_clipping_is_per_member():
    a = torch.nn.Parameter(torch.zeros(2, 3))
    b = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([[3.0, 0.0, 0.0], [0.3, 0.0, 0.0]])
    b.grad = torch.tensor([4.0, 0.4])
    norms = clip_grad_norm_per_member([a, b], max_norm=1.0)
    assert norms.tolist() == pytest.approx([5.0, 0.5])
    assert a.grad[0].tolist() == pytest.approx([0.6, 0, 0], rel=1e-5)  # clipped to norm 1
    assert a.grad[1].tolist() == pytest.approx([0.3, 0, 0])  # under the limit: untouched


def test_schedules():
    config = TrainConfig(tokens=1000, batch_rows=10, lr_warmup_steps=10, lr_decay_fraction=0.2,
                         l1_warmup_fraction=0.05)
    assert lr_factor(0, 100, config) == pytest.approx(0.1)
    assert lr_factor(9, 100, config) == 1.0
    assert lr_factor(50, 100, config) == 1.0
    assert lr_factor(90, 100, config) == pytest.approx(0.5)
    assert lr_factor(99, 100, config) == pytest.approx(0.05)
    assert sparsity_factor(0, 100, config) == pytest.approx(0.2)
    assert sparsity_factor(4, 100, config) == 1.0


def test_bench_train_json():
    out = subprocess.run([sys.executable, "-m", "dictsweep.cli", "bench", "train", "--d-model", "16",
                          "--n-latents", "64", "--batch-rows", "128", "--members", "3", "--steps", "3",
                          "--kernel", "bmm", "--json"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["members"] == 3 and result["sae_samples_per_s"] > 0 and result["peak_rss_mb"] > 0
    assert result["max_abs_weight_diff_vs_reference"] < 1e-5
