"""`top_contexts`: the rows on which one latent fires most, with their token windows."""

from __future__ import annotations

from typing import NamedTuple

import torch

from dictsweep.analysis.contexts import Request, Source, windows
from dictsweep.analysis.scan import iter_batches, row_key_position
from dictsweep.analysis.stats import NO_ROW, LatentStats
from dictsweep.errors import InputError
from dictsweep.store.dataset import ActivationDataset


class TopContext(NamedTuple):
    """One of a latent's top-activating rows."""

    act: float
    """The latent's activation on the row."""
    seq: int | None
    """The row's context (None when the rows carry no seq/pos)."""
    pos: int | None
    """The row's position in its context."""
    tokens: list[str]
    """Tokens of a window around the row (empty without `contexts/`)."""
    token_acts: list[float]
    """The latent's activation at each of them (NaN where unknown: no source model)."""
    center: int
    """Index of the row's own token in `tokens`."""


def top_contexts(
    sae, dataset, latent: int, top: int = 10, tokens: int | None = None, batch_rows: int = 1024, device: str = "cpu"
) -> list[TopContext]:
    """The `top` rows of `dataset` (an ActivationDataset or its URI; at most `tokens` train rows) on
    which latent `latent` of `sae` (a loaded dictionary or its path) is largest, best first."""
    from dictsweep import load_dictionary

    sae = load_dictionary(sae) if isinstance(sae, str) else sae
    dataset = ActivationDataset.open(dataset) if isinstance(dataset, str) else dataset
    d_in, n_latents = sae.W_enc.shape  # what it reads (a transcoder writes another width)
    if not 0 <= latent < n_latents:
        raise InputError(f"latent {latent}: the dictionary has latents 0 to {n_latents - 1}")
    if d_in != dataset.d_model:
        raise InputError(f"the dictionary has d_in={d_in} but dataset {dataset.uri} has d_model={dataset.d_model}")
    stats = LatentStats(1, top, 0, device)
    sae, positions = sae.to(device), True
    with torch.inference_mode():
        for batch in iter_batches(dataset, tokens, batch_rows, device):
            positions = positions and batch.positions
            stats.add(sae.encode(batch.acts)[:, latent : latent + 1], batch.row_keys)  # [B, 1]
    summary = stats.summary()
    keep = summary.top_rows[0] != NO_ROW
    values, rows = summary.top_values[0][keep], summary.top_rows[0][keep]
    if not positions:
        return [TopContext(float(value), None, None, [], [], 0) for value in values]
    source = Source(dataset, device)
    if source.contexts is None:
        seqs, positions = row_key_position(rows)
        return [TopContext(float(v), int(s), int(p), [], [], 0) for v, s, p in zip(values, seqs, positions)]
    seqs, positions = row_key_position(rows)
    requests = [Request(latent, int(seq), int(pos), float(value)) for seq, pos, value in zip(seqs, positions, values)]
    found = windows(source, {"sae": requests}, {"sae": sae}, device)["sae"]
    return [
        TopContext(
            request.value,
            request.seq,
            request.pos,
            source.token_strings(window.token_ids),
            window.acts.tolist(),
            window.center,
        )
        for request, window in zip(requests, found)
    ]
