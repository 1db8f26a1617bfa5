"""A stacked ensemble must train exactly as its members would alone."""

import pytest
import torch

from dictsweep.config import TrainConfig
from dictsweep.sae import ARCHITECTURES, Member, build_ensemble
from dictsweep.train.loop import EnsembleTrainer

D_MODEL, N_LATENTS, BATCH, STEPS = 16, 48, 64, 20


def batches(seed=0):
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(32, D_MODEL, generator=generator)
    out = []
    for _ in range(STEPS):
        codes = torch.rand(BATCH, 32, generator=generator) * (torch.rand(BATCH, 32, generator=generator) < 0.1)
        out.append(codes @ basis)
    return out


MEMBERS = {
    "relu": [Member(lr=1e-3, seed=1, l1_coef=1.0), Member(lr=3e-3, seed=2, l1_coef=3.0),
             Member(lr=2e-3, seed=3, l1_coef=0.3)],
    "topk": [Member(lr=1e-3, seed=1, k=4), Member(lr=3e-3, seed=2, k=8), Member(lr=2e-3, seed=3, k=2)],
}


def train(architecture, members, kernel="bmm"):
    config = TrainConfig(tokens=BATCH * STEPS, batch_rows=BATCH, lr_warmup_steps=5, grad_clip=0.5,
                         dead_window_tokens=BATCH * 5)
    ensemble = build_ensemble(architecture, D_MODEL, N_LATENTS, members, kernel=kernel)
    ensemble.input_scale.fill_(1.7)
    trainer = EnsembleTrainer(ensemble, config, total_steps=STEPS)
    for batch in batches():
        trainer.step(batch)
    return ensemble, trainer


@pytest.mark.parametrize("architecture", sorted(MEMBERS))
@pytest.mark.parametrize("kernel", ["bmm", "loop"])
def test_ensemble_equals_independent_members(architecture, kernel):
    members = MEMBERS[architecture]
    stacked, stacked_trainer = train(architecture, members, kernel)
    for index, member in enumerate(members):
        alone, alone_trainer = train(architecture, [member], kernel)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(stacked, name)[index], getattr(alone, name)[0],
                                       rtol=1e-5, atol=1e-6)
        # the members moved away from their start, so the comparison means something
        assert not torch.allclose(alone.W_dec[0], alone.init_member(member.seed)[1], atol=1e-3)
        torch.testing.assert_close(stacked_trainer.firing.total_counts[index],
                                   alone_trainer.firing.total_counts[0])


@pytest.mark.parametrize("architecture", sorted(MEMBERS))
def test_member_result_does_not_depend_on_neighbours(architecture):
    members = MEMBERS[architecture]
    first, _ = train(architecture, members)
    swapped_neighbours = [members[0], Member(lr=5e-3, seed=9, l1_coef=10.0, k=1 if architecture == "topk" else 0)]
    second, _ = train(architecture, swapped_neighbours)
    torch.testing.assert_close(first.W_dec[0], second.W_dec[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first.b_dec[0], second.b_dec[0], rtol=1e-5, atol=1e-6)


def test_topk_keeps_k_per_member_and_unit_decoder():
    ensemble, _ = train("topk", MEMBERS["topk"])
    x = batches(seed=5)[0]
    values, indices = ensemble.encode(x)
    active = (values > 0).sum(-1)  # [K, B]
    for index, member in enumerate(MEMBERS["topk"]):
        assert int(active[index].max()) <= member.k
    torch.testing.assert_close(ensemble.W_dec.norm(dim=-1), torch.ones(3, N_LATENTS))


def test_registry_names_every_architecture():
    assert {"relu", "topk"} <= set(ARCHITECTURES)
    with pytest.raises(ValueError, match="unknown architecture 'gated'"):
        build_ensemble("gated", 4, 8, [Member(lr=1e-3, seed=0)])
