"""The top-k family's fused encoder (backward over the selected latents only) against autograd through
the dense pre-activations: outputs and every gradient, fp32 and bf16 autocast, topk and batchtopk
(padded slots), AuxK, mixed per-member k, in and after the k warm-up, both kernels; the two-stage
top-k against torch.topk. The Triton path of the weight gradient runs under Triton's interpreter."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dictsweep.sae import Member, build_ensemble
from dictsweep.sae.sparse_encode import chunked_topk, sparse_encode, weight_gradient

pytestmark = pytest.mark.usefixtures("one_thread")

D_MODEL, ROWS = 32, 48  # the k warm-up starts at 4 k, at most d_model / 4 = 8 latents a row
TEAM = [Member(lr=1e-3, seed=1, k=4), Member(lr=1e-3, seed=2, k=3), Member(lr=1e-3, seed=3, k=6)]


def batch(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(ROWS, D_MODEL, generator=generator) * 2


def run(architecture, n_latents, encode, kernel="bmm", warming_up=False, bf16=False, auxk=True):
    """One forward and backward; the outputs and the parameters' gradients."""
    ensemble = build_ensemble(architecture, D_MODEL, n_latents, TEAM, kernel=kernel, decode="sparse", encode=encode)
    with torch.no_grad():  # off the initial point: biases that move which latents are selected
        ensemble.b_enc.copy_(torch.randn(ensemble.b_enc.shape, generator=torch.Generator().manual_seed(7)) * 0.3)
        ensemble.b_dec.copy_(torch.randn(ensemble.b_dec.shape, generator=torch.Generator().manual_seed(8)) * 0.3)
    ensemble.warming_up = warming_up
    dead = torch.rand(len(TEAM), n_latents, generator=torch.Generator().manual_seed(9)) < 0.6  # AuxK's latents
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        out = ensemble(batch(), 0.4 if warming_up else 1.0, dead if auxk else None, 1 / 32, 8)
    out.loss.sum().backward()
    return out, {name: param.grad for name, param in ensemble.named_parameters()}, ensemble


CASES = [
    (architecture, warming_up, kernel)
    for architecture in ("topk", "batchtopk")
    for warming_up in (False, True)
    for kernel in ("bmm", "loop")
]


