"""The plan: grid points -> ensembles -> devices, by a memory model; printable and round-tripped."""

import pytest

from dictsweep.config import SweepSpec
from dictsweep.errors import InputError
from dictsweep.sweep.plan import grid_points, make_plan, member_bytes, plan_from_dict

GIB = 2**30


def spec(**grid):
    return SweepSpec.model_validate({"name": "p", "data": {"uri": "x"}, "grid": {"n_latents": [64], **grid}})


def test_grid_is_the_product_of_the_keys_that_apply():
    points = grid_points(
        spec(architecture=["relu", "topk"], n_latents=[64, 128], l1_coef=[1, 2, 3], k=[4, 8], lr=[1e-3, 3e-3], seed=[0])
    )
    relu = [p for p in points if p.architecture == "relu"]
    topk = [p for p in points if p.architecture == "topk"]
    assert len(relu) == 2 * 3 * 2 and len(topk) == 2 * 2 * 2
    assert all(p.k is None and p.l1_coef is not None for p in relu)
    assert all(p.l1_coef is None and p.k is not None for p in topk)
    assert len({p.name for p in points}) == len(points)
    assert "topk-n128-k8-lr0.003-s0" in {p.name for p in points}


def test_grid_errors_name_the_key():
    with pytest.raises(InputError, match="grid.k: k=64 is not below n_latents=64"):
        grid_points(spec(architecture=["topk"], k=[64]))
    with pytest.raises(InputError, match="appears twice"):
        grid_points(spec(l1_coef=[1.0, 1.0]))


def test_packing_respects_memory_and_balances_work():
    points = grid_points(spec(n_latents=[1024, 4096], l1_coef=[1, 2, 3, 4, 5, 6]))
    per_small, per_large = member_bytes(256, 1024, 512), member_bytes(256, 4096, 512)
    budget_gib = 3 * per_large / GIB  # three large SAEs fit a device (with headroom 0)
    plan = make_plan(points, 256, 512, "cuda", 2, int(budget_gib * GIB), max_members=16, headroom=0.0)
    assert len(plan.points) == 12 and not plan.zero and not plan.unplaced
    for wave in plan.waves:
        for trainer in wave:
            assert trainer.used_bytes <= budget_gib * GIB
            for ensemble in trainer.ensembles:
                assert len({(p.architecture, p.n_latents) for p in ensemble.points}) == 1
    # the large SAEs are split into near-equal ensembles that fit, spread over both devices
    large = [e for wave in plan.waves for t in wave for e in t.ensembles if e.n_latents == 4096]
    assert sorted(len(e.points) for e in large) == [3, 3]
    assert {t.index for t in plan.waves[0]} == {0, 1}
    assert per_small * 6 <= budget_gib * GIB


def test_waves_when_the_devices_are_full():
    points = grid_points(spec(n_latents=[4096], l1_coef=[1, 2, 3, 4]))
    plan = make_plan(points, 256, 512, "cpu", 1, member_bytes(256, 4096, 512) * 2, 16, 0.0)
    assert len(plan.waves) == 2 and all(len(w[0].ensembles[0].points) == 2 for w in plan.waves)


def test_too_large_for_a_device_goes_to_zero_or_fits_nowhere():
    points = grid_points(spec(n_latents=[1024, 65536], l1_coef=[1]))
    small_budget = int(0.6 * member_bytes(256, 65536, 512))  # ZeRO over several devices is needed
    plan = make_plan(points, 256, 512, "cuda", 4, small_budget, 16, 0.0)
    assert [z.point.n_latents for z in plan.zero] == [65536] and plan.zero[0].workers >= 2
    assert plan.zero[0].memory_bytes <= small_budget
    assert [p.n_latents for p in plan.points if p not in [z.point for z in plan.zero]] == [1024]
    tiny = make_plan(points, 256, 512, "cuda", 4, member_bytes(256, 4096, 512), 16, 0.0)
    assert list(tiny.unplaced) == ["relu-n65536-l1_1-lr0.0003-s0"]  # not even ZeRO makes it fit
    assert "whole layer" in tiny.unplaced["relu-n65536-l1_1-lr0.0003-s0"]
    never = make_plan(points, 256, 512, "cuda", 4, small_budget, 16, 0.0, zero="never")
    assert (
        list(never.unplaced) == ["relu-n65536-l1_1-lr0.0003-s0"]
        and "budget" in never.unplaced["relu-n65536-l1_1-lr0.0003-s0"]
    )
    forced = make_plan(points, 256, 512, "cuda", 4, 64 * GIB, 16, 0.0, zero="always", zero_workers=2)
    assert {z.point.n_latents for z in forced.zero} == {1024, 65536} and not forced.waves
    targeted = grid_points(spec(n_latents=[65536], target_l0=[32]))  # steered under ZeRO as on one device
    steered = make_plan(targeted, 256, 512, "cuda", 4, small_budget, 16, 0.0)
    assert [z.point.target_l0 for z in steered.zero] == [32] and not steered.unplaced
    assert steered.zero[0].point.member().target_l0 == 32
    # ZeRO does not train batchtopk (its selection spans the whole batch, which no worker holds)
    batch = grid_points(spec(architecture=["batchtopk"], n_latents=[1024, 65536], l1_coef=[1], k=[8]))
    too_big = make_plan(batch, 256, 512, "cuda", 4, small_budget, 16, 0.0)
    assert not too_big.zero and [p.n_latents for p in too_big.points] == [1024]
    assert ["ZeRO trains only relu, topk" in why for why in too_big.unplaced.values()] == [True]


def test_plan_round_trips_through_json():
    points = grid_points(spec(architecture=["relu", "topk"], n_latents=[64, 4096], l1_coef=[1, 2], k=[8]))
    plan = make_plan(points, 256, 512, "cuda", 2, member_bytes(256, 4096, 512) * 2, 16, 0.0)
    again = plan_from_dict(plan.to_dict())
    assert again == plan and again.rows() == plan.rows()
