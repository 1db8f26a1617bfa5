"""What a decoder direction is near: other latents of its dictionary, latents of another
dictionary (feature splitting across sizes), and the tokens it promotes through an embedding.

All are cosine or dot products computed in chunks of latents, so a 16k x 16k comparison never
holds more than `CHUNK_LATENTS` rows of it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

CHUNK_LATENTS = 1024  # latents compared per matmul


class Matches(NamedTuple):
    """For each latent of one dictionary, its best matches among another set of directions."""

    indices: Tensor
    """Latents (or tokens) matched, best first, `[n_latents, count]` int64."""
    scores: Tensor
    """Their cosine similarity (or logit), `[n_latents, count]` float32."""


def unit_rows(directions: Tensor) -> Tensor:
    """Rows scaled to unit length (zero rows stay zero), float32."""
    return torch.nn.functional.normalize(directions.float(), dim=-1)


def _best(queries: Tensor, keys: Tensor, count: int, exclude_self: bool = False) -> Matches:
    """Top `count` of queries @ keys.T per query row, chunk by chunk."""
    count = min(count, keys.shape[0] - int(exclude_self))
    indices, scores = [], []
    for start in range(0, queries.shape[0], CHUNK_LATENTS):
        block = queries[start : start + CHUNK_LATENTS] @ keys.t()  # [chunk, n_keys]
        if exclude_self:
            rows = torch.arange(block.shape[0], device=block.device)
            block[rows, rows + start] = -torch.inf
        values, index = block.topk(max(count, 0), dim=1)
        indices.append(index)
        scores.append(values)
    return Matches(torch.cat(indices).cpu(), torch.cat(scores).cpu())


def nearest_latents(W_dec: Tensor, count: int) -> Matches:
    """Each latent's `count` nearest other latents of the same dictionary by decoder cosine."""
    unit = unit_rows(W_dec)  # [n_latents, d_model]
    return _best(unit, unit, count, exclude_self=True)


def feature_matches(sae_a, sae_b, count: int = 1) -> Matches:
    """For each latent of `sae_a`, the `count` latents of `sae_b` with the most similar decoder
    direction (cosine), best first: where a feature of a small dictionary went in a larger one."""
    W_a, W_b = sae_a.W_dec.detach(), sae_b.W_dec.detach()
    if W_a.shape[1] != W_b.shape[1]:
        raise ValueError(f"the dictionaries read different widths: d_in {W_a.shape[1]} and {W_b.shape[1]}")
    return _best(unit_rows(W_a), unit_rows(W_b.to(W_a.device)), count)


def token_effects(W_dec: Tensor, embedding: Tensor, count: int) -> tuple[Matches, Matches]:
    """(promoted, suppressed): the tokens whose embedding has the largest and the smallest dot
    product with each latent's unit decoder direction: its direct effect on the output logits
    when the model's output embedding is (tied to) `embedding` `[vocab, d_model]`."""
    unit = unit_rows(W_dec)
    keys = embedding.detach().float().to(unit.device)
    count = min(count, keys.shape[0])
    top, bottom = ([], []), ([], [])
    for start in range(0, unit.shape[0], CHUNK_LATENTS):
        logits = unit[start : start + CHUNK_LATENTS] @ keys.t()  # [chunk, vocab]: one matmul for both ends
        for found, largest in ((top, True), (bottom, False)):
            values, index = logits.topk(count, dim=1, largest=largest)
            found[0].append(index)
            found[1].append(values)
    return tuple(Matches(torch.cat(indices).cpu(), torch.cat(scores).cpu()) for indices, scores in (top, bottom))


def output_embedding(model) -> Tensor | None:
    """The model's output embedding `[vocab, d_model]`: its own, else its input embedding when the
    config ties them (BERT, MiniLM); None for models with neither."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and getattr(output, "weight", None) is not None:
        return output.weight
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "get_input_embeddings"):
        return model.get_input_embeddings().weight
    return None
