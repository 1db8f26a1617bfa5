"""Spliced evaluation: what replacing a hooked activation by a dictionary's reconstruction does to
the model's own output, over held-out text.

A dataset harvested from a model names it in its manifest (`source`: model, hook, context) and
keeps every context's token ids in `contexts/`; the eval split's contexts were never trained on.
For each batch of those contexts the model runs once clean, once with the hooked activation
zero-ablated, and once per dictionary with the activation replaced by the dictionary's
reconstruction (a forward hook on the module, found by `store.models.find_module`).

- Spliced positions: the positions that are rows of the dataset (special tokens such as [CLS],
  [SEP] and BOS are not, unless the harvest kept them): the dictionary only sees what it was
  trained on. Zero ablation replaces the same positions with zeros.
- Causal LMs (a `...ForCausalLM` / `...LMHeadModel` checkpoint): next-token cross-entropy in nats,
  over every target inside each context: `ce_clean`, `ce_spliced`, `ce_zero`.
- Other models (e.g. MiniLM, a BertModel without a head): KL(P_clean || P) in nats per token,
  averaged over non-padding positions, where P is the softmax of the model's vocabulary logits:
  the checkpoint's masked-LM head when the checkpoint holds its weights, otherwise the final
  hidden states projected onto the input word-embedding matrix (BERT's MLM decoder is tied to that
  matrix; the missing head's transform is left out): `kl_clean` (0), `kl_spliced`, `kl_zero`.
- loss_recovered = (zero - spliced) / (zero - clean): 1 when the splice changes nothing, 0 when it
  is as bad as erasing the activation.
- SAEBench's names of the same measures (its core eval): `kl_div_score`, `kl_div_with_sae`,
  `kl_div_with_ablation` (KL over every non-padding position, causal LMs too) and, for causal LMs,
  `ce_loss_score`, `ce_loss_with_sae`, `ce_loss_with_ablation`, `ce_loss_without_sae`.
- Transcoder datasets (`source.target_hook`): the transcoder reads the hook's output at the spliced
  positions and its output replaces the target hook's output there (e.g. an MLP's output computed
  from the MLP's input); zero ablation zeroes the target hook's output. The hook must run before the
  target hook (harvest checks it).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from dictsweep.errors import InputError
from dictsweep.store import fs
from dictsweep.store.contexts import read_seqs
from dictsweep.store.dataset import ActivationDataset
from dictsweep.store.models import first_output

LOGIT_BUDGET = 1 << 25  # logits (floats) per forward pass: contexts per batch = this / (context x vocab)


class SpliceSource(NamedTuple):
    """Where a harvested dataset's activations come from."""

    model: str
    hook: str
    context: int
    include_special: bool
    target_hook: str | None = None
    """A transcoder dataset's: the module whose output a transcoder replaces (`hook` is read)."""


def splice_source(dataset: ActivationDataset, transcoders: bool = False) -> SpliceSource | str:
    """The dataset's source model and hook(s), or why a spliced evaluation (of `transcoders`, or of
    SAEs, which are spliced at their own hook on any dataset) cannot run on it."""
    source = dataset.manifest.source or {}
    if dataset.manifest.ground_truth is not None or source.get("model") == "synthetic":
        return f"{dataset.uri} is synthetic: there is no model to splice a dictionary into"
    if not source.get("model") or not source.get("hook"):
        return f"{dataset.uri}/manifest.json names no source model and hook (`source.model`, `source.hook`)"
    if transcoders and not (dataset.d_target and source.get("target_hook")):  # nothing names what they replace
        return f"{dataset.uri}/manifest.json names no `source.target_hook` (and `d_target`) to splice transcoders at"
    if not fs.exists(fs.join(dataset.uri, "contexts")):
        return f"{dataset.uri} has no contexts/ (the token ids of its sequences)"
    return SpliceSource(
        source["model"],
        source["hook"],
        int(source.get("context") or 0),
        bool(source.get("include_special", False)),
        source.get("target_hook") if dataset.d_target else None,
    )


