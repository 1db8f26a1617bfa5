"""The fused top-k encoder on CUDA: the Triton scatter of its weight gradient and the CSR matmul
(`sparse-csr`) against the dense path at a realistic width, fp32 and bf16 autocast, topk and batchtopk with
AuxK, mixed k and the k warm-up; the two-stage top-k against torch.topk. (`test_gpu.py` trains with
each encoder against the same SAEs on the CPU.)"""

import pytest
import torch

from dictsweep.sae import Member, build_ensemble
from dictsweep.sae.sparse_decode import scatter_outer
from dictsweep.sae.sparse_encode import chunked_topk

pytestmark = pytest.mark.cuda

D_MODEL, N_LATENTS, ROWS = 256, 8192, 512
TEAM = [Member(lr=1e-3, seed=1, k=32), Member(lr=1e-3, seed=2, k=16), Member(lr=1e-3, seed=3, k=48)]


def step(architecture: str, encode: str, bf16: bool, warming_up: bool) -> tuple:
    """One forward and backward on CUDA: the loss and the parameters' gradients."""
    ensemble = build_ensemble(architecture, D_MODEL, N_LATENTS, TEAM, decode="sparse", encode=encode).cuda()
    ensemble.warming_up = warming_up
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(ROWS, D_MODEL, device="cuda", generator=generator)
    dead = torch.rand(len(TEAM), N_LATENTS, device="cuda", generator=generator) < 0.5
    with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
        out = ensemble(x, 0.5 if warming_up else 1.0, dead, 1 / 32, 64)
    out.loss.sum().backward()
    return out, {name: param.grad for name, param in ensemble.named_parameters()}


@pytest.mark.parametrize("encode", ["sparse", "sparse-csr"])  # the Triton scatter, a CSR matmul (cuSPARSE)
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("architecture,warming_up", [("topk", False), ("topk", True), ("batchtopk", False)])
def test_fused_encoder_equals_the_dense_path_on_cuda(architecture, warming_up, bf16, encode):
    dense, dense_grads = step(architecture, "dense", bf16, warming_up)
    sparse, sparse_grads = step(architecture, encode, bf16, warming_up)
    assert (dense.aux_loss > 0).all() and torch.equal(sparse.latent_indices, dense.latent_indices)
    torch.testing.assert_close(sparse.loss, dense.loss, rtol=1e-6, atol=1e-6)
    for name, grad in dense_grads.items():
        scale = float(grad.abs().max())
        # fp32: summation order (atomics); bf16: the dense path rounds its weight gradient to bf16, we accumulate in fp32
        tolerance = 2**-6 * scale if bf16 else 1e-5 * max(scale, 1.0)
        assert float((sparse_grads[name] - grad).abs().max()) <= tolerance, name


def test_scatter_outer_on_cuda():
    generator = torch.Generator(device="cuda").manual_seed(1)
    members, rows, n_latents, d_model, k = 2, 1024, 24576, 768, 32
    values = torch.randn(members, rows, k, device="cuda", generator=generator)
    indices = torch.randint(0, n_latents, (members, rows, k), device="cuda", generator=generator)
    inputs = torch.randn(members, rows, d_model, device="cuda", generator=generator)
    dense = torch.zeros(members, rows, n_latents, device="cuda").scatter_add_(-1, indices, values)
    expected = torch.bmm(dense.transpose(1, 2), inputs)  # [K, n_latents, d_model]
    torch.testing.assert_close(scatter_outer(values, indices, inputs, n_latents), expected, rtol=1e-4, atol=1e-4)


def test_chunked_topk_on_cuda():
    scores = torch.randn(4, 256, 24576, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    for k in (32, 128, 384):
        values, indices = chunked_topk(scores, k)
        expected = scores.topk(k, dim=-1, sorted=True)
        torch.testing.assert_close(values, expected.values, rtol=0, atol=0)
        assert torch.equal(scores.gather(-1, indices), values)  # ties may pick other positions of equal value
