"""Spec mistakes get a hint: close keys suggested, `--set` errors named as such, one value for a list
key taken as a one-item list, warnings for settings that cannot do what they say."""

import pytest
import yaml

from dictsweep.config import TrainConfig
from dictsweep.spec_file import load_spec, spec_warnings
from dictsweep.errors import InputError

BASE = {"name": "hints", "data": {"uri": "/tmp/none"}, "grid": {"n_latents": [64]}}


def write(tmp_path, spec: dict) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def error_of(path: str, overrides=()) -> str:
    with pytest.raises(InputError) as caught:
        load_spec(path, overrides)
    return str(caught.value)


def test_unknown_keys_suggest_the_close_one(tmp_path):
    path = write(tmp_path, {**BASE, "train": {"tokenz": 5}, "data": {"uri": "x", "synth": {"d_modl": 8}}})
    message = error_of(path)
    assert f"{path}: field 'train.tokenz': not a key of this section; did you mean 'tokens'?" in message
    assert "field 'data.synth.d_modl': not a key of this section; did you mean 'd_model'?" in message
    far = error_of(write(tmp_path, {**BASE, "resources": {"xyzzy": 1}}))
    assert "known keys here: device, trainers" in far


def test_set_errors_name_the_set(tmp_path):
    path = write(tmp_path, BASE)
    message = error_of(path, ["grid.n_latents=-64"])
    assert message == "--set grid.n_latents=-64: field 'grid.n_latents': every value must be > 0, got -64"
    assert error_of(path, ["train.tokns=5"]).startswith(
        "--set train.tokns=5: field 'train.tokns': not a key of this section; did you mean 'tokens'?"
    )
    assert "expected KEY=VALUE" in error_of(path, ["train.tokens"])


def test_one_value_for_a_list_key_is_a_one_item_list(tmp_path):
    spec = load_spec(
        write(tmp_path, {**BASE, "grid": {"n_latents": 32, "architecture": "topk", "k": 4}}),
        ["grid.lr=0.001", "baselines=pca"],
    )
    assert spec.grid.n_latents == [32] and spec.grid.architecture == ["topk"] and spec.grid.k == [4]
    assert spec.grid.lr == [0.001] and spec.baselines == ["pca"]
    assert "every value must be >= 0, got -0.5" in error_of(write(tmp_path, BASE), ["grid.l1_coef=-0.5"])


def test_warnings_for_settings_that_cannot_hold(tmp_path):
    spec = load_spec(
        write(
            tmp_path,
            {**BASE, "train": {"tokens": 50_000, "batch_rows": 1024, "lr_warmup_steps": 100, "eval_tokens": 65_536}},
        )
    )
    warm_up, eval_split = spec_warnings(spec, eval_rows=2520)
    assert "train.lr_warmup_steps (100) is not shorter than training (48 steps of 1024 rows" in warm_up
    # in optimizer steps: the same budget in 64-row steps (relu's default here) is 768 steps
    assert not any("lr_warmup_steps" in note for note in spec_warnings(spec, eval_rows=100_000, step_rows=64))
    assert (
        "train.eval_tokens (65536) is more than the eval split holds (2520 rows): final metrics use 2048" in eval_split
    )
    assert (
        spec_warnings(
            spec.model_copy(update={"train": spec.train.model_copy(update={"lr_warmup_steps": 10})}), eval_rows=100_000
        )
        == []
    )


def test_unset_batch_follows_the_token_budget(tmp_path):
    # about 4096 steps: small budgets get small batches (more updates), large ones stay efficient
    assert TrainConfig(tokens=1_048_576).batch_rows == 256
    assert TrainConfig(tokens=1_000_000).batch_rows == 256
    assert TrainConfig().batch_rows == 512  # the default 2M tokens
    assert TrainConfig(tokens=50_000).batch_rows == 256 and TrainConfig(tokens=10**9).batch_rows == 4096
    assert TrainConfig(tokens=1_000_000, batch_rows=1024).batch_rows == 1024  # a set batch is kept
    assert load_spec(write(tmp_path, {**BASE, "train": {"tokens": 16_777_216}})).train.batch_rows == 4096
    assert load_spec(write(tmp_path, BASE), ["train.tokens=1048576"]).train.batch_rows == 256
    config = TrainConfig(tokens=1_000_000)
    config.tokens = 10**9  # an assignment keeps the batch it had
    assert config.batch_rows == 256
    assert "batch_rows" in error_of(write(tmp_path, {**BASE, "train": {"batch_rows": 0}}), [])


def test_the_warm_up_warning_counts_the_optimizer_steps_of_the_grids_architectures(tmp_path):
    from dictsweep.sweep.preflight import sweep_warnings

    train = {"tokens": 50_000, "batch_rows": 1024, "lr_warmup_steps": 100}
    relu = load_spec(write(tmp_path, {**BASE, "train": train}))
    assert sweep_warnings(relu, eval_rows=1_000_000) == []  # relu: 64-row steps, 768 of them
    both = load_spec(
        write(tmp_path, {**BASE, "grid": {"n_latents": [64], "architecture": ["relu", "topk"]}, "train": train})
    )
    (warm_up,) = sweep_warnings(both, eval_rows=1_000_000)  # topk: one step a batch, 48 of them
    assert "train.lr_warmup_steps (100) is not shorter than training (48 steps of 1024 rows" in warm_up
