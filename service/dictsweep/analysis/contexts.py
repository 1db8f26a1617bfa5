"""Token windows around activation rows, with every token's activation of the latent.

The harvest's rows carry `seq` and `pos` and its prefix holds `contexts/` (the token ids of every
context), so a row maps back to its tokens. Rows are shuffled across shards, so the neighbours of
a top row are not at hand in the pass: the source model is run once more on just the contexts the
windows need (stopping at the hook) and each dictionary encodes them. Without a loadable source
model a window shows its tokens with only the row's own activation.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from dictsweep.errors import DictsweepError
from dictsweep.sae.export import Dictionary
from dictsweep.store import fs
from dictsweep.store.dataset import ActivationDataset
from dictsweep.store.harvest import read_contexts

WINDOW_BEFORE, WINDOW_AFTER = 12, 4  # tokens shown before and after the row's own token
FORWARD_CONTEXTS = 16  # contexts per forward pass of the source model


class Source:
    """What a dataset says about where its rows came from: contexts, model, tokenizer (each may be None)."""

    def __init__(self, dataset: ActivationDataset, device: torch.device | str, load_model: bool = True):
        self.notes: list[str] = []
        self.contexts: list[np.ndarray] | None = None
        self.model = self.tokenizer = None
        self.hook = (dataset.manifest.source or {}).get("hook")
        if fs.exists(fs.join(dataset.uri, "contexts")):
            self.contexts = read_contexts(dataset.uri)
        else:
            self.notes.append(
                f"{dataset.uri} has no contexts/ (synthetic or not harvested here): no contexts and no token effects"
            )
            return
        name = (dataset.manifest.source or {}).get("model")
        if not name or not load_model:
            self.notes.append("the manifest names no source model: windows show only each row's own activation")
            return
        from dictsweep.store.models import load_model as load

        try:
            self.model, self.tokenizer = load(name, str(device))
        except (DictsweepError, OSError, ValueError, ImportError) as error:
            self.notes.append(
                f"source model {name} could not be loaded ({str(error).splitlines()[0][:200]}): "
                "windows show only each row's own activation; no token effects"
            )

    def token_strings(self, token_ids: np.ndarray) -> list[str]:
        """How the tokenizer writes each id (the id itself without a tokenizer)."""
        ids = [int(i) for i in token_ids]
        if self.tokenizer is None:
            return [f"<{i}>" for i in ids]
        return [str(token) for token in self.tokenizer.convert_ids_to_tokens(ids)]


class Window(NamedTuple):
    """Tokens around one row and the latent's activation at each."""

    token_ids: np.ndarray  # [w] int32
    acts: np.ndarray  # [w] float32; NaN where unknown (no source model)
    center: int  # index of the row's own token in the window
    seq: int  # the row's context
    pos: int  # the row's position in it
    act: float  # the latent's activation on the row, as the pass read it from the dataset


class Request(NamedTuple):
    """A window wanted: latent `latent` at token `pos` of context `seq`, which the pass saw at `value`."""

    latent: int
    seq: int
    pos: int
    value: float


def window_span(length: int, pos: int) -> tuple[int, int]:
    return max(0, pos - WINDOW_BEFORE), min(length, pos + WINDOW_AFTER + 1)


def windows(
    source: Source, requests: dict[str, list[Request]], dictionaries: dict[str, Dictionary], device: torch.device | str
) -> dict[str, list[Window]]:
    """Each dictionary's windows, in the order of its requests."""
    contexts = source.contexts
    out: dict[str, list[Window | None]] = {name: [None] * len(wanted) for name, wanted in requests.items()}
    for name, wanted in requests.items():
        for index, request in enumerate(wanted):
            start, stop = window_span(len(contexts[request.seq]), request.pos)
            acts = np.full(stop - start, np.nan, dtype=np.float32)
            acts[request.pos - start] = request.value
            out[name][index] = Window(
                contexts[request.seq][start:stop].astype(np.int32),
                acts,
                request.pos - start,
                request.seq,
                request.pos,
                request.value,
            )
    if source.model is None:
        return out
    from dictsweep.store.models import capture_outputs

    seqs = sorted({request.seq for wanted in requests.values() for request in wanted})
    by_seq: dict[str, dict[int, list[int]]] = {name: {} for name in requests}
    for name, wanted in requests.items():
        for index, request in enumerate(wanted):
            by_seq[name].setdefault(request.seq, []).append(index)
    models = {name: sae.to(device) for name, sae in dictionaries.items()}
    with capture_outputs(source.model, [source.hook]) as capture, torch.inference_mode():
        for first in range(0, len(seqs), FORWARD_CONTEXTS):
            chunk = seqs[first : first + FORWARD_CONTEXTS]
            width = max(len(contexts[seq]) for seq in chunk)
            input_ids = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, T]; 0 = padding, masked
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, T]
            for slot, seq in enumerate(chunk):
                input_ids[slot, : len(contexts[seq])] = torch.from_numpy(contexts[seq].astype(np.int64))
                attention_mask[slot, : len(contexts[seq])] = 1
            hidden = capture.run(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
            hidden = hidden[source.hook].float()  # [B, T, d_model]
            for name, sae in models.items():
                wanted = [index for seq in chunk for index in by_seq[name].get(seq, ())]
                if not wanted:
                    continue
                latents = sae.encode(hidden)  # [B, T, n_latents]: one chunk of contexts only
                slot_of = {seq: slot for slot, seq in enumerate(chunk)}
                slots = torch.tensor([slot_of[requests[name][i].seq] for i in wanted])  # [R]
                starts = torch.tensor([requests[name][i].pos - out[name][i].center for i in wanted])  # [R]
                latent_ids = torch.tensor([requests[name][i].latent for i in wanted])  # [R]
                positions = (starts[:, None] + torch.arange(WINDOW_BEFORE + WINDOW_AFTER + 1)).clamp(max=width - 1)
                values = (
                    latents[slots[:, None].to(device), positions.to(device), latent_ids[:, None].to(device)]
                    .cpu()
                    .numpy()
                )  # [R, window]: one copy per chunk
                for row, index in enumerate(wanted):
                    window = out[name][index]
                    out[name][index] = window._replace(acts=values[row, : len(window.token_ids)].copy())
    return out
