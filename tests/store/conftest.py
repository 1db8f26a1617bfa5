"""Fixtures for the store tests: small datasets written by DatasetWriter."""

import json
from pathlib import Path

import pytest
import torch

from dictsweep.store.dataset import DatasetWriter


@pytest.fixture
def small_dataset(tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A float32 dataset of 25 train rows (shards of 10, 10, 5) and 7 eval rows, d_model=4."""
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(25, 4, generator=generator)  # [25, 4]
    evaluation = torch.randn(7, 4, generator=generator)  # [7, 4]
    with DatasetWriter(str(tmp_path / "ds"), d_model=4, shard_rows=10) as writer:
        writer.add(train[:12])
        writer.add(train[12:])
        writer.add(evaluation, split="eval")
    return tmp_path / "ds", train, evaluation


def edit_manifest(prefix: Path, change) -> None:
    """Rewrite prefix/manifest.json with `change(dict)` applied."""
    manifest = json.loads((prefix / "manifest.json").read_text())
    change(manifest)
    (prefix / "manifest.json").write_text(json.dumps(manifest))