@pytest.mark.parametrize("architecture,warming_up,kernel", CASES)
def test_fused_encoder_equals_the_dense_path_in_fp32(architecture, warming_up, kernel):
    dense, dense_grads, dense_ensemble = run(architecture, 96, "dense", kernel, warming_up)
    sparse, sparse_grads, ensemble = run(architecture, 96, "sparse", kernel, warming_up)
    assert (dense.aux_loss > 0).all()  # AuxK took part
    assert torch.equal(sparse.latent_indices, dense.latent_indices)
    assert torch.equal(sparse.latent_acts, dense.latent_acts)
    assert torch.equal(sparse.loss, dense.loss)
    # each member keeps its own k (in the warm-up: more, falling to k), so members keep different widths
    k_now = ensemble.k_now(0.4 if warming_up else 1.0)  # [K]
    assert k_now.tolist() == ([6, 6, 7] if warming_up else [4, 3, 6])
    kept = (sparse.latent_acts > 0).sum(-1)  # [K, B]
    if architecture == "topk":
        assert torch.equal(kept.amax(-1), k_now)
    else:  # k x B of the batch, rows keeping different counts: padded slots (value 0) are there
        assert torch.equal(kept.sum(-1), k_now * ROWS) and (kept.amin(-1) < kept.amax(-1)).all()
        assert torch.equal(ensemble.threshold, dense_ensemble.threshold)
    for name, grad in dense_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "architecture,d_out",
    [("matryoshka_batchtopk", 0), ("batchtopk_transcoder", 24), ("matryoshka_batchtopk_skip_transcoder", 24)],
)
def test_fused_encoder_of_matryoshka_and_transcoders_equals_the_dense_path(architecture, d_out):
    """Matryoshka's per-group AuxK selections and a transcoder's input columns (its rows hold input,
    then target) go through the same fused encoder."""
    team = [Member(lr=1e-3, seed=m.seed, k=m.k, matryoshka_prefixes=(0.25, 0.5)) for m in TEAM]
    rows = torch.cat([batch(), batch(1)[:, :d_out]], dim=1)  # [B, d_model + d_out]

    def run_with(encode):
        options = {"d_out": d_out} if d_out else {}
        ensemble = build_ensemble(architecture, D_MODEL, 96, team, decode="sparse", encode=encode, **options)
        with torch.no_grad():
            ensemble.b_enc.copy_(torch.randn(ensemble.b_enc.shape, generator=torch.Generator().manual_seed(7)) * 0.3)
        dead = torch.rand(len(team), 96, generator=torch.Generator().manual_seed(9)) < 0.6
        out = ensemble(rows, 1.0, dead, 1 / 32, 8)
        out.loss.sum().backward()
        return out, {name: param.grad for name, param in ensemble.named_parameters()}

    dense, dense_grads = run_with("dense")
    sparse, sparse_grads = run_with("sparse")
    assert (dense.aux_loss > 0).all() and torch.equal(sparse.latent_indices, dense.latent_indices)
    torch.testing.assert_close(sparse.loss, dense.loss, rtol=1e-6, atol=1e-6)
    for name, grad in dense_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_fused_encoder_equals_the_dense_path_under_bf16_autocast(architecture):
    dense, dense_grads, _ = run(architecture, 96, "dense", bf16=True)
    sparse, sparse_grads, _ = run(architecture, 96, "sparse", bf16=True)
    # the same bf16 pre-activations and selection; the weight gradients accumulate in fp32 here and are
    # rounded to bf16 on the dense path
    assert torch.equal(sparse.latent_indices, dense.latent_indices) and torch.equal(sparse.loss, dense.loss)
    for name, grad in dense_grads.items():
        scale = float(grad.abs().max())
        assert float((sparse_grads[name] - grad).abs().max()) <= 2**-6 * scale, name


@pytest.mark.parametrize("encode", ["sparse-chunked", "sparse-csr"])
def test_the_other_fused_encoders_train_as_sparse(encode):
    # 2048 latents: two chunks of 1024 for topk's rows and AuxK's; batchtopk's flattened batch in chunks
    # too; sparse-csr on CPUs is sparse (a CSR weight gradient either way)
    for architecture in ("topk", "batchtopk"):
        one, one_grads, _ = run(architecture, 2048, "sparse")
        two, two_grads, _ = run(architecture, 2048, encode)
        assert torch.equal(two.latent_indices, one.latent_indices) and torch.equal(two.loss, one.loss)
        for name, grad in one_grads.items():
            torch.testing.assert_close(two_grads[name], grad, rtol=1e-6, atol=1e-6, msg=name)


def test_chunked_topk_is_exact():
    scores = torch.randn(3, 5, 8192, generator=torch.Generator().manual_seed(0))
    for k in (1, 32, 300):
        values, indices = chunked_topk(scores, k)
        expected = scores.topk(k, dim=-1, sorted=True)
        assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)
    # widths no chunk divides, or too narrow for two chunks: one stage
    for width in (1000, 3000):
        odd = scores[..., :width]
        assert torch.equal(chunked_topk(odd, 8)[1], odd.topk(8, dim=-1).indices)


def test_weight_gradient_is_the_dense_outer_product_sum():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(10, 7, generator=generator)  # [B, d_model]
    indices = torch.randint(0, 30, (2, 10, 5), generator=generator)  # repeats in a row and across rows
    grad = torch.randn(2, 10, 5, generator=generator) * (torch.rand(2, 10, 5, generator=generator) < 0.7)
    dense = torch.zeros(2, 10, 30).scatter_add_(-1, indices, grad)  # [K, B, n_latents]
    expected = torch.bmm(x.expand(2, 10, 7).transpose(1, 2), dense)  # [K, d_model, n_latents]
    torch.testing.assert_close(weight_gradient(x, grad, indices, 30), expected, rtol=1e-6, atol=1e-6)


