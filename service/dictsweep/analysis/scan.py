"""One streamed pass over an activation dataset that feeds every dictionary's statistics.

A plain loop over the shards rather than Ray actors: the pass is bound by the encoder matmuls and
the top-N merges on one device, so a thread that fetches and verifies the next shards while the
device works is all the overlap it needs; every decoded batch is shared by all the dictionaries in
this process, and nothing is copied through an object store.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

from dictsweep.analysis.stats import LatentStats, Summary
from dictsweep.sae.export import Dictionary
from dictsweep.store.dataset import ActivationDataset, Split

POS_BITS = 20  # a row key is seq << POS_BITS | pos when the rows carry seq and pos
PREFETCH_SHARDS = 2  # shards fetched and checked ahead of the one being computed on


class Batch(NamedTuple):
    """Rows of the dataset on the device of the pass."""

    acts: torch.Tensor
    """Activations, `[B, d_model]` float32."""
    row_keys: torch.Tensor
    """`seq << POS_BITS | pos` of each row (its place in `contexts/`), else its index in the pass, `[B]`."""
    positions: bool
    """Whether the row keys are (seq, pos): the shard has `seq` and `pos` columns."""


class ScanResult(NamedTuple):
    """Each dictionary's statistics and what the pass cost."""

    summaries: dict[str, Summary]
    rows: int
    keys_are_positions: bool  # whether row keys are (seq, pos) (the rows carry seq and pos)
    seconds: float
    cpu_seconds: (
        float  # this process's CPU time during the pass (all threads): steadier than wall time on a busy machine
    )
    rows_per_s: float
    peak_rss_mb: float
    peak_device_mb: float  # CUDA memory at its peak, 0 on CPU


def row_key_position(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(seq, pos) of row keys made from positions."""
    keys = np.asarray(keys, dtype=np.int64)
    return keys >> POS_BITS, keys & ((1 << POS_BITS) - 1)


def iter_batches(
    dataset: ActivationDataset,
    max_rows: int | None,
    batch_rows: int,
    device: torch.device | str,
    split: Split = "train",
) -> Iterator[Batch]:
    """The split's rows in manifest order (at most `max_rows`), every shard read once, next shards
    fetched in a background thread."""
    shards = dataset.shards(split)
    limit = dataset.n_rows if split == "train" else dataset.n_eval_rows
    limit = min(limit, max_rows) if max_rows else limit
    needed, rows_seen = [], 0
    for index, info in enumerate(shards):
        if rows_seen >= limit:
            break
        needed.append(index)
        rows_seen += info.rows
    rows_seen = 0
    with ThreadPoolExecutor(max_workers=PREFETCH_SHARDS) as pool:
        pending = [pool.submit(dataset.read_shard_bytes, index, split) for index in needed[:PREFETCH_SHARDS]]
        for position, index in enumerate(needed):
            data = pending[position].result()
            if position + PREFETCH_SHARDS < len(needed):
                pending.append(pool.submit(dataset.read_shard_bytes, needed[position + PREFETCH_SHARDS], split))
            pending[position] = None  # the bytes go once decoded
            acts, columns = dataset.decode(data, index, split, columns=True)  # [rows, d_model]
            take = min(len(acts), limit - rows_seen)
            positions = "seq" in columns and "pos" in columns
            if positions:
                keys = (columns["seq"].astype(np.int64) << POS_BITS) | columns["pos"].astype(np.int64)
            else:
                keys = np.arange(rows_seen, rows_seen + len(acts), dtype=np.int64)
            for start in range(0, take, batch_rows):
                stop = min(start + batch_rows, take)
                yield Batch(
                    acts[start:stop].to(device, torch.float32, non_blocking=True),
                    torch.from_numpy(keys[start:stop]).to(device),
                    positions,
                )
            rows_seen += take


def scan(
    dictionaries: dict[str, Dictionary],
    dataset: ActivationDataset,
    max_rows: int | None,
    top: int,
    samples: int,
    batch_rows: int,
    device: torch.device | str,
    seed: int = 0,
) -> ScanResult:
    """Each dictionary's per-latent statistics over one pass of the dataset's train rows."""
    stats = {name: LatentStats(sae.W_dec.shape[0], top, samples, device, seed) for name, sae in dictionaries.items()}
    models = {name: sae.to(device) for name, sae in dictionaries.items()}
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    started, cpu_started, rows, positions = time.perf_counter(), time.process_time(), 0, True
    with torch.inference_mode():
        for batch in iter_batches(dataset, max_rows, batch_rows, device):
            positions = positions and batch.positions
            for name, sae in models.items():
                stats[name].add(sae.encode(batch.acts), batch.row_keys)  # [B, n_latents] lives for one batch
            rows += len(batch.acts)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    peak_device = torch.cuda.max_memory_allocated(device) / 2**20 if str(device).startswith("cuda") else 0.0
    return ScanResult(
        {name: value.summary() for name, value in stats.items()},
        rows,
        positions and rows > 0,
        seconds,
        cpu_seconds,
        rows / seconds if seconds > 0 else 0.0,
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        peak_device,
    )
