"""Tokens: the tokenizer's template, the text packed into contexts, the eval hold-out and the blocks
of contexts the workers run."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from dictsweep.errors import InputError
from dictsweep.store.harvest.config import HarvestConfig
from dictsweep.store.harvest.text import iter_text

TOKENIZE_CHARS = 1 << 22  # characters tokenised in one batched tokenizer call


class Block(NamedTuple):
    """Contexts one worker runs, shuffles and writes as shards."""

    split: str  # "train" or "eval"
    index: int  # within the split
    seqs: np.ndarray  # [n_contexts] int64, ascending

    @property
    def key(self) -> str:
        return f"{self.split}-{self.index:05d}"


class Template(NamedTuple):
    """How the tokenizer frames one sequence, and which ids are special."""

    prefix: list[int]  # ids before the content ([CLS])
    suffix: list[int]  # ids after the content ([SEP])
    separator: int | None  # id after each document in the packed stream (eos, else sep)
    special_ids: list[int]  # ids left out of the rows by default
    pad_id: int  # id of padding in a batch (masked out)


def tokenizer_template(tokenizer) -> Template:
    """The tokenizer's single-sequence template and special ids, found by probing it."""
    content = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a", add_special_tokens=True)["input_ids"]
    prefix, suffix = [], []
    for start in range(len(framed) - len(content) + 1):
        if framed[start : start + len(content)] == content:
            prefix, suffix = framed[:start], framed[start + len(content) :]
            break
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    framing = {
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.sep_token_id,
        tokenizer.cls_token_id,
        tokenizer.pad_token_id,
    }
    # [UNK] stands for real text, so it is a row unless it doubles as a framing token (GPT-2)
    special = {int(i) for i in tokenizer.all_special_ids if i != tokenizer.unk_token_id or i in framing}
    special.update(prefix + suffix + ([separator] if separator is not None else []))
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    return Template(prefix, suffix, separator, sorted(special), int(pad_id))


def pack_contexts(config: HarvestConfig, tokenizer, template: Template) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [n + 1] int64, token ids [total] int32) of the packed contexts."""
    content_len = config.context - len(template.prefix) - len(template.suffix)
    if content_len < 1:
        raise InputError(
            f"--context {config.context}: the tokenizer adds "
            f"{len(template.prefix) + len(template.suffix)} template tokens to every context; "
            "use a longer context"
        )
    wanted = None  # content tokens needed for max_tokens
    if config.max_tokens is not None:
        full, rest = divmod(config.max_tokens, config.context)
        wanted = full * content_len + max(0, rest - (config.context - content_len))
        if wanted == 0:
            raise InputError(f"--max-tokens {config.max_tokens}: too few for one context with content")
    stream: list[np.ndarray] = []
    have = 0
    batch: list[tuple[str, bool]] = []
    chars = 0

    def tokenize() -> None:
        nonlocal have
        ids = tokenizer([text for text, _ in batch], add_special_tokens=False, verbose=False)["input_ids"]
        for (_, ends), piece in zip(batch, ids):
            if ends and template.separator is not None:
                piece = [*piece, template.separator]
            stream.append(np.asarray(piece, dtype=np.int32))
            have += len(piece)
        batch.clear()

    for text, ends in iter_text(config):
        batch.append((text, ends))
        chars += len(text)
        if chars >= TOKENIZE_CHARS or len(batch) >= 1024:
            tokenize()
            chars = 0
            if wanted is not None and have >= wanted:
                break
    if batch and (wanted is None or have < wanted):
        tokenize()
    tokens = np.concatenate(stream) if stream else np.empty(0, np.int32)
    if wanted is not None:
        tokens = tokens[:wanted]
    if len(tokens) == 0:
        raise InputError(f"--text {config.text}: no text to tokenise")
    n_contexts = math.ceil(len(tokens) / content_len)
    framed = []
    prefix = np.asarray(template.prefix, np.int32)
    suffix = np.asarray(template.suffix, np.int32)
    for start in range(0, len(tokens), content_len):
        framed += [prefix, tokens[start : start + content_len], suffix]
    lengths = np.full(n_contexts, config.context, dtype=np.int64)
    lengths[-1] = len(prefix) + len(tokens) - (n_contexts - 1) * content_len + len(suffix)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return offsets, np.concatenate(framed)


def eval_seqs(n_contexts: int, eval_fraction: float, seed: int) -> np.ndarray:
    """The contexts held out for eval (ascending): a seeded random choice, at least one if asked for."""
    n_eval = round(eval_fraction * n_contexts)
    if eval_fraction > 0:
        n_eval = min(max(n_eval, 1), n_contexts - 1)
    rng = np.random.default_rng([seed, 1])
    return np.sort(rng.choice(n_contexts, size=n_eval, replace=False)).astype(np.int64)


def make_blocks(n_contexts: int, config: HarvestConfig) -> list[Block]:
    """The train and eval contexts cut into blocks of about max(shuffle_rows, shard_rows) rows."""
    held_out = eval_seqs(n_contexts, config.eval_fraction, config.seed)
    train = np.setdiff1d(np.arange(n_contexts, dtype=np.int64), held_out)
    per_block = max(1, max(config.shuffle_rows, config.shard_rows) // config.context)
    return [
        Block(split, index, seqs[start : start + per_block])
        for split, seqs in (("train", train), ("eval", held_out))
        for index, start in enumerate(range(0, len(seqs), per_block))
    ]