# -- held-out text ---------------------------------------------------------------------------------
def held_out_contexts(dataset: ActivationDataset, tokens: int) -> list[np.ndarray]:
    """Token ids of whole eval contexts, about `tokens` in all (at least one), lowest `seq` first.

    The eval split's contexts are the `seq` values of its rows; eval shards are read in order only
    until they name enough contexts, and contexts/ files only until those are found.
    """
    seqs: set[int] = set()
    context = int((dataset.manifest.source or {}).get("context") or 1)
    for index in range(len(dataset.shards("eval"))):
        _, columns = dataset.read_shard(index, "eval", columns=True)
        if "seq" not in columns:
            raise InputError(
                f"{dataset.uri}: eval shard {dataset.shards('eval')[index].path} has no `seq` "
                "column, so its rows cannot be traced to held-out text"
            )
        seqs.update(int(seq) for seq in np.unique(columns["seq"]))
        if len(seqs) * context >= tokens:
            break
    if not seqs:
        raise InputError(f"{dataset.uri}: the eval split is empty; a spliced evaluation needs held-out contexts")
    wanted = sorted(seqs)[: max(1, math.ceil(tokens / context))]
    found = read_seqs(dataset.uri, wanted)
    contexts, total = [], 0
    for seq in wanted:
        if total >= tokens:
            break
        contexts.append(found[seq])
        total += len(found[seq])
    return contexts


# -- the model and its loss ------------------------------------------------------------------------
class Readout:
    """The source model with the head its loss is read from (see the module doc)."""

    def __init__(self, name_or_path: str, device: str = "cpu"):
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM
        from transformers.utils import logging as hf_logging

        from dictsweep.store.models import from_pretrained, load_tokenizer

        hf_logging.disable_progress_bar()
        architectures = from_pretrained(AutoConfig, name_or_path, "config").architectures or []
        self.causal = any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures)
        self.kind = "ce" if self.causal else "kl"
        model, self.embeddings = None, None
        if self.causal:
            model = from_pretrained(AutoModelForCausalLM, name_or_path, "model", dtype=torch.float32)
            self.head = "causal LM head"
        elif any(name.endswith("ForMaskedLM") for name in architectures):
            model, info = from_pretrained(
                AutoModelForMaskedLM, name_or_path, "model", dtype=torch.float32, output_loading_info=True
            )
            model = None if info["missing_keys"] else model  # a head initialised at random reads out nothing
            self.head = "masked-LM head"
        tied = model is None
        if tied:
            model = from_pretrained(AutoModel, name_or_path, "model", dtype=torch.float32)
        self.model, self.device = model.to(device).eval(), device
        if tied:
            self.embeddings = self.model.get_input_embeddings().weight  # [vocab, d_model]
            self.head = "final hidden states x word embeddings (tied MLM-style logits)"
        self.tokenizer = load_tokenizer(name_or_path)

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Vocabulary logits `[B, T, vocab]` (float32)."""
        output = self.model(input_ids=input_ids, attention_mask=attention_mask)
        if self.embeddings is not None:
            return output.last_hidden_state.float() @ self.embeddings.float().t()
        return output.logits.float()

    def module(self, hook: str) -> torch.nn.Module:
        """The hooked module: hook paths name modules of the base model (as harvested)."""
        from dictsweep.store.models import find_module

        return find_module(self.model.base_model, hook)


class Reads:
    """What a transcoder reads: its hook module's output in the forward pass under way (`output`,
    None until the module has run in it)."""

    def __init__(self):
        self.output: Tensor | None = None

    def keep(self, _module, _args, output) -> None:
        self.output = first_output(output)


@contextmanager
def replaced(
    module: torch.nn.Module,
    positions: Tensor,
    replace: Callable[[Tensor], Tensor] | None,
    reads: Reads | None = None,
):
    """While open, the module's output at `positions [B, T]` (bool) is `replace(rows [n, d])` (zeros
    for None), where the rows are the module's own output there, or `reads.output` (a transcoder's)."""

    def hook(_module, _args, output):
        hidden = first_output(output)
        if reads is not None and reads.output is None:
            raise InputError("the target hook ran before the hook a transcoder reads: it cannot be spliced there")
        new = hidden.clone()
        rows = (hidden if reads is None else reads.output)[positions].float()
        if reads is not None:
            reads.output = None  # read once: the next forward pass must run the hook again first
        new[positions] = 0 if replace is None else replace(rows).to(hidden.dtype)
        if isinstance(output, (tuple, list)):
            return type(output)([new, *output[1:]])
        if hasattr(output, "to_tuple"):
            output[next(iter(output.keys()))] = new
            return output
        return new

    if reads is not None:
        reads.output = None  # from a forward pass before this one
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class Sums(NamedTuple):
    """A running loss: total (float64) and count."""

    total: float
    count: int

    def add(self, values: Tensor) -> Sums:
        return Sums(self.total + float(values.double().sum()), self.count + values.numel())

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")


class Losses(NamedTuple):
    """Mean losses over the scored positions (CE or KL as `Readout.kind` says)."""

    spliced: dict[str, float]
    """Per splice name."""
    clean: float
    zero: float
    """With the spliced positions zero-ablated."""
    tokens: int
    """Positions scored."""
    kl_spliced: dict[str, float] = {}
    """KL(P_clean || P_spliced) per splice name, over every non-padding position (causal LMs too)."""
    kl_zero: float = float("nan")


ZERO = object()  # the zero ablation's key among the splices (replaced by None: zeros): no name can collide with it


def splice_losses(
    readout: Readout,
    hook: str,
    contexts: list[np.ndarray],
    splices: dict[str, Callable],
    special_ids: list[int],
    pad_id: int,
    include_special: bool = False,
    target_hook: str | None = None,
) -> Losses:
    """Clean, zero-ablated and spliced losses over `contexts`, in batches; each value of `splices`
    maps the hooked rows `[n, d_model]` (float32) to their replacement; with `target_hook` (transcoders),
    to the replacement of the target hook's rows `[n, d_target]`."""
    module = readout.module(target_hook or hook)
    reads = Reads() if target_hook else None
    handle = readout.module(hook).register_forward_hook(reads.keep) if reads else None
    try:
        return _losses(readout, module, contexts, {ZERO: None, **splices}, special_ids, pad_id, include_special, reads)
    finally:
        if handle is not None:
            handle.remove()


