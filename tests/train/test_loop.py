"""The optimizer, clipping, schedules, precision, compilation and checkpoints of the training step."""

import functools
import json
import subprocess
import sys

import pytest
import torch

from dictsweep.config import TrainConfig
from dictsweep.sae import ARCHITECTURES, Member, build_ensemble
from dictsweep.train import kernels
from dictsweep.train.bench import bench_train
from dictsweep.train.loop import EnsembleTrainer, lr_factor, sparsity_factor
from dictsweep.train.optim import StackedAdam, clip_divisor, grad_norm_per_member


pytestmark = pytest.mark.usefixtures("one_thread")


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
    norms = grad_norm_per_member([a, b])
    assert norms.tolist() == pytest.approx([5.0, 0.5])
    assert clip_divisor(norms, 1.0).tolist() == pytest.approx([5.0, 1.0])  # over the limit: to norm 1
    assert clip_divisor(norms, 0.0) is None


def test_clipping_inside_adam_matches_clipped_gradients():
    torch.manual_seed(1)
    stacked = torch.nn.Parameter(torch.randn(2, 6))
    plain = torch.nn.Parameter(stacked.detach().clone())
    clipped_adam = StackedAdam([stacked], torch.tensor([1e-2, 1e-2]))
    plain_adam = StackedAdam([plain], torch.tensor([1e-2, 1e-2]))
    for _ in range(3):
        grad = torch.randn(2, 6) * torch.tensor([[10.0], [0.1]])
        stacked.grad = grad.clone()
        clipped_adam.step(grad_divisor=clip_divisor(grad_norm_per_member([stacked]), 1.0))
        norms = grad.norm(dim=1, keepdim=True)
        plain.grad = grad * (1.0 / (norms + 1e-6)).clamp(max=1.0)
        plain_adam.step()
    torch.testing.assert_close(stacked, plain)


def test_schedules():
    config = TrainConfig(tokens=1000, batch_rows=10, lr_warmup_steps=10, lr_decay_fraction=0.2, l1_warmup_fraction=0.05)
    assert lr_factor(0, 100, config) == pytest.approx(0.1)
    assert lr_factor(9, 100, config) == 1.0
    assert lr_factor(50, 100, config) == 1.0
    assert lr_factor(90, 100, config) == pytest.approx(0.5)
    assert lr_factor(99, 100, config) == pytest.approx(0.05)
    assert sparsity_factor(0, 100, config) == pytest.approx(0.2)
    assert sparsity_factor(4, 100, config) == 1.0


def test_stopped_member_keeps_its_weights():
    param = torch.nn.Parameter(torch.ones(2, 3))
    lr = torch.tensor([1e-2, 1e-2])
    optimizer = StackedAdam([param], lr)
    param.grad = torch.ones(2, 3)
    optimizer.step()
    lr[1] = 0.0  # as the trainer actor does for a diverged member: read at every step
    param.grad = torch.ones(2, 3)
    optimizer.step()
    assert param[0].tolist() == pytest.approx([0.98] * 3) and param[1].tolist() == pytest.approx([0.99] * 3)


HEAP = """
import ctypes, json, torch
from dictsweep.train.loop import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if KEEP:
    keep_freed_memory()  # what a CPU trainer does first
torch.empty(2**24).fill_(1.0)  # 64 MB, freed at once
mapped_before = libc.mallinfo2().hblkhd
seen = {"mapped": 0, "kept": 2**62, "mapped_after_free": 0}
for _ in range(10):  # ten more steps' worth, each freed at once
    tensor = torch.empty(2**24).fill_(1.0)
    seen["mapped"] = max(seen["mapped"], libc.mallinfo2().hblkhd - mapped_before)
    del tensor
    info = libc.mallinfo2()
    seen["kept"] = min(seen["kept"], info.fordblks)
    seen["mapped_after_free"] = max(seen["mapped_after_free"], info.hblkhd - mapped_before)
print(json.dumps(seen))
"""


