"""Architectures declare their grid keys; the grid, point names, members and pulled params follow them."""

import dataclasses

import pytest

from dictsweep.config import GridConfig, SweepSpec
from dictsweep.sae import ARCHITECTURES, Member, grid_keys, member_from_params
from dictsweep.sae.hyperparameters import K, L1_COEF, TARGET_L0
from dictsweep.sweep.plan import grid_points
from dictsweep.sweep.pull import point_params


def test_every_declared_key_is_a_grid_key_and_a_member_field():
    member_fields = {field.name for field in dataclasses.fields(Member)}
    for name, architecture in ARCHITECTURES.items():
        assert architecture.hyperparameters, name
        assert architecture.sparsity_key == architecture.hyperparameters[0].key
        for parameter in architecture.hyperparameters:
            assert parameter.key in GridConfig.model_fields, (name, parameter.key)
            assert parameter.key in member_fields or parameter.replaces in member_fields, (name, parameter.key)
    assert list(grid_keys()) == ["l1_coef", "target_l0", "k", "matryoshka_prefixes"]
    assert ARCHITECTURES["topk"].hyperparameters == (K,) and ARCHITECTURES["relu"].hyperparameters == (
        L1_COEF,
        TARGET_L0,
    )
    assert ARCHITECTURES["jumprelu"].hyperparameters[0].typical == pytest.approx(0.1)


def spec(**grid):
    return SweepSpec.model_validate({"name": "h", "data": {"uri": "x"}, "grid": grid})


def test_grid_points_take_each_architectures_own_keys():
    points = grid_points(
        spec(architecture=["relu", "topk"], n_latents=[64], l1_coef=[0.5, 2], k=[4], lr=[0.001], seed=[0, 1])
    )
    assert [point.name for point in points] == [
        "relu-n64-l1_0.5-lr0.001-s0",
        "relu-n64-l1_0.5-lr0.001-s1",
        "relu-n64-l1_2-lr0.001-s0",
        "relu-n64-l1_2-lr0.001-s1",
        "topk-n64-k4-lr0.001-s0",
        "topk-n64-k4-lr0.001-s1",
    ]
    topk = points[-1]
    assert topk.params() == {
        "architecture": "topk",
        "n_latents": 64,
        "l1_coef": None,
        "k": 4,
        "matryoshka_prefixes": None,
        "lr": 0.001,
        "seed": 1,
    }
    assert "target_l0" not in points[0].params()  # a key that replaces another is a param only where set
    assert topk.member() == Member(lr=0.001, seed=1, l1_coef=0.0, k=4)
    assert member_from_params(points[2].params()) == Member(lr=0.001, seed=0, l1_coef=2.0, k=0)
    # MLflow keeps params as text: pull types them back by the declarations
    as_text = {key: str(value) for key, value in topk.params().items()}
    assert point_params(as_text) == topk.params()


def test_a_key_that_replaces_another_takes_its_place_where_declared():
    points = grid_points(
        spec(architecture=["relu", "topk"], n_latents=[64], l1_coef=[0.5], target_l0=[8, 16], k=[4], lr=[0.001])
    )
    assert [point.name for point in points] == [
        "relu-n64-l0_8-lr0.001-s0",
        "relu-n64-l0_16-lr0.001-s0",
        "topk-n64-k4-lr0.001-s0",
    ]
    relu = points[0]
    assert relu.l1_coef is None and relu.target_l0 == 8.0
    assert relu.params() == {
        "architecture": "relu",
        "n_latents": 64,
        "l1_coef": None,
        "target_l0": 8.0,
        "k": None,
        "matryoshka_prefixes": None,
        "lr": 0.001,
        "seed": 0,
    }
    assert relu.member().target_l0 == 8.0