def _losses(
    readout: Readout,
    module: torch.nn.Module,
    contexts: list[np.ndarray],
    splices: dict,
    special_ids: list[int],
    pad_id: int,
    include_special: bool,
    reads: Reads | None,
) -> Losses:
    """`splice_losses` once the modules are found (and a transcoder's input is being read)."""
    device = readout.device
    vocab = readout.model.get_input_embeddings().weight.shape[0]
    width = max(len(ids) for ids in contexts)
    per_batch = max(1, LOGIT_BUDGET // (width * vocab))
    sums = {name: Sums(0.0, 0) for name in splices}
    kl_sums = {name: Sums(0.0, 0) for name in splices}
    clean_sum = Sums(0.0, 0)
    special = np.asarray(special_ids, dtype=np.int64)
    for start in range(0, len(contexts), per_batch):
        batch = contexts[start : start + per_batch]
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, T]
        spliced = torch.zeros((len(batch), width), dtype=torch.bool)  # [B, T]: positions that are rows
        for i, ids in enumerate(batch):
            input_ids[i, : len(ids)] = torch.from_numpy(ids.astype(np.int64))
            attention_mask[i, : len(ids)] = 1
            keep = np.ones(len(ids), bool) if include_special else ~np.isin(ids, special)
            spliced[i, : len(ids)] = torch.from_numpy(keep)
        input_ids, attention_mask, spliced = input_ids.to(device), attention_mask.to(device), spliced.to(device)
        with torch.inference_mode():
            clean = readout.logits(input_ids, attention_mask).log_softmax(-1)  # [B, T, vocab]
            if readout.causal:
                targets = input_ids[:, 1:].unsqueeze(-1)  # [B, T-1, 1]
                scored = attention_mask[:, 1:].bool()  # a target inside its context
                clean_sum = clean_sum.add(-clean[:, :-1].gather(-1, targets).squeeze(-1)[scored])
            else:
                scored = attention_mask.bool()
                clean_sum = Sums(0.0, clean_sum.count + int(scored.sum()))  # KL of clean from itself
            clean_probs = clean.exp()
            for name, replace in splices.items():
                with replaced(module, spliced, replace, reads):
                    other = readout.logits(input_ids, attention_mask).log_softmax(-1)
                kl = (clean_probs * (clean - other)).sum(-1)[attention_mask.bool()]  # KL(P_clean || P) per position
                if readout.causal:
                    losses = -other[:, :-1].gather(-1, targets).squeeze(-1)[scored]
                else:
                    losses = kl
                sums[name] = sums[name].add(losses)
                kl_sums[name] = kl_sums[name].add(kl)
    zero, kl_zero = sums.pop(ZERO), kl_sums.pop(ZERO)
    return Losses(
        {name: total.mean for name, total in sums.items()},
        clean_sum.mean,
        zero.mean,
        clean_sum.count,
        {name: total.mean for name, total in kl_sums.items()},
        kl_zero.mean,
    )