def heap_use(keep: bool) -> dict[str, int]:
    """glibc's own account (`mallinfo2`) of ten 64 MB tensors, each allocated after the last was
    freed, in a fresh process: the most bytes mapped outside the heap while one lived, the fewest free
    bytes the heap kept after one was freed, and the most mapped bytes left after a free."""
    out = subprocess.run(
        [sys.executable, "-c", HEAP.replace("KEEP", str(keep))], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.split("\n")[-2])


def test_cpu_training_reuses_freed_memory():
    """The mechanism, not its timing: page-fault counts also move with what the kernel does under
    load (five fresh tensors seen in CI where one is usual), glibc's books do not."""
    tensor = 2**24 * 4
    plain = heap_use(keep=False)
    assert plain["mapped"] >= tensor  # each tensor in pages of its own, zeroed by the kernel
    assert plain["mapped_after_free"] == 0  # and given back when freed: the next one faults afresh
    kept = heap_use(keep=True)
    assert kept["mapped"] == 0  # every tensor from the heap
    assert kept["kept"] >= tensor  # a freed tensor's pages stay in the process for the next one


MEMBERS = [Member(lr=3e-3, seed=1, l1_coef=1.0, k=4), Member(lr=1e-3, seed=2, l1_coef=0.3, k=2)]


def batches(count, d_model=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(64, d_model, generator=generator) for _ in range(count)]


def trained(architecture, steps=6, kernel="bmm", **settings):
    config = TrainConfig(
        tokens=64 * steps,
        batch_rows=64,
        lr_warmup_steps=2,
        dead_window_tokens=128,
        resample_every_tokens=128,
        **settings,
    )
    trainer = EnsembleTrainer(build_ensemble(architecture, 16, 64, MEMBERS, kernel=kernel), config, steps)
    for batch in batches(steps):
        trainer.step(batch)
    return trainer


@pytest.mark.parametrize("architecture", ["relu", "topk", "batchtopk", "jumprelu"])
def test_bf16_autocast_keeps_fp32_master_weights(architecture):
    full = trained(architecture)
    mixed = trained(architecture, precision="bf16")  # the GPU default ("auto"), forced on CPU
    assert all(p.dtype == torch.float32 for p in mixed.ensemble.parameters())
    with torch.autocast("cpu", torch.bfloat16):
        assert mixed.ensemble(batches(1)[0]).latent_acts.dtype == torch.bfloat16  # the matmuls ran in bf16
    # the same training to bf16 precision: weights moved alike, losses agree to a few percent
    moved_full = full.ensemble.W_dec.detach() - full.ensemble.init_member(1)[1]
    moved_mixed = mixed.ensemble.W_dec.detach() - mixed.ensemble.init_member(1)[1]
    assert float(torch.nn.functional.cosine_similarity(moved_full.flatten(), moved_mixed.flatten(), dim=0)) > 0.9
    losses = full.log_metrics()["loss"], mixed.log_metrics()["loss"]
    assert losses[1] == pytest.approx(losses[0], rel=0.05)


