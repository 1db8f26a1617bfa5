"""The evaluations on the GPU give the CPU's numbers: the core metrics' sums and weight metrics, and
the probes (dense L-BFGS and batched Newton)."""

import pytest
import torch

from dictsweep.analysis.probing import fit_logistic
from dictsweep.sae.saebench import CoreSums, core_metrics, weight_metrics


def core_on(device: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=generator) + 1.0
    W_enc, W_dec = torch.randn(64, 512, generator=generator), torch.randn(512, 64, generator=generator)
    b_enc = torch.randn(512, generator=generator) - 2.5
    seqs = torch.arange(4096) // 64
    sums = CoreSums(512, 64, device)
    for start in range(0, 4096, 1024):
        rows = x[start : start + 1024].to(device)
        latents = (rows @ W_enc.to(device) + b_enc.to(device)).relu()
        sums.add(rows, latents @ W_dec.to(device) * 0.05, latents, seqs[start : start + 1024].to(device))
    return core_metrics(sums, weight_metrics(W_enc.to(device), W_dec.to(device), b_enc.to(device)))


def test_core_metrics_on_cuda_as_on_cpu():
    cpu, cuda = core_on("cpu"), core_on("cuda")
    for category, values in cpu["metrics"].items():
        for name, value in values.items():
            assert cuda["metrics"][category][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    for mine, theirs in zip(cpu["details"], cuda["details"]):
        assert theirs == pytest.approx(mine, rel=1e-4, abs=1e-5)


def test_probes_on_cuda_as_on_cpu():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 384, generator=generator)
    y = (x[:, :3].sum(-1) + torch.randn(2000, generator=generator)) > 0
    dense_cpu, dense_cuda = fit_logistic(x, y), fit_logistic(x.cuda(), y.cuda())
    torch.testing.assert_close(dense_cuda.weight.cpu(), dense_cpu.weight, atol=1e-4, rtol=1e-4)
    small = x[:, :5].reshape(1, 2000, 5).repeat(26, 1, 1)
    labels = y.repeat(26, 1)
    newton_cpu, newton_cuda = fit_logistic(small, labels), fit_logistic(small.cuda(), labels.cuda())
    torch.testing.assert_close(newton_cuda.weight.cpu(), newton_cpu.weight, atol=1e-8, rtol=1e-8)
