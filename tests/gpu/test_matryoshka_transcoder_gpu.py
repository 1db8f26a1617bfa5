"""matryoshka_batchtopk and the transcoder variants train on CUDA as on the CPU (decode dense and
sparse, fp32 and bf16), with the same tolerance as the other architectures (`test_gpu.py`): the mean
loss and squared error of each member over the last 10 of 50 steps within 5% (fp32) or 10% (bf16) of
the CPU fp32 run's."""

import functools

import pytest
import torch

from dictsweep.config import TrainConfig
from dictsweep.sae import Member, build_ensemble
from dictsweep.train.bench import sparse_batches
from dictsweep.train.loop import EnsembleTrainer

pytestmark = pytest.mark.cuda

D_MODEL, D_OUT, N_LATENTS, ROWS, STEPS = 64, 48, 512, 256, 50
ARCHITECTURES = [
    "matryoshka_batchtopk",
    "matryoshka_batchtopk_skip_transcoder",
    "batchtopk_skip_transcoder",
    "relu_transcoder",
    "jumprelu_skip_transcoder",
]
TOLERANCE = {"fp32": 0.05, "bf16": 0.10}


def members(architecture: str) -> list[Member]:
    l1 = 0.1 if architecture.startswith("jumprelu") else 0.3
    prefixes = [(0.0625, 0.25), (0.125,), (0.25, 0.5), (0.0625,)]
    return [
        Member(lr=lr, seed=seed, l1_coef=l1 * (1 + seed), k=8 + 2 * seed, matryoshka_prefixes=prefixes[seed])
        for seed, lr in enumerate((1e-3, 2e-3, 3e-3, 1e-3))
    ]


@functools.cache
def batches(transcoder: bool) -> tuple[torch.Tensor, ...]:
    """Activation-like rows; a transcoder's rows are each input and its target, a fixed nonlinear map of it."""
    inputs = sparse_batches(D_MODEL, ROWS, STEPS, seed=1)
    if not transcoder:
        return tuple(inputs)
    mapping = torch.randn(D_MODEL, D_OUT, generator=torch.Generator().manual_seed(2)) / D_MODEL**0.5
    return tuple(torch.cat([x, torch.relu(x @ mapping) + 0.1 * x[:, :D_OUT]], 1) for x in inputs)


def losses(architecture: str, device: str, decode: str, precision: str) -> dict[str, torch.Tensor]:
    transcoder = "transcoder" in architecture
    options = {"d_out": D_OUT} if transcoder else {}
    ensemble = build_ensemble(
        architecture, D_MODEL, N_LATENTS, members(architecture), kernel="bmm", decode=decode, **options
    )
    data = batches(transcoder)
    ensemble.input_scale.fill_(float((D_MODEL / data[0][:, :D_MODEL].pow(2).sum(-1).mean()).sqrt()))
    if transcoder:
        ensemble.target_scale.fill_(float((D_OUT / data[0][:, D_MODEL:].pow(2).sum(-1).mean()).sqrt()))
    config = TrainConfig(
        tokens=ROWS * STEPS,
        batch_rows=ROWS,
        lr_warmup_steps=5,
        precision=precision,
        dead_window_tokens=ROWS * 10,
        resample_every_tokens=ROWS * 20,
        auxk_k=32,
        log_every_tokens=ROWS * 10,
    )
    trainer = EnsembleTrainer(ensemble, config, STEPS, device)
    per_step = {"loss": [], "mse": []}
    for index, batch in enumerate(data):
        trainer.step(batch.to(device))
        for name, values in per_step.items():
            values.append(trainer.metrics.sums[name].clone())
        if index % 10 == 9:
            trainer.log_metrics()
    result = {}
    for name, values in per_step.items():
        sums = torch.stack(values).cpu()  # [STEPS, K], running sums reset every 10 steps
        result[name] = torch.cat([torch.diff(b, dim=0, prepend=torch.zeros_like(b[:1])) for b in sums.split(10)])
    return result


@functools.cache
def cpu_reference(architecture: str) -> dict[str, torch.Tensor]:
    return losses(architecture, "cpu", "dense", "fp32")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("decode", ["dense", "sparse"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_trains_on_cuda_as_on_cpu(architecture, decode, precision):
    gpu, cpu = losses(architecture, "cuda", decode, precision), cpu_reference(architecture)
    assert torch.isfinite(gpu["loss"]).all()
    assert (gpu["mse"][-10:].mean(0) < 0.9 * gpu["mse"][:5].mean(0)).all()  # it learns
    tolerance = TOLERANCE[precision]
    torch.testing.assert_close(gpu["loss"][-10:].mean(0), cpu["loss"][-10:].mean(0), rtol=tolerance, atol=1e-3)
    torch.testing.assert_close(gpu["mse"][-10:].mean(0), cpu["mse"][-10:].mean(0), rtol=tolerance, atol=1e-3)
