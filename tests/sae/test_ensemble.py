"""A stacked ensemble must train exactly as its members would alone."""

import pytest
import torch

from dictsweep.config import TrainConfig
from dictsweep.sae import ARCHITECTURES, Member, build_ensemble
from dictsweep.sae.jumprelu import JumpReLU
from dictsweep.train.loop import EnsembleTrainer

D_MODEL, N_LATENTS, BATCH, STEPS = 16, 48, 64, 20


pytestmark = pytest.mark.usefixtures("one_thread")


def batches(seed=0):
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(32, D_MODEL, generator=generator)
    out = []
    for _ in range(STEPS):
        codes = torch.rand(BATCH, 32, generator=generator) * (torch.rand(BATCH, 32, generator=generator) < 0.1)
        out.append(codes @ basis)
    return out


SPARSITY = {"relu": [1.0, 30.0, 0.3], "jumprelu": [0.1, 0.3, 0.03], "topk": [4, 8, 2], "batchtopk": [4, 8, 2]}


def members_of(architecture):
    key = "k" if "topk" in architecture else "l1_coef"
    return [
        Member(lr=lr, seed=seed, **{key: value})
        for lr, seed, value in zip([1e-3, 3e-3, 2e-3], [1, 2, 3], SPARSITY[architecture])
    ]


# dead latents within a few batches, so AuxK and resampling take part in the comparison
CONFIG = TrainConfig(
    tokens=BATCH * STEPS,
    batch_rows=BATCH,
    lr_warmup_steps=5,
    grad_clip=0.5,
    dead_window_tokens=BATCH * 2,
    resample_every_tokens=BATCH * 5,
    resample_until_fraction=1.0,
)


def train(architecture, members, kernel="bmm", decode="auto", encode="auto"):
    ensemble = build_ensemble(architecture, D_MODEL, N_LATENTS, members, kernel=kernel, decode=decode, encode=encode)
    ensemble.input_scale.fill_(1.7)
    trainer = EnsembleTrainer(ensemble, CONFIG, total_batches=STEPS)
    for batch in batches():
        trainer.step(batch)
    return ensemble, trainer


def assert_same_member(stacked, index, alone):
    for name, param in stacked.named_parameters():
        torch.testing.assert_close(param[index], getattr(alone, name)[0], rtol=1e-5, atol=1e-6)
    for name, buffer in stacked.named_buffers():
        if buffer.dim() > 0:  # per-member buffers: hyper-parameters, batchtopk's threshold
            torch.testing.assert_close(buffer[index], getattr(alone, name)[0], rtol=1e-5, atol=1e-6)


# the top-k family's encoder: auto (the fused encoder) and dense
CASES = [(architecture, kernel, "dense", "auto") for architecture in sorted(SPARSITY) for kernel in ("bmm", "loop")]
CASES += [("topk", "bmm", "sparse", "auto"), ("batchtopk", "bmm", "sparse", "auto")]
CASES += [("topk", "bmm", "sparse", "dense"), ("batchtopk", "loop", "dense", "dense")]


@pytest.mark.parametrize("architecture,kernel,decode,encode", CASES)
def test_ensemble_equals_independent_members(architecture, kernel, decode, encode):
    members = members_of(architecture)
    stacked, stacked_trainer = train(architecture, members, kernel, decode, encode)
    for index, member in enumerate(members):
        alone, alone_trainer = train(architecture, [member], kernel, decode, encode)
        assert_same_member(stacked, index, alone)
        # the members moved away from their start, so the comparison means something
        assert not torch.allclose(alone.W_dec[0], alone.init_member(member.seed)[1], atol=1e-3)
        torch.testing.assert_close(stacked_trainer.firing.total_counts[index], alone_trainer.firing.total_counts[0])
    metrics = stacked_trainer.log_metrics()
    if stacked.dead_latents == "auxk":  # dead latents appeared and AuxK trained them
        assert max(metrics["aux_loss"]) > 0
    if stacked.dead_latents == "resample":
        assert max(metrics["resampled_latents"]) > 0