def loss_recovered(clean: float, spliced: float, zero: float) -> float:
    """(zero - spliced) / (zero - clean): 1 = no harm, 0 = as bad as zero ablation (nan if zero == clean)."""
    return (zero - spliced) / (zero - clean) if zero != clean else float("nan")


class SpliceResult(NamedTuple):
    """A spliced evaluation: per dictionary its metrics, and how they were measured."""

    metrics: dict[str, dict[str, float]]
    """Per dictionary name: loss_recovered and {kind}_clean, {kind}_spliced, {kind}_zero."""
    kind: str
    """`ce` (causal LM) or `kl` (other models)."""
    head: str
    """Which logits the loss was read from."""
    tokens: int
    """Positions scored (CE targets or KL positions)."""
    contexts: int
    """Held-out contexts run."""


def splice_eval(
    dataset_uri: str, dictionaries: dict[str, str], tokens: int, device: str = "cpu", threads: int = 0
) -> SpliceResult:
    """Splice each dictionary (name -> folder or URI) into the dataset's source model over about
    `tokens` held-out tokens, with `threads` torch threads (0: every core here); InputError when the
    dataset or model does not allow it."""
    from dictsweep import load_dictionary
    from dictsweep.store.harvest.tokens import tokenizer_template

    torch.set_num_threads(threads or os.cpu_count() or 1)  # a Ray task gets one thread by default
    dataset = ActivationDataset.open(dataset_uri)
    modules = {name: load_dictionary(uri).to(device) for name, uri in dictionaries.items()}
    kinds = {name: module.architecture.endswith("transcoder") for name, module in modules.items()}
    if len(set(kinds.values())) > 1:
        raise InputError(
            f"{sorted(kinds, key=kinds.get)}: splice SAEs and transcoders separately (they replace other hooks)"
        )
    transcoders = any(kinds.values())
    source = splice_source(dataset, transcoders)
    if isinstance(source, str):
        raise InputError(source)
    for name, module in modules.items():
        check_fits(name, module, dataset)
    contexts = held_out_contexts(dataset, tokens)
    readout = Readout(source.model, device)
    template = tokenizer_template(readout.tokenizer)
    losses = splice_losses(
        readout,
        source.hook,
        contexts,
        {name: module.forward for name, module in modules.items()},
        template.special_ids,
        template.pad_id,
        source.include_special,
        source.target_hook if transcoders else None,
    )
    kind, clean, zero = readout.kind, losses.clean, losses.zero
    metrics = {
        name: {
            "loss_recovered": loss_recovered(clean, spliced, zero),
            f"{kind}_clean": clean,
            f"{kind}_spliced": spliced,
            f"{kind}_zero": zero,
            **saebench_names(losses, name, readout.causal),
        }
        for name, spliced in losses.spliced.items()
    }
    return SpliceResult(metrics, kind, readout.head, losses.tokens, len(contexts))


def saebench_names(losses: Losses, name: str, causal: bool) -> dict[str, float]:
    """The splice's measures of dictionary `name` as SAEBench's core eval names them."""
    kl, kl_zero = losses.kl_spliced[name], losses.kl_zero
    metrics = {
        "kl_div_score": loss_recovered(0.0, kl, kl_zero),
        "kl_div_with_sae": kl,
        "kl_div_with_ablation": kl_zero,
    }
    if causal:
        metrics |= {
            "ce_loss_score": loss_recovered(losses.clean, losses.spliced[name], losses.zero),
            "ce_loss_with_sae": losses.spliced[name],
            "ce_loss_with_ablation": losses.zero,
            "ce_loss_without_sae": losses.clean,
        }
    return metrics


def check_fits(name: str, dictionary, dataset: ActivationDataset) -> None:
    """InputError unless the dictionary reads the dataset's rows and writes what it replaces: the rows
    again (an SAE), or their target (a transcoder)."""
    d_in, d_out = dictionary.W_enc.shape[0], dictionary.W_dec.shape[1]
    transcoder = dictionary.architecture.endswith("transcoder")
    wanted = (dataset.d_model, dataset.d_target if transcoder else dataset.d_model)
    if (d_in, d_out) != wanted:
        raise InputError(
            f"{name}: {'a transcoder' if transcoder else 'an SAE'} of d_in={d_in}, d_out={d_out} cannot be "
            f"spliced for {dataset.uri}: it would read {wanted[0]} and replace {wanted[1]}"
        )