@pytest.mark.parametrize("architecture", ["relu", "batchtopk"])
def test_compiled_forward_trains_as_eager(monkeypatch, architecture):
    # aot_eager traces exactly what inductor would compile, without its minutes of C++ builds
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    eager, compiled = trained(architecture), trained(architecture, kernel="compile")
    for mine, theirs in zip(compiled.ensemble.parameters(), eager.ensemble.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_resume_continues_exactly(architecture):
    whole = trained(architecture, steps=8)  # resamples (relu) or AuxK (topk) after step 2
    first = trained(architecture, steps=8)
    state = first.state_dict()
    resumed = EnsembleTrainer(build_ensemble(architecture, 16, 64, MEMBERS), first.config, 8)
    resumed.load_state_dict(state)
    rest = batches(12)[8:]
    for trainer in (whole, resumed):
        for batch in rest:
            trainer.step(batch)
    for mine, theirs in zip(resumed.ensemble.parameters(), whole.ensemble.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_compile_is_tried_only_when_the_planned_steps_repay_it():
    eager = ("bmm", "loop")
    assert kernels.default_candidates("cpu") == eager  # no plan: CPUs do not compile
    assert kernels.default_candidates("cuda") == ("bmm", "loop", "compile")
    # 30 s build at a 30% gain: worth it from 1000 steps of 0.1 s, not from 100
    assert kernels.default_candidates("cpu", total_steps=100, eager_step_seconds=0.1) == eager
    assert "compile" in kernels.default_candidates("cpu", total_steps=2000, eager_step_seconds=0.1)


def test_choose_kernel_weighs_the_build_against_the_planned_steps(monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    kernel, decode, encode, timings = kernels.choose_path("relu", 16, 64, MEMBERS, 64, total_steps=10)
    assert set(timings) == {"bmm", "loop"} and kernel == min(timings, key=timings.get)  # not worth trying
    assert (decode, encode) == ("auto", "auto")  # CPUs keep the density rule; relu has no top-k encoder
    kernel, _, _, timings = kernels.choose_path(
        "relu", 16, 64, MEMBERS, 64, candidates=("bmm", "compile"), total_steps=10
    )
    assert timings["compile_seconds"] > 0 and timings["compile"] > 0
    assert kernel == "bmm"  # ten steps never repay a build


def test_choose_path_measures_the_top_k_encoders_on_one_trainer(monkeypatch, caplog):
    built = []
    monkeypatch.setattr(
        kernels, "build_ensemble", lambda *args, **options: built.append(options) or build_ensemble(*args, **options)
    )
    kernel, decode, encode, timings = kernels.choose_path(
        "topk", 16, 64, MEMBERS, 64, candidates=("bmm",), total_steps=10
    )
    assert set(timings) == {"bmm/auto/dense", "bmm/auto/sparse"} and (kernel, decode) == ("bmm", "auto")
    assert f"bmm/auto/{encode}" == min(timings, key=timings.get)
    assert len(built) == 1  # the encoders took turns on one trainer: no second copy of the weights
    monkeypatch.setattr(kernels, "build_ensemble", build_ensemble)

    def broken(*args):
        raise RuntimeError("no sparse encoder here")

    monkeypatch.setattr("dictsweep.sae.topk.sparse_encode", broken)
    kernel, decode, encode, timings = kernels.choose_path(
        "topk", 16, 64, MEMBERS, 64, candidates=("bmm",), total_steps=10
    )
    assert (kernel, decode, encode) == ("bmm", "auto", "dense") and set(timings) == {"bmm/auto/dense"}
    assert "kernel choice: bmm/auto/sparse dropped (RuntimeError: no sparse encoder here)" in caplog.messages
    # set, not measured: nothing to choose
    assert kernels.choose_path("topk", 16, 64, MEMBERS, 64, candidates=("bmm",), encode="sparse") == (
        "bmm",
        "auto",
        "sparse",
        {},
    )


def bench(*options):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dictsweep.cli",
            "bench",
            "train",
            "--d-model",
            "16",
            "--n-latents",
            "64",
            "--batch-rows",
            "128",
            "--members",
            "3",
            "--steps",
            "2",
            "--rounds",
            "2",
            "--kernel",
            "bmm",
            "--json",
            *options,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_bench_train_json():
    result = bench()
    assert result["members"] == 3 and result["sae_samples_per_s"] > 0 and result["peak_rss_mb"] > 0
    assert result["max_abs_weight_diff_vs_reference"] < 1e-5
    assert 0 < result["fraction_of_matmul_rate"] and result["reference_sae_samples_per_s"] > 0


def test_bench_train_times_the_encoders_beside_each_other():
    result = bench_train(
        16,
        64,
        128,
        3,
        steps=2,
        architecture="topk",
        kernels=("bmm",),
        decodes=("sparse",),
        encodes=("dense", "sparse"),
        rounds=2,
    )
    assert set(result["candidates"]) == {"bmm/sparse/dense", "bmm/sparse/sparse"}
    assert f"bmm/sparse/{result['encode']}" == max(result["candidates"], key=result["candidates"].get)
    assert result["max_abs_weight_diff_vs_reference"] < 1e-5  # the per-SAE loop (dense encoder) trains the same SAEs
    out = subprocess.run(
        [sys.executable, "-m", "dictsweep.cli", "bench", "train", "--encode", "fused"], capture_output=True, text=True
    )
    assert (
        out.returncode == 2
        and "--encode: 'fused' is not one of auto, dense, sparse, sparse-chunked, sparse-csr" in out.stderr
    )


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "jumprelu"])
def test_bench_train_covers_architectures_and_decoders(architecture):
    result = bench_train(
        16, 64, 128, 3, steps=2, architecture=architecture, kernels=("bmm",), decodes=("dense", "sparse"), rounds=2
    )
    assert result["architecture"] == architecture
    assert set(result["candidates"]) == {"bmm/dense", "bmm/sparse"}
    assert result["max_abs_weight_diff_vs_reference"] < 1e-5


def test_a_candidate_that_raises_is_dropped_with_a_note(monkeypatch, caplog):
    step = EnsembleTrainer.step

    def loop_fails(trainer, batch):
        if trainer.ensemble.kernel == "loop":
            raise RuntimeError("no such kernel here\nsecond line")
        step(trainer, batch)

    monkeypatch.setattr(EnsembleTrainer, "step", loop_fails)
    kernel, decode, _, timings = kernels.choose_path("relu", 16, 64, MEMBERS, 64, total_steps=10)
    assert (kernel, decode) == ("bmm", "auto") and set(timings) == {"bmm"}
    assert [(record.levelname, record.getMessage()) for record in caplog.records] == [
        ("WARNING", "kernel choice: loop dropped (RuntimeError: no such kernel here)")
    ]
    monkeypatch.setattr(EnsembleTrainer, "step", lambda trainer, batch: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # nothing can run: the error is the sweep's
        kernels.choose_path("relu", 16, 64, MEMBERS, 64, total_steps=10)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_bench_train_on_a_missing_device_is_invalid_input():
    out = subprocess.run(
        [sys.executable, "-m", "dictsweep.cli", "bench", "train", "--device", "cuda"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "--device: 'cuda' is not available here" in out.stderr


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "relu"])
def test_topk_decoder_bias_starts_at_the_first_batch_mean(architecture):
    # the top-k family centres its inputs from the start (Gao et al. 2024); relu's b_dec starts at 0
    torch.manual_seed(0)
    batch = torch.randn(64, 8) + 3.0  # [rows, d_model], mean far from 0
    members = [Member(lr=1e-3, seed=seed, k=2, l1_coef=1.0) for seed in range(2)]
    ensemble = build_ensemble(architecture, 8, 16, members)
    ensemble.input_scale.fill_(0.5)
    trainer = EnsembleTrainer(ensemble, TrainConfig(tokens=64 * 200, batch_rows=64), 200)
    trainer.step(batch)  # the first step moves b_dec by at most lr / lr_warmup_steps = 1e-5
    expected = (batch * 0.5).mean(0) if ensemble.decoder_bias_from_data else torch.zeros(8)
    for member in range(2):
        torch.testing.assert_close(ensemble.b_dec[member].detach(), expected, atol=1e-4, rtol=0)
    assert ensemble.decoder_bias_from_data == (architecture != "relu")
    before = ensemble.b_dec.detach().clone()
    trainer.step(batch + 10.0)  # only the first batch sets it
    torch.testing.assert_close(ensemble.b_dec.detach(), before, atol=1e-4, rtol=0)


def test_default_step_rows_split_relu_batches_at_small_budgets():
    relu, topk = ARCHITECTURES["relu"], ARCHITECTURES["topk"]
    assert TrainConfig(tokens=2**20).rows_per_step(relu.budget_steps) == 64  # 256-row batches in four steps
    assert TrainConfig(tokens=2**21).rows_per_step(relu.budget_steps) == 128
    assert TrainConfig(tokens=2**20, batch_rows=4096).rows_per_step(relu.budget_steps) == 64
    assert TrainConfig(tokens=2**26).rows_per_step(relu.budget_steps) == 4096  # a large budget: one step a batch
    assert TrainConfig(tokens=2**20, batch_rows=1000).rows_per_step(relu.budget_steps) == 100  # equal steps: a divisor
    assert (
        TrainConfig(tokens=2**20, batch_rows=48).rows_per_step(relu.budget_steps) == 48
    )  # never more rows than the batch
    assert TrainConfig(tokens=2**20).rows_per_step(topk.budget_steps) == 256  # the top-k family: one step a batch
    assert TrainConfig(tokens=2**20, step_rows=128).rows_per_step(relu.budget_steps) == 128  # as set
    assert TrainConfig(tokens=2**20, step_rows=128).rows_per_step(topk.budget_steps) == 128


def test_step_rows_must_divide_the_batch():
    with pytest.raises(ValueError, match=r"step_rows \(96\) must divide batch_rows \(256\)"):
        TrainConfig(batch_rows=256, step_rows=96)


@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_a_batch_in_steps_trains_as_those_steps_as_batches(architecture):
    """Steps of 32 rows over 64-row batches: the same training as 32-row batches, schedules included."""
    split = trained(architecture, steps=6, step_rows=32)
    assert split.rows_per_step == 32 and split.total_steps == 12
    config = TrainConfig(
        tokens=64 * 6, batch_rows=32, lr_warmup_steps=2, dead_window_tokens=128, resample_every_tokens=128
    )
    whole = EnsembleTrainer(build_ensemble(architecture, 16, 64, MEMBERS), config, 12)
    for batch in batches(6):
        for half in batch.split(32):
            whole.step(half)
    assert whole.step_count == split.step_count == 12
    for mine, theirs in zip(split.ensemble.parameters(), whole.ensemble.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    assert split.log_metrics() == whole.log_metrics()


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_the_top_k_familys_sparsity_warm_up_falls_from_four_times_k(architecture):
    """Over the first l1_warmup_fraction of the steps a row keeps 4k latents (at most d_model / 4)
    falling linearly to k (batchtopk: that many x B of the batch); after it, and outside training, k."""
    torch.manual_seed(0)
    members = [Member(lr=1e-3, seed=0, k=2), Member(lr=1e-3, seed=1, k=3)]
    ensemble = build_ensemble(architecture, 64, 64, members)
    config = TrainConfig(tokens=32 * 8, batch_rows=32, l1_warmup_fraction=0.5, lr_warmup_steps=1)
    trainer = EnsembleTrainer(ensemble, config, 8)
    l0 = []
    for batch in torch.randn(8, 32, 64).unbind():
        trainer.step(batch)
        l0.append(trainer.log_metrics()["l0"])
    factors = [sparsity_factor(step, 8, config) for step in range(8)]
    assert factors == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]
    expected = [[round(k * (4 - 3 * factor)) for k in (2, 3)] for factor in factors]
    assert expected[:4] == [[6, 10], [5, 8], [4, 5], [2, 3]]  # rounded half to even, as torch rounds
    assert [[round(value, 4) for value in step] for step in l0] == expected  # every row fires that many
    assert not ensemble.warming_up  # and inference keeps k: the flag is the trainer's, step by step
    if architecture == "topk":
        with torch.no_grad():
            values, _ = ensemble.encode(torch.randn(32, 64))
        assert values.shape[-1] == 3 and int((values[0] > 0).sum(-1).max()) <= 2
    few_latents = build_ensemble(architecture, 64, 8, members)  # 4k above the latents: every latent
    narrow = build_ensemble(architecture, 12, 64, members)  # d_model / 4 = 3: k=2 starts at 3, k=3 at k
    for warm, start in ((few_latents, [8, 8]), (narrow, [3, 3])):
        warm.warming_up = True
        assert warm.k_now(0.0).tolist() == start and warm.widest_k() == start[1]
