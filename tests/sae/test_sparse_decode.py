"""The GPU sparse decoder's Triton kernels, run on CPU tensors by Triton's interpreter
(`TRITON_INTERPRET=1`, set before Triton is imported, hence a subprocess): indexing, masking and
fp32 accumulation against the dense decode, forward and backward, alone and inside the top-k
family's forward (topk, batchtopk, AuxK). Tiny shapes: the interpreter is slow; speed is for GPUs."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SCRIPT = textwrap.dedent("""
    import json
    import torch
    from dictsweep.sae import ensemble as ensemble_module
    from dictsweep.sae import Member, build_ensemble
    from dictsweep.sae.sparse_decode import sparse_decode

    torch.manual_seed(0)
    results = {}

    # the function alone: k and d_model not multiples of the blocks, three members
    members, rows, n_latents, d_model, k = 3, 5, 40, 130, 19
    for dtype in (torch.float32, torch.bfloat16):
        table = torch.randn(members, n_latents, d_model, requires_grad=True)
        values, indices = torch.randn(members, rows, n_latents).topk(k, -1)
        values = values.to(dtype).requires_grad_()
        out = sparse_decode(values, indices, table)
        ref_table = table.detach().clone().requires_grad_()
        ref_values = values.detach().float().requires_grad_()
        dense = torch.zeros(members, rows, n_latents).scatter(-1, indices, ref_values)
        ref = torch.bmm(dense, ref_table)  # [K, B, d_model], fp32
        grad = torch.randn(members, rows, d_model).to(dtype)
        out.backward(grad)
        ref.backward(grad.float())
        results[f"function/{dtype}"] = {
            "dtype": str(out.dtype), "scale": float(ref.abs().max()),
            "out": float((out.float() - ref).abs().max()),
            "values": float((values.grad.float() - ref_values.grad).abs().max()),
            "table": float((table.grad - ref_table.grad).abs().max())}

    # inside the ensembles' forward, through the kernel (as on a GPU) against decode=dense
    ensemble_module.use_triton = lambda values: True
    x = torch.randn(24, 16)
    dead = torch.rand(2, 64) < 0.5  # AuxK decodes the top dead latents sparsely too
    for architecture in ("topk", "batchtopk"):
        team = [Member(lr=1e-3, seed=1, k=4), Member(lr=1e-3, seed=2, k=3)]
        outs = {}
        for decode in ("dense", "sparse"):
            model = build_ensemble(architecture, 16, 64, team, decode=decode)
            out = model(x, dead_mask=dead, auxk_k=8)
            out.loss.sum().backward()
            outs[decode] = (out, {name: p.grad.clone() for name, p in model.named_parameters()})
        (dense_out, dense_grads), (sparse_out, sparse_grads) = outs["dense"], outs["sparse"]
        results[architecture] = {
            "aux_loss": float(dense_out.aux_loss.abs().min()),
            "loss": float((dense_out.loss - sparse_out.loss).abs().max()),
            "grads": max(float((dense_grads[name] - sparse_grads[name]).abs().max()) for name in dense_grads)}

    # a compiled forward (aot_eager: what inductor would get, without its C++ builds) runs the kernel as is
    model = build_ensemble("topk", 16, 64, [Member(lr=1e-3, seed=1, k=4)], decode="sparse")
    eager = model(x, dead_mask=dead[:1], auxk_k=8)
    compiled = torch.compile(model.forward, backend="aot_eager")(x, 1.0, dead[:1], 1 / 32, 8)
    compiled.loss.sum().backward()
    results["compiled"] = {"loss": float((eager.loss - compiled.loss).abs().max()),
                           "grad": float(model.W_dec.grad.abs().sum())}
    print(json.dumps(results))
""")


def test_kernel_under_the_interpreter_equals_the_dense_decode():
    env = os.environ | {"TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    fp32, bf16 = results["function/torch.float32"], results["function/torch.bfloat16"]
    assert fp32["dtype"] == "torch.float32" and bf16["dtype"] == "torch.bfloat16"
    for name in ("out", "values", "table"):
        assert fp32[name] < 1e-4
    # bf16: values and gradients rounded once to 8 bits of mantissa; accumulation in fp32
    assert bf16["out"] <= 2**-7 * bf16["scale"] and bf16["table"] < 1e-4
    assert bf16["values"] < 2**-6 * 20
    for architecture in ("topk", "batchtopk"):
        assert results[architecture]["aux_loss"] > 0  # AuxK ran, through the kernel
        assert results[architecture]["loss"] < 1e-4 and results[architecture]["grads"] < 1e-4
    assert results["compiled"]["loss"] < 1e-5 and results["compiled"]["grad"] > 0