@pytest.mark.parametrize("architecture", sorted(SPARSITY))
def test_member_result_does_not_depend_on_neighbours(architecture):
    members = members_of(architecture)
    first, _ = train(architecture, members)
    swapped_neighbours = [members[0], Member(lr=5e-3, seed=9, l1_coef=10.0, k=1 if "topk" in architecture else 0)]
    second, _ = train(architecture, swapped_neighbours)
    torch.testing.assert_close(first.W_dec[0], second.W_dec[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first.b_dec[0], second.b_dec[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_sparse_decode_equals_dense_forward_and_backward(architecture):
    ensemble = build_ensemble(architecture, D_MODEL, N_LATENTS, members_of(architecture))
    x = batches(seed=3)[0]
    grads = {}
    for decode in ("dense", "sparse"):
        ensemble.decoding = decode
        out = ensemble(x)
        out.loss.sum().backward()
        grads[decode] = [p.grad.clone() for p in ensemble.parameters()]
        ensemble.zero_grad()
    for dense, sparse in zip(grads["dense"], grads["sparse"]):
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


def test_topk_keeps_k_per_member_and_unit_decoder():
    ensemble, _ = train("topk", members_of("topk"))
    x = batches(seed=5)[0]
    values, indices = ensemble.encode(x)
    active = (values > 0).sum(-1)  # [K, B]
    for index, member in enumerate(members_of("topk")):
        assert int(active[index].max()) <= member.k
    torch.testing.assert_close(ensemble.W_dec.norm(dim=-1), torch.ones(3, N_LATENTS))


def test_batchtopk_keeps_k_times_batch_and_learns_a_threshold():
    ensemble, _ = train("batchtopk", members_of("batchtopk"))
    x, y = batches(seed=5)[:2]
    out = ensemble(x)  # training mode with gradients: the top k x B of the batch
    assert out.l0.tolist() == pytest.approx([4.0, 8.0, 2.0])
    assert len(set((out.latent_acts > 0).sum(-1)[0].tolist())) > 1  # rows differ in how many they keep
    # the threshold starts at the first batch's smallest kept value, then is a moving average of them
    fresh = build_ensemble("batchtopk", D_MODEL, N_LATENTS, members_of("batchtopk"))
    fresh(x)
    torch.testing.assert_close(fresh.threshold, fresh.batch_topk(fresh.pre_acts(x))[2])
    _, _, smallest = ensemble.batch_topk(ensemble.pre_acts(y))
    before = ensemble.threshold.clone()
    ensemble(y)
    torch.testing.assert_close(ensemble.threshold, before + 0.01 * (smallest - before))
    # inference (no gradients) keeps what is above the threshold: at the batch's smallest, the same latents
    ensemble.threshold.copy_(smallest - 1e-6)
    with torch.no_grad():
        evaluated = ensemble(y)
    values, indices, _ = ensemble.batch_topk(ensemble.pre_acts(y))
    assert evaluated.latent_indices is None
    torch.testing.assert_close(evaluated.latent_acts, ensemble.densify(values, indices).detach())


def test_jumprelu_threshold_gradients_are_straight_through():
    pre = torch.tensor([[[0.02, 0.5, -1.0], [0.0, 0.011, 0.3]]], requires_grad=True)  # [K=1, B=2, n=3]
    threshold = torch.tensor([[0.01, 0.01, 0.01]], requires_grad=True)
    acts, counts = JumpReLU.apply(pre, threshold, 0.05)
    torch.testing.assert_close(acts, torch.tensor([[[0.02, 0.5, 0.0], [0.0, 0.011, 0.3]]]))
    assert counts.tolist() == [[1.0, 2.0, 1.0]]
    (acts.sum() + 2.0 * counts.sum()).backward()
    # within bandwidth/2 = 0.025 of t: (0.02, latent 0), (0.0, latent 0), (0.011, latent 1)
    # each contributes -(t * 1 + 2) / 0.05 = -40.2
    assert threshold.grad.tolist()[0] == pytest.approx([-80.4, -40.2, 0.0])
    assert pre.grad.tolist() == [[[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]]


def test_registry_names_every_architecture():
    assert {"relu", "topk", "batchtopk", "jumprelu"} <= set(ARCHITECTURES)
    with pytest.raises(ValueError, match="unknown architecture 'gated'"):
        build_ensemble("gated", 4, 8, [Member(lr=1e-3, seed=0)])
