"""Every architecture trains on CUDA as on the CPU: decode (dense, sparse) x kernel (bmm, compile)
x precision (bf16, fp32), 50 steps, against the same SAEs trained on the CPU in fp32 (and the top-k
family with each encoder: dense, sparse, sparse-chunked, sparse-csr); the Triton
sparse decoder against the dense decode at a realistic width; no host sync inside a step.

Tolerance: the mean loss of each SAE over the last 10 of 50 steps is within 5% (fp32) or 10%
(bf16) of the CPU fp32 run's. Trajectories are not bit-equal across devices (top-k ties, reduction
order, bf16 rounding), but a wrong gradient or a wrong decode moves the loss far more than that.
"""

import functools

import pytest
import torch

from dictsweep.config import TrainConfig
from dictsweep.sae import Member, build_ensemble
from dictsweep.sae.sparse_decode import sparse_decode
from dictsweep.train.bench import sparse_batches
from dictsweep.train.loop import EnsembleTrainer

pytestmark = pytest.mark.cuda

D_MODEL, N_LATENTS, ROWS, STEPS = 64, 512, 256, 50
ARCHITECTURES = ["relu", "topk", "batchtopk", "jumprelu"]
TOLERANCE = {"fp32": 0.05, "bf16": 0.10}


def members(architecture: str) -> list[Member]:
    """Four SAEs with distinct seeds, sparsity settings and learning rates (k = 8: 1/64 of the latents)."""
    l1 = 0.1 if architecture == "jumprelu" else 0.3
    return [
        Member(lr=lr, seed=seed, l1_coef=l1 * (1 + seed), k=8 + 2 * seed)
        for seed, lr in enumerate((1e-3, 2e-3, 3e-3, 1e-3))
    ]


@functools.cache
def batches() -> tuple[torch.Tensor, ...]:
    return tuple(sparse_batches(D_MODEL, ROWS, STEPS, seed=1))


def input_scale() -> float:
    """As a sweep scales its data: E|x|^2 = d_model."""
    return float((D_MODEL / batches()[0].pow(2).sum(-1).mean()).sqrt())


def config(precision: str) -> TrainConfig:
    # dead window and resampling inside the 50 steps, so AuxK and resampling run too
    return TrainConfig(
        tokens=ROWS * STEPS,
        batch_rows=ROWS,
        lr_warmup_steps=5,
        precision=precision,
        dead_window_tokens=ROWS * 10,
        resample_every_tokens=ROWS * 20,
        auxk_k=32,
        log_every_tokens=ROWS * 10,
    )


def losses(
    architecture: str, device: str, kernel: str, decode: str, precision: str, encode: str = "auto"
) -> dict[str, torch.Tensor]:
    """Per-SAE loss and squared error of each batch (summed over its optimizer steps), `[STEPS, K]`
    each (read at the end: no sync inside the loop)."""
    ensemble = build_ensemble(
        architecture, D_MODEL, N_LATENTS, members(architecture), kernel=kernel, decode=decode, encode=encode
    )
    ensemble.input_scale.fill_(input_scale())
    trainer = EnsembleTrainer(ensemble, config(precision), STEPS, device)
    per_step = {"loss": [], "mse": []}
    for index, batch in enumerate(batches()):
        trainer.step(batch.to(device))
        for name, values in per_step.items():
            values.append(trainer.metrics.sums[name].clone())  # running sums since the last logging point
        if index % 10 == 9:
            trainer.log_metrics()  # a logging point every 10 batches (relu takes several optimizer steps a batch)
    result = {}
    for name, values in per_step.items():
        sums = torch.stack(values).cpu()  # [STEPS, K], running sums reset every 10 steps
        result[name] = torch.cat(
            [torch.diff(block, dim=0, prepend=torch.zeros_like(block[:1])) for block in sums.split(10)]
        )
    return result


@functools.cache
def cpu_reference(architecture: str) -> dict[str, torch.Tensor]:
    return losses(architecture, "cpu", "bmm", "dense", "fp32")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kernel", ["bmm", "compile"])