def test_input_gradient_when_asked_for():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, generator=generator, requires_grad=True)
    weight = torch.randn(2, 5, 20, generator=generator, requires_grad=True)
    bias = torch.randn(2, 1, 20, generator=generator, requires_grad=True)

    def select(pre):
        values, indices = pre.topk(3, dim=-1)
        return [(values.relu(), indices)]

    ((values, _),) = sparse_encode(x, weight, bias, lambda inputs, w, b: torch.baddbmm(b, inputs, w), select)
    values.pow(2).sum().backward()
    dense = [tensor.detach().clone().requires_grad_() for tensor in (x, weight, bias)]
    reference = torch.baddbmm(dense[2], dense[0].expand(2, 6, 5), dense[1])
    reference.topk(3, dim=-1).values.relu().pow(2).sum().backward()
    for mine, theirs in zip((x, weight, bias), dense):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-6, atol=1e-6)


def test_inference_and_evaluation_take_the_dense_path():
    ensemble = build_ensemble("topk", D_MODEL, 96, TEAM, encode="sparse")
    with torch.no_grad():
        out = ensemble(batch())
    values, indices = ensemble.encode(batch())
    assert torch.equal(out.latent_acts, values) and torch.equal(out.latent_indices, indices)
    with pytest.raises(ValueError, match="encode must be one of auto, dense, sparse, sparse-chunked, sparse-csr"):
        build_ensemble("topk", D_MODEL, 96, TEAM, encode="fused")


INTERPRETED = textwrap.dedent("""
    import json
    import torch
    from dictsweep.sae import Member, build_ensemble
    from dictsweep.sae import sparse_encode
    from dictsweep.sae.sparse_decode import scatter_outer

    results = {}
    generator = torch.Generator().manual_seed(0)
    # the scatter alone: k and d_model not multiples of the blocks, repeats, zeros skipped
    members, rows, n_latents, d_model, k = 3, 5, 40, 130, 19
    values = torch.randn(members, rows, k, generator=generator) * (torch.rand(members, rows, k, generator=generator) < 0.8)
    indices = torch.randint(0, n_latents, (members, rows, k), generator=generator)
    inputs = torch.randn(members, rows, d_model, generator=generator)
    out = scatter_outer(values.bfloat16(), indices, inputs, n_latents)
    rounded = torch.zeros(members, rows, n_latents).scatter_add_(-1, indices, values.bfloat16().float())
    expected = torch.bmm(rounded.transpose(1, 2), inputs)  # [K, n_latents, d_model]
    results["scatter"] = {"dtype": str(out.dtype), "error": float((out - expected).abs().max())}

    # inside the ensembles' training step, through the kernel (as on a GPU), against the dense encoder
    sparse_encode.use_triton = lambda tensor: True
    x = torch.randn(24, 16, generator=generator)
    dead = torch.rand(2, 64, generator=generator) < 0.5
    for architecture in ("topk", "batchtopk"):
        team = [Member(lr=1e-3, seed=1, k=4), Member(lr=1e-3, seed=2, k=3)]
        grads = {}
        for encode in ("dense", "sparse"):
            model = build_ensemble(architecture, 16, 64, team, decode="dense", encode=encode)
            model(x, dead_mask=dead, auxk_k=8).loss.sum().backward()
            grads[encode] = {name: p.grad for name, p in model.named_parameters()}
        results[architecture] = max(float((grads["dense"][n] - grads["sparse"][n]).abs().max()) for n in grads["dense"])
    print(json.dumps(results))
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_weight_gradient_under_the_interpreter():
    env = os.environ | {"TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["scatter"]["dtype"] == "torch.float32" and results["scatter"]["error"] < 1e-5
    assert results["topk"] < 1e-5 and results["batchtopk"] < 1e-5
