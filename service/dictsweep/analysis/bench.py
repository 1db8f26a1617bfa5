"""`dictsweep bench inspect`: rows/s and peak memory of the inspect pass over a dataset for one
dictionary of a given size (directions through the dataset's own rows, thresholds set so each latent
fires on about `firing` of them, as a trained dictionary's do)."""

from __future__ import annotations

import os
import tempfile

import torch

from dictsweep.sae.export import dictionary_files, saelens_config
from dictsweep.store.dataset import ActivationDataset

CALIBRATION_ROWS = 2048  # rows whose projections set the thresholds


def bench_dictionary(folder: str, dataset: ActivationDataset, n_latents: int, firing: float, seed: int = 0) -> str:
    """Write a `standard` dictionary of `n_latents` unit directions through (centred) dataset rows."""
    rows = dataset.read_shard(0)[:CALIBRATION_ROWS].float()  # [<= 2048, d_model]
    mean = rows.mean(0)
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randint(len(rows), (n_latents,), generator=generator)
    noise = 0.1 * torch.randn(n_latents, rows.shape[1], generator=generator)  # distinct even where rows repeat
    directions = torch.nn.functional.normalize(rows[picked] - mean + noise, dim=-1)  # [n_latents, d_model]
    threshold = ((rows - mean) @ directions.t()).quantile(1 - firing, dim=0)  # [n_latents]
    config = saelens_config("standard", rows.shape[1], n_latents, {}, {"dictsweep": {"bench": True}})
    weights = {"W_enc": directions.t().contiguous(), "b_enc": -threshold, "W_dec": directions, "b_dec": mean}
    os.makedirs(folder, exist_ok=True)
    for name, data in dictionary_files(config, weights, torch.zeros(n_latents)).items():
        with open(os.path.join(folder, name), "wb") as file:
            file.write(data)
    return folder


def bench_inspect(
    uri: str, n_latents: int, tokens: int | None, batch_rows: int, device: str, firing: float, top: int
) -> dict:
    """Time the inspect pass (`scan`: every statistic, top and sampled rows) for one bench dictionary."""
    from dictsweep import load_dictionary
    from dictsweep.analysis.config import SAMPLES
    from dictsweep.analysis.scan import scan

    dataset = ActivationDataset.open(uri)
    with tempfile.TemporaryDirectory() as scratch:
        folder = bench_dictionary(os.path.join(scratch, f"bench-n{n_latents}"), dataset, n_latents, firing)
        result = scan({"bench": load_dictionary(folder)}, dataset, tokens, top, SAMPLES, batch_rows, device)
    fired = result.summaries["bench"].fire_count.sum() / max(result.rows * n_latents, 1)
    return {
        "n_latents": n_latents,
        "d_model": dataset.d_model,
        "rows": result.rows,
        "device": device,
        "batch_rows": batch_rows,
        "threads": torch.get_num_threads(),
        "firing_fraction": round(float(fired), 5),
        "pass_seconds": round(result.seconds, 3),
        "pass_rows_per_s": round(result.rows_per_s, 1),
        "pass_cpu_seconds": round(result.cpu_seconds, 3),
        "pass_rows_per_cpu_s": round(result.rows / max(result.cpu_seconds, 1e-9), 1),
        "pass_peak_rss_mb": round(result.peak_rss_mb, 1),
        "pass_peak_device_mb": round(result.peak_device_mb, 1),
    }