@pytest.mark.parametrize("decode", ["dense", "sparse"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_trains_on_cuda_as_on_cpu(architecture, decode, kernel, precision):
    gpu = losses(architecture, "cuda", kernel, decode, precision)
    cpu = cpu_reference(architecture)
    assert torch.isfinite(gpu["loss"]).all()
    assert (gpu["mse"][-10:].mean(0) < 0.9 * gpu["mse"][:5].mean(0)).all()  # it learns (the penalty warms up)
    torch.testing.assert_close(
        gpu["loss"][-10:].mean(0), cpu["loss"][-10:].mean(0), rtol=TOLERANCE[precision], atol=1e-3
    )
    torch.testing.assert_close(gpu["mse"][-10:].mean(0), cpu["mse"][-10:].mean(0), rtol=TOLERANCE[precision], atol=1e-3)


@pytest.mark.parametrize("encode", ["dense", "sparse", "sparse-chunked", "sparse-csr"])
@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_top_k_encoders_train_on_cuda_as_on_cpu(architecture, encode):
    gpu = losses(architecture, "cuda", "bmm", "sparse", "bf16", encode)
    cpu = cpu_reference(architecture)
    assert torch.isfinite(gpu["loss"]).all()
    torch.testing.assert_close(gpu["loss"][-10:].mean(0), cpu["loss"][-10:].mean(0), rtol=TOLERANCE["bf16"], atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_decoder_equals_dense_decode(dtype):
    generator = torch.Generator(device="cuda").manual_seed(0)
    members_, rows, n_latents, d_model, k = 2, 512, 24576, 768, 32
    table = torch.randn(members_, n_latents, d_model, device="cuda", generator=generator) / d_model**0.5
    table.requires_grad_()
    pre = torch.randn(members_, rows, n_latents, device="cuda", generator=generator)
    values, indices = pre.topk(k, dim=-1)
    values = values.relu().to(dtype).requires_grad_()
    grad = torch.randn(members_, rows, d_model, device="cuda", generator=generator).to(dtype)
    out = sparse_decode(values, indices, table)
    out.backward(grad)
    ref_table, ref_values = table.detach().clone().requires_grad_(), values.detach().float().requires_grad_()
    ref = torch.bmm(torch.zeros(members_, rows, n_latents, device="cuda").scatter(-1, indices, ref_values), ref_table)
    ref.backward(grad.float())
    assert out.dtype == dtype and table.grad.dtype == torch.float32
    tol = {"rtol": 1.6e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(out.float(), ref, **tol)
    torch.testing.assert_close(values.grad.float(), ref_values.grad, **tol)
    torch.testing.assert_close(table.grad, ref_table.grad, rtol=1e-4, atol=1e-4)  # fp32 atomics


@pytest.mark.parametrize(
    "architecture,decode,encode",
    [
        ("relu", "dense", "auto"),
        ("jumprelu", "dense", "auto"),
        ("topk", "dense", "dense"),
        ("topk", "sparse", "auto"),
        ("topk", "sparse", "sparse-chunked"),
        ("topk", "sparse", "sparse-csr"),
    ],
)
def test_steps_between_logging_points_never_wait_for_the_gpu(architecture, decode, encode):
    """(batchtopk sizes its rows from the batch, a read of the device per step, by design.)"""
    ensemble = build_ensemble(
        architecture, D_MODEL, N_LATENTS, members(architecture), kernel="bmm", decode=decode, encode=encode
    )
    trainer = EnsembleTrainer(ensemble, config("bf16"), STEPS, "cuda")
    data = [batch.cuda() for batch in batches()]
    for batch in data[:12]:  # past the dead window and a logging point: AuxK on (resampling at step 20)
        trainer.step(batch)
    trainer.log_metrics()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in data[12:19]:
            trainer.step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(torch.tensor(v)).all() for v in trainer.log_metrics().values())
