"""`dictsweep harvest --hook A --target-hook B` on MiniLM-L6: each row's `target` is B's output at the
same token as its `act` (A's output), so for an MLP's input and output the stored target is the
model's own MLP applied to the stored act; hooks that cannot be paired exit 2 naming why."""

import json

import numpy as np
import pytest
import torch

from dictsweep.store.dataset import ActivationDataset
from dictsweep.store.harvest import HarvestConfig, harvest
from dictsweep.store.models import export_names, load_model

from tests.store.test_harvest import MODEL, write_topics

MLP_IN, MLP_OUT = "encoder.layer.3.attention.output", "encoder.layer.3.output.dense"  # the MLP's input and output


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL)[0]


def split_rows(prefix: str, split: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray]]:
    """A split's acts [n, d_model], targets [n, d_target] and integer columns, in manifest order."""
    data = ActivationDataset.open(prefix)
    parts = [data.read_shard(index, split, columns=True) for index in range(len(data.shards(split)))]
    columns = {name: np.concatenate([part[1][name] for part in parts]) for name in ("seq", "pos", "token_id")}
    return torch.cat([p[0] for p in parts]), torch.cat([p[1]["target"] for p in parts]), columns


def mlp(model, layer: int, inputs: torch.Tensor) -> torch.Tensor:
    """MiniLM layer `layer`'s MLP (intermediate dense + GELU, then output dense) on rows [n, 384]."""
    block = model.encoder.layer[layer]
    with torch.inference_mode():
        return block.output.dense(block.intermediate(inputs))


def test_target_is_the_mlp_of_the_input_at_the_same_token(tmp_path, model):
    config = HarvestConfig(
        model=MODEL,
        hooks=[MLP_IN],
        target_hooks=[MLP_OUT],
        text=str(write_topics(tmp_path / "topics.txt", count=8)),
        out=str(tmp_path / "tc"),
        context=64,
        max_tokens=700,
        dtype="float32",
        shard_rows=128,
        shuffle_rows=256,
        eval_fraction=0.2,
        batch_size=4,
    )
    result = harvest(config, progress=False)
    manifest = result.manifests[MLP_IN]
    assert result.prefixes == {MLP_IN: config.out}  # one dataset: the target is a column of it
    assert manifest.d_model == 384 and manifest.d_target == 384
    assert manifest.source["hook"] == MLP_IN and manifest.source["target_hook"] == MLP_OUT
    train_acts, train_targets, columns = split_rows(config.out, "train")
    eval_acts, eval_targets, _ = split_rows(config.out, "eval")
    assert len(train_acts) == manifest.n_rows > 300 and len(eval_acts) > 50
    # the same row: the model's own MLP maps the stored input to the stored output (float32, to rounding)
    for acts, targets in ((train_acts, train_targets), (eval_acts, eval_targets)):
        torch.testing.assert_close(mlp(model, 3, acts), targets, rtol=1e-4, atol=1e-4)
    # ... and not a row's neighbour: a shifted pairing is far off
    assert (mlp(model, 3, train_acts[1:]) - train_targets[:-1]).abs().max() > 1.0
    expected = float(train_targets.double().pow(2).sum(-1).mean())
    assert manifest.stats["target_mean_sq_norm"] == pytest.approx(expected, rel=1e-6)
    assert manifest.stats["mean_sq_norm"] == pytest.approx(float(train_acts.double().pow(2).sum(-1).mean()), rel=1e-6)
    assert ActivationDataset.open(config.out).mean_sq_norm("target") == pytest.approx(expected, rel=1e-6)
    assert columns["seq"].min() >= 0 and len(np.unique(columns["seq"])) > 3  # rows still map back to contexts
    assert export_names(manifest.source) == {
        "model_name": "model",
        "hook_name": MLP_IN,
        "hook_name_out": MLP_OUT,
    }


def test_two_pairs_write_two_transcoder_datasets(tmp_path, run_cli, model):
    hooks = ["encoder.layer.2.attention.output", MLP_IN]
    targets = ["encoder.layer.2.output.dense", MLP_OUT]
    code, printed = run_cli(
        "harvest",
        f"--model={MODEL}",
        *[f"--hook={hook}" for hook in hooks],
        *[f"--target-hook={target}" for target in targets],
        f"--text={write_topics(tmp_path / 'topics.txt', count=4)}",
        f"--out={tmp_path / 'ds'}",
        "--context=32",
        "--max-tokens=300",
        "--dtype=float32",
        "--eval-fraction=0.2",
        "--no-progress",
    )
    assert code == 0, printed
    assert printed.count("d_model=384, d_target=384") == 2
    for layer, (hook, target) in enumerate(zip(hooks, targets), start=2):
        prefix = tmp_path / "ds" / hook
        assert json.loads((prefix / "manifest.json").read_text())["source"]["target_hook"] == target
        acts, stored, _ = split_rows(str(prefix), "train")
        torch.testing.assert_close(mlp(model, layer, acts), stored, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "hooks,targets,words",
    [
        ([MLP_IN, "encoder.layer.4.attention.output"], [MLP_OUT], "2 --hook and 1 --target-hook"),
        ([MLP_IN], [MLP_IN], "its own --hook"),
        ([MLP_IN], ["encoder.layer.3.output.dens"], "--target-hook 'encoder.layer.3.output.dens': no such module"),
        ([MLP_OUT], [MLP_IN], f"--target-hook {MLP_IN} runs before its --hook {MLP_OUT}"),
    ],
)
def test_hooks_that_cannot_be_paired_exit_2(tmp_path, run_cli, hooks, targets, words):
    code, printed = run_cli(
        "harvest",
        f"--model={MODEL}",
        *[f"--hook={hook}" for hook in hooks],
        *[f"--target-hook={target}" for target in targets],
        f"--text={write_topics(tmp_path / 'topics.txt', count=2)}",
        f"--out={tmp_path / 'ds'}",
        "--context=32",
        "--max-tokens=100",
        "--no-progress",
    )
    assert code == 2, printed
    assert words in " ".join(printed.split()), printed
    assert not (tmp_path / "ds" / "manifest.json").exists()
