"""`dictsweep harvest`: a Hugging Face model's activations at named modules, as activation datasets.

The driver reads the text, tokenises it, packs it into contexts, holds out eval contexts, writes
`contexts/` and a plan, runs blocks of contexts on workers (in this process, or Ray actors), and
writes each hook's manifest last.

- Packing: documents are concatenated into one token stream, each followed by the tokenizer's
  end token (eos, else sep: `[SEP]` for BERT, `<|endoftext|>` for GPT-2); the stream is cut into
  pieces of `context - n_template` tokens, each wrapped in the tokenizer's single-sequence
  template (`[CLS] .. [SEP]` for BERT, `<s> ..` for Llama, nothing for GPT-2). Every context is
  full but the last, which is padded in its batch.
- Rows: one per position of a context. Special tokens (template, separators) are left out unless
  `include_special`; padding is never a row (it has no token in `contexts/`). `seq` is the
  context's index, `pos` the position in it: `contexts[seq][pos] == token_id`.
- Blocks and shuffling: the train and eval contexts are cut into blocks of about
  max(`shuffle_rows`, `shard_rows`) rows; a worker runs a whole block, permutes its rows (seeded by seed, split, block) and writes
  them as shards `train/<block>-<k>.arrow` of at most `shard_rows` rows. Names come from the block,
  not the worker, so parallel workers never collide and a rerun may use any number of workers.
  With several hooks every hook's shard k holds the same tokens in the same order.
- Resume: after each shard a worker rewrites `_harvest/<split>-<block>.json` (finished shards,
  checksums, the block's context range). A rerun with the same settings skips finished blocks
  and writes only the missing shards of a partly finished block; manifests come last.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeRemainingColumn)
from rich.text import Text

from dictsweep.cluster import start_ray
from dictsweep.config import distinct
from dictsweep.errors import DictsweepError, InputError, RunError, option_errors

if TYPE_CHECKING:
    import torch

    from dictsweep.store.manifest import Manifest

# torch, transformers and ray are imported inside functions: the CLI imports HarvestConfig for its help
WORK_DIR = "_harvest"  # plan and per-block progress; removed once the manifests are written
CONTEXT_FILE_TOKENS = 1 << 22  # tokens per contexts/ file (16 MiB of int32)
TEXT_PIECE_CHARS = 1 << 20  # a text file is read and tokenised in pieces of about this many characters
TOKENIZE_CHARS = 1 << 22  # characters tokenised in one batched tokenizer call
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
PLAN_KEYS = ("model", "hooks", "text", "text_field", "text_split", "context", "max_tokens", "dtype",
             "seed", "eval_fraction", "shard_rows", "shuffle_rows", "include_special")
SPLIT_IDS = {"train": 0, "eval": 1}


class HarvestConfig(BaseModel):
    """What `dictsweep harvest` reads, runs and writes."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Hugging Face model: a local folder, or a hub name (cached, or fetched where the hub is reachable).")
    hooks: list[str] = Field(min_length=1, description="Module paths whose outputs are harvested, e.g. encoder.layer.3 (first element of a tuple output).")
    text: str = Field(description="Text: a .txt file, a JSONL file (one document per line), a folder of them, a saved `datasets` folder, or a Hugging Face dataset name (NAME or NAME:CONFIG).")
    out: str = Field(description="Dataset prefix (folder, file:// or s3://); with several hooks each goes to <out>/<hook>/.")
    context: int = Field(256, gt=1, description="Tokens per context (template tokens such as [CLS]/[SEP] included).")
    max_tokens: int | None = Field(None, gt=0, description="Most tokens fed to the model (contexts' tokens, train and eval); default: all of the text.")
    dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="Stored dtype, and the model's dtype on GPU (on CPU the model runs in float32).")
    seed: int = Field(0, ge=0, description="Seed of the eval hold-out and of the row shuffle.")
    eval_fraction: float = Field(0.02, ge=0, lt=1, description="Fraction of contexts held out, whole, as the eval split.")
    shard_rows: int = Field(65_536, gt=0, description="Most rows per shard file.")
    shuffle_rows: int = Field(262_144, gt=0, description="Rows shuffled together before they are written (a block of contexts; memory: rows x d_model x dtype bytes per hook).")
    batch_size: int = Field(32, gt=0, description="Contexts per forward pass.")
    include_special: bool = Field(False, description="Also store rows at special tokens ([CLS], [SEP], BOS/EOS separators).")
    text_field: str = Field("text", description="Field holding the text in JSONL records and datasets.")
    text_split: str = Field("train", description="Split of a Hugging Face dataset.")
    workers: int = Field(0, ge=0, description="Workers (Ray actors); 0 = one per GPU, or 1 on CPU. One worker without --address runs in this process.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs: cuda, cpu, or cuda where available (auto).")
    address: str | None = Field(None, description="Ray cluster address; default: a local Ray when more than one worker is needed.")

    @field_validator("hooks")
    @classmethod
    def _distinct(cls, hooks: list[str]) -> list[str]:
        return distinct(hooks, "hook(s)")

    @classmethod
    def from_cli(cls, **values) -> HarvestConfig:
        """The config from CLI options; InputError names each wrong option (`--max-tokens`)."""
        try:
            return cls(**values)
        except ValidationError as error:
            raise option_errors(error, _option) from None

    def plan_settings(self) -> dict:
        """The settings that decide the dataset's contents (a rerun must match them to resume)."""
        return {key: getattr(self, key) for key in PLAN_KEYS}


def _option(field: str) -> str:
    """The CLI option of a config field: `max_tokens` -> `--max-tokens`, `hooks` -> `--hook`."""
    field = field.split(".")[0]  # a list item's error names its list
    return "--hook" if field == "hooks" else "--" + field.replace("_", "-")


class Block(NamedTuple):
    """Contexts one worker runs, shuffles and writes as shards."""

    split: str  # "train" or "eval"
    index: int  # within the split
    seqs: np.ndarray  # [n_contexts] int64, ascending

    @property
    def key(self) -> str:
        return f"{self.split}-{self.index:05d}"


class HarvestResult(NamedTuple):
    """What a harvest wrote."""

    manifests: dict[str, Manifest]  # hook -> its dataset's manifest
    prefixes: dict[str, str]  # hook -> its dataset's prefix
    n_contexts: int  # contexts in the plan (train and eval)
    tokens: int  # tokens fed to the model by this run (less after a resume)
    seconds: float  # wall time of this run's workers: model loading, forward passes, writes
    tokens_per_s: float  # forward-and-write rate once the workers had loaded the model


# ---------------------------------------------------------------- text and tokens

def iter_text(config: HarvestConfig) -> Iterator[tuple[str, bool]]:
    """(piece of text, whether a document ends with it), over the whole text source."""
    path = os.path.expanduser(config.text)
    if os.path.isdir(path) and _is_saved_dataset(path):
        yield from _dataset_text(config, path)
    elif os.path.isdir(path):
        files = sorted(os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names
                       if name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES) and not name.startswith("."))
        if not files:
            raise InputError(f"--text {config.text}: the folder holds no "
                             f"{', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files")
        for name in files:
            yield from _file_text(name, config.text_field)
    elif os.path.isfile(path):
        yield from _file_text(path, config.text_field)
    else:
        yield from _dataset_text(config, None)


def check_text_source(config: HarvestConfig) -> None:
    """InputError at once for a --text that names a missing local file or folder."""
    path = os.path.expanduser(config.text)
    looks_like_path = config.text.startswith((".", "/", "~")) or path.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)
    if looks_like_path and not os.path.exists(path):
        raise InputError(f"--text {config.text}: no such file or folder")


def _is_saved_dataset(path: str) -> bool:
    return os.path.exists(os.path.join(path, "dataset_info.json")) or \
        os.path.exists(os.path.join(path, "state.json"))


def _file_text(path: str, text_field: str) -> Iterator[tuple[str, bool]]:
    """A text file as one document (in pieces cut at line ends), or a JSONL file's records."""
    try:
        with open(path, encoding="utf-8") as file:
            if path.endswith(JSONL_SUFFIXES):
                for number, line in enumerate(file, 1):
                    where = f"{path}:{number}"
                    text = _record_text(json.loads(line), text_field, where) if line.strip() else ""
                    if text.strip():  # an empty document would only add a separator
                        yield text, True
                return
            piece: list[str] = []
            size = 0
            for line in file:
                piece.append(line)
                size += len(line)
                if size >= TEXT_PIECE_CHARS:
                    yield "".join(piece), False
                    piece, size = [], 0
            yield "".join(piece), True
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"--text {path}: not UTF-8 text or not JSON lines ({error})") from None
    except OSError as error:
        raise InputError(f"--text {path}: cannot read ({error})") from None


def _record_text(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise InputError(f"--text {where}: expected a JSON object with a string field "
                         f"{text_field!r} (set --text-field)")
    return record[text_field]


def _dataset_text(config: HarvestConfig, saved: str | None) -> Iterator[tuple[str, bool]]:
    """The documents of a saved `datasets` folder or of a Hugging Face dataset name."""
    try:
        import datasets
    except ImportError:
        raise InputError(f"--text {config.text}: no such file or folder (and the `datasets` "
                         "package, needed for dataset names, is not installed)") from None
    try:
        if saved is not None:
            data = datasets.load_from_disk(saved)
            if isinstance(data, datasets.DatasetDict):
                data = data[config.text_split]
        else:
            name, _, subset = config.text.partition(":")
            data = datasets.load_dataset(name, subset or None, split=config.text_split)
    except Exception as error:  # datasets raises many types (FileNotFoundError, ConnectionError, ...)
        raise InputError(f"--text {config.text}: not a local file or folder, and the Hugging Face "
                         f"dataset could not be loaded ({type(error).__name__}: {error}); check the "
                         "path or name, or download the dataset first") from None
    if config.text_field not in data.column_names:
        raise InputError(f"--text {config.text}: no column {config.text_field!r} (columns: "
                         f"{', '.join(data.column_names)}; set --text-field)")
    for batch in data.iter(batch_size=1024):
        for text in batch[config.text_field]:
            if text and text.strip():
                yield text, True


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
        if framed[start:start + len(content)] == content:
            prefix, suffix = framed[:start], framed[start + len(content):]
            break
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    framing = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.sep_token_id,
               tokenizer.cls_token_id, tokenizer.pad_token_id}
    # [UNK] stands for real text, so it is a row unless it doubles as a framing token (GPT-2)
    special = {int(i) for i in tokenizer.all_special_ids
               if i != tokenizer.unk_token_id or i in framing}
    special.update(prefix + suffix + ([separator] if separator is not None else []))
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    return Template(prefix, suffix, separator, sorted(special), int(pad_id))


def pack_contexts(config: HarvestConfig, tokenizer, template: Template) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [n + 1] int64, token ids [total] int32) of the packed contexts."""
    content_len = config.context - len(template.prefix) - len(template.suffix)
    if content_len < 1:
        raise InputError(f"--context {config.context}: the tokenizer adds "
                         f"{len(template.prefix) + len(template.suffix)} template tokens to every context; "
                         "use a longer context")
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
        framed += [prefix, tokens[start:start + content_len], suffix]
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
    return [Block(split, index, seqs[start:start + per_block])
            for split, seqs in (("train", train), ("eval", held_out))
            for index, start in enumerate(range(0, len(seqs), per_block))]


# ---------------------------------------------------------------- contexts/ files

def write_contexts(prefix: str, offsets: np.ndarray, tokens: np.ndarray, per_file: int) -> None:
    """`contexts/NNNNN.arrow` under `prefix`: columns seq (int64), token_ids (list<int32>)."""
    import pyarrow as pa

    from dictsweep.store import fs

    n_contexts = len(offsets) - 1
    for file_index, first in enumerate(range(0, n_contexts, per_file)):
        last = min(first + per_file, n_contexts)
        local = (offsets[first:last + 1] - offsets[first]).astype(np.int32)
        token_ids = pa.ListArray.from_arrays(pa.array(local), pa.array(tokens[offsets[first]:offsets[last]]))
        batch = pa.record_batch([pa.array(np.arange(first, last, dtype=np.int64)), token_ids],
                                names=["seq", "token_ids"])
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
        fs.write_bytes(fs.join(prefix, "contexts", f"{file_index:05d}.arrow"), sink.getvalue().to_pybytes())


def read_context_file(uri: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seqs [n] int64, offsets [n + 1], token ids) of one contexts/ file."""
    import pyarrow as pa

    from dictsweep.store import fs

    table = pa.ipc.open_file(pa.py_buffer(fs.read_bytes(uri))).read_all()
    token_ids = table.column("token_ids").combine_chunks()
    return (table.column("seq").to_numpy(), token_ids.offsets.to_numpy().astype(np.int64),
            token_ids.values.to_numpy())


def read_contexts(prefix: str) -> list[np.ndarray]:
    """Every context's token ids, indexed by seq: `read_contexts(uri)[seq][pos]` is a row's token."""
    from dictsweep.store import fs

    filesystem, path = fs.resolve(fs.join(prefix, "contexts"))
    contexts: list[np.ndarray] = []
    for name in sorted(filesystem.glob(path.rstrip("/") + "/*.arrow")):
        seqs, offsets, tokens = read_context_file(fs.join(prefix, "contexts", os.path.basename(name)))
        if len(seqs) and seqs[0] != len(contexts):
            raise InputError(f"{prefix}/contexts/{os.path.basename(name)} starts at seq {seqs[0]}, "
                             f"expected {len(contexts)}: a contexts file is missing")
        contexts += [tokens[offsets[i]:offsets[i + 1]] for i in range(len(seqs))]
    return contexts


# ---------------------------------------------------------------- workers

def shard_path(block: Block, shard: int) -> str:
    return f"{block.split}/{block.index:05d}-{shard:03d}.arrow"


class BlockHarvester:
    """One worker: loads the model once, then runs blocks (in this process or as a Ray actor)."""

    def __init__(self, config: HarvestConfig, plan: dict, prefixes: dict[str, str], device: str,
                 threads: int = 0):
        self.config, self.plan, self.prefixes, self.device = config, plan, prefixes, device
        self.threads = threads
        self._model = None
        self._files: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _load(self) -> None:
        import torch

        from dictsweep.store.models import load_model

        if self.threads:
            torch.set_num_threads(self.threads)
        model_dtype = self.config.dtype if self.device.startswith("cuda") else "float32"
        self._model, _ = load_model(self.config.model, self.device, model_dtype)

    def _context(self, seq: int) -> np.ndarray:
        """Token ids of context `seq`, from its contexts/ file (the last two files are kept)."""
        from dictsweep.store import fs

        file_index, row = divmod(int(seq), self.plan["contexts_per_file"])
        if file_index not in self._files:
            if len(self._files) >= 2:
                self._files.pop(next(iter(self._files)))
            uri = fs.join(next(iter(self.prefixes.values())), "contexts", f"{file_index:05d}.arrow")
            self._files[file_index] = read_context_file(uri)
        _, offsets, tokens = self._files[file_index]
        return tokens[offsets[row]:offsets[row + 1]]

    def run_block(self, block: Block) -> Iterator[dict]:
        """Forward the block's contexts, shuffle its rows, write its missing shards.

        Yields {"tokens": n} after each forward batch and {"shard": k} after each shard.
        """
        import torch

        from dictsweep.store import fs
        from dictsweep.store.dataset import sum_sq_norms, write_shard

        if self._model is None:
            self._load()
        config = self.config
        progress_uri = fs.join(self.plan["root"], WORK_DIR, f"{block.key}.json")
        record = _read_json(progress_uri) or {
            "split": block.split, "block": block.index, "seq_first": int(block.seqs[0]),
            "seq_last": int(block.seqs[-1]), "n_contexts": len(block.seqs), "shards": []}
        contexts = [self._context(seq) for seq in block.seqs]
        special = np.asarray(self.plan["special_ids"], dtype=np.int32)
        keeps = [np.ones(len(ids), bool) if config.include_special else ~np.isin(ids, special)
                 for ids in contexts]  # the positions that become rows
        columns = {"seq": np.repeat(block.seqs, [keep.sum() for keep in keeps]),
                   "pos": np.concatenate([np.flatnonzero(keep) for keep in keeps]).astype(np.int32),
                   "token_id": np.concatenate([ids[keep] for ids, keep in zip(contexts, keeps)]).astype(
                       np.int32)}
        buffers: dict[str, torch.Tensor] = {}  # hook -> [n_rows, d_model] in the stored dtype
        yield from self._forward(contexts, keeps, buffers)

        n_rows = len(columns["seq"])
        record |= {"rows": n_rows, "n_shards": math.ceil(n_rows / config.shard_rows),
                   "d_model": {hook: int(buffer.shape[1]) for hook, buffer in buffers.items()}}
        order = np.random.default_rng([config.seed, SPLIT_IDS[block.split], block.index]).permutation(n_rows)
        finished = {shard["index"] for shard in record["shards"]}
        for shard, indices in enumerate(np.array_split(order, record["n_shards"])):
            if shard in finished:
                continue
            per_hook = {}
            for hook, buffer in buffers.items():
                acts = buffer[torch.from_numpy(indices)]  # [shard rows, d_model]
                info = write_shard(self.prefixes[hook], shard_path(block, shard), acts, config.dtype,
                                   {name: values[indices] for name, values in columns.items()})
                per_hook[hook] = {"bytes": info.bytes, "sha256": info.sha256,
                                  "sum_sq_norm": sum_sq_norms(acts) if block.split == "train" else 0.0}
            record["shards"].append({"index": shard, "path": shard_path(block, shard), "rows": len(indices),
                                     "hooks": per_hook})
            fs.write_text(progress_uri, json.dumps(record))
            yield {"shard": shard}
        if record["n_shards"] == 0:
            fs.write_text(progress_uri, json.dumps(record))

    def _forward(self, contexts: list[np.ndarray], keeps: list[np.ndarray],
                 buffers: dict[str, torch.Tensor]) -> Iterator[dict]:
        """Fill `buffers` (hook -> [rows, d_model]) batch by batch with the kept positions' outputs."""
        import torch

        from dictsweep.store.manifest import TORCH_DTYPES
        from dictsweep.store.models import capture_outputs

        config, store_dtype = self.config, TORCH_DTYPES[self.config.dtype]
        n_rows, row = int(sum(keep.sum() for keep in keeps)), 0
        with capture_outputs(self._model, config.hooks) as capture:
            for start in range(0, len(contexts), config.batch_size):
                batch = contexts[start:start + config.batch_size]
                batch_keeps = keeps[start:start + config.batch_size]
                width = max(len(ids) for ids in batch)
                input_ids = torch.full((len(batch), width), self.plan["pad_id"], dtype=torch.long)  # [B, T]
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, T]
                for i, ids in enumerate(batch):
                    input_ids[i, :len(ids)] = torch.from_numpy(ids.astype(np.int64))
                    attention_mask[i, :len(ids)] = 1
                outputs = capture.run(input_ids=input_ids.to(self.device),
                                      attention_mask=attention_mask.to(self.device))
                batch_index = torch.from_numpy(np.repeat(np.arange(len(batch)),
                                                         [keep.sum() for keep in batch_keeps]))
                positions = torch.from_numpy(np.concatenate([np.flatnonzero(keep) for keep in batch_keeps]))
                for hook, output in outputs.items():
                    _check_output(hook, output, (len(batch), width))
                    rows = output[batch_index.to(output.device), positions.to(output.device)]
                    rows = rows.to("cpu", store_dtype)  # [kept positions, d_model]
                    if not torch.isfinite(rows).all():
                        raise RunError(f"--hook {hook}: non-finite activations in the block's contexts "
                                       f"{start}..{start + len(batch) - 1}: outside {config.dtype}'s range? "
                                       "try --dtype bfloat16 or float32")
                    if hook not in buffers:
                        buffers[hook] = torch.empty((n_rows, rows.shape[1]), dtype=store_dtype)
                    buffers[hook][row:row + len(positions)] = rows
                row += len(positions)
                yield {"tokens": int(sum(len(ids) for ids in batch))}


def _check_output(hook: str, output, batch_shape: tuple[int, int]) -> None:
    """InputError unless a hook's output is [batch, tokens, d_model]."""
    import torch

    if not isinstance(output, torch.Tensor) or output.ndim != 3 or tuple(output.shape[:2]) != batch_shape:
        found = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise InputError(f"--hook {hook}: its output is {found}, expected [batch, tokens, d_model] = "
                         f"[{batch_shape[0]}, {batch_shape[1]}, d]; choose a module that outputs one "
                         "vector per token")


def _read_json(uri: str) -> dict | None:
    from dictsweep.store import fs

    try:
        return json.loads(fs.read_text(uri))
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------- driver

def hook_prefixes(config: HarvestConfig) -> dict[str, str]:
    """hook -> dataset prefix: `--out` for one hook, `--out/<hook>` for several."""
    from dictsweep.store import fs

    out = config.out.rstrip("/") or config.out
    if len(config.hooks) == 1:
        return {config.hooks[0]: out}
    return {hook: fs.join(out, hook) for hook in config.hooks}


def harvest(config: HarvestConfig, overwrite: bool = False, progress: bool = True) -> HarvestResult:
    """Harvest `config.hooks` of `config.model` over `config.text` into datasets (see the module doc)."""
    from dictsweep.store import fs
    from dictsweep.store.manifest import MANIFEST_NAME
    from dictsweep.store.models import is_local

    check_text_source(config)
    # workers (Ray actors) may start elsewhere than this process's working directory
    if "://" not in config.out:
        config = config.model_copy(update={"out": os.path.abspath(os.path.expanduser(config.out))})
    if is_local(config.model):
        config = config.model_copy(update={"model": os.path.abspath(os.path.expanduser(config.model))})
    structure = _check_model(config)
    prefixes = hook_prefixes(config)
    root = config.out.rstrip("/") or config.out
    done = [hook for hook, prefix in prefixes.items() if fs.exists(fs.join(prefix, MANIFEST_NAME))]
    if overwrite:
        _clean(root, prefixes)
    elif len(done) == len(prefixes):
        raise InputError(f"{config.out} already holds the harvested dataset(s) ({MANIFEST_NAME}); "
                         "choose another --out or pass --overwrite")
    plan = _read_json(fs.join(root, WORK_DIR, "plan.json"))
    settings = json.loads(json.dumps(config.plan_settings()))  # as stored: tuples become lists
    if plan is not None and plan["settings"] != settings:
        differ = ", ".join(f"{key}: {plan['settings'].get(key)!r} there, {settings[key]!r} now"
                           for key in PLAN_KEYS if plan["settings"].get(key) != settings[key])
        raise InputError(f"{config.out} holds an unfinished harvest with other settings ({differ}); "
                         "rerun with those settings to resume it, or pass --overwrite to start again")
    if plan is None and done and not overwrite:
        raise InputError(f"{', '.join(prefixes[hook] for hook in done)} already hold(s) a dataset "
                         f"({MANIFEST_NAME}) not made by an unfinished harvest here; choose another --out "
                         "or pass --overwrite")
    if plan is None:
        plan = _make_plan(config, root, prefixes, structure)
    blocks = make_blocks(plan["n_contexts"], config)
    records = {block.key: _read_json(fs.join(root, WORK_DIR, f"{block.key}.json")) for block in blocks}
    pending = [block for block in blocks if not _complete(records[block.key])]
    tokens_total = sum(_block_tokens(block, plan, config.context) for block in pending)
    started = time.perf_counter()
    done_tokens, rate = _run(config, plan, prefixes, pending, tokens_total, progress)
    seconds = time.perf_counter() - started
    manifests = _write_manifests(config, root, prefixes, blocks, plan)
    filesystem, path = fs.resolve(fs.join(root, WORK_DIR))
    if filesystem.exists(path):
        filesystem.rm(path, recursive=True)
    return HarvestResult(manifests, prefixes, plan["n_contexts"], done_tokens, seconds, rate)


def _check_model(config: HarvestConfig):
    """The model's structure (meta device): every hook must name a module, context fit the model."""
    from dictsweep.store.models import find_module, load_structure

    structure = load_structure(config.model)
    for hook in config.hooks:
        find_module(structure, hook)
    limit = getattr(structure.config, "max_position_embeddings", None)
    if isinstance(limit, int) and config.context > limit:
        raise InputError(f"--context {config.context}: {config.model} takes at most {limit} positions")
    return structure


def _clean(root: str, prefixes: dict[str, str]) -> None:
    """Remove a previous harvest at `root`: manifests first (so nothing half-old reads as a dataset)."""
    from dictsweep.store import fs
    from dictsweep.store.manifest import MANIFEST_NAME

    for prefix in prefixes.values():
        fs.remove(fs.join(prefix, MANIFEST_NAME))
    parts = [fs.join(prefix, part) for prefix in prefixes.values() for part in ("train", "eval", "contexts")]
    for uri in parts + [fs.join(root, WORK_DIR)]:
        filesystem, path = fs.resolve(uri)
        if filesystem.exists(path):
            filesystem.rm(path, recursive=True)


def _make_plan(config: HarvestConfig, root: str, prefixes: dict[str, str], structure) -> dict:
    """Tokenise and pack the text, write contexts/ under every prefix, then the plan (last)."""
    from dictsweep.store import fs
    from dictsweep.store.models import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    template = tokenizer_template(tokenizer)
    offsets, tokens = pack_contexts(config, tokenizer, template)
    per_file = max(1, CONTEXT_FILE_TOKENS // config.context)
    for prefix in prefixes.values():
        write_contexts(prefix, offsets, tokens, per_file)
    plan = {"settings": config.plan_settings(), "root": root, "n_contexts": len(offsets) - 1,
            "n_tokens": int(len(tokens)), "last_context_tokens": int(offsets[-1] - offsets[-2]),
            "contexts_per_file": per_file,
            "special_ids": template.special_ids, "pad_id": template.pad_id,
            "template": {"prefix": template.prefix, "suffix": template.suffix,
                         "separator": template.separator},
            "model_class": type(structure).__name__}
    fs.write_text(fs.join(root, WORK_DIR, "plan.json"), json.dumps(plan, indent=1))
    return plan


def _complete(record: dict | None) -> bool:
    return record is not None and "n_shards" in record and len(record["shards"]) == record["n_shards"]


def _block_tokens(block: Block, plan: dict, context: int) -> int:
    """Tokens a block feeds to the model: full contexts, but the last context may be shorter."""
    last = plan["n_contexts"] - 1
    return len(block.seqs) * context - (context - plan["last_context_tokens"]) * int(last in block.seqs)


def _resolve_device(config: HarvestConfig) -> tuple[str, int]:
    """(device, workers) for this run."""
    import torch

    if config.device != "auto":
        device = config.device
    elif config.address is not None:
        import ray

        device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and config.address is None and not torch.cuda.is_available():
        raise InputError("--device cuda: no GPU is visible here; use --device cpu or auto")
    if config.workers:
        return device, config.workers
    if device == "cuda":
        gpus = torch.cuda.device_count() if config.address is None else None
        if gpus is None:
            import ray

            gpus = int(ray.cluster_resources().get("GPU", 1))
        return device, max(1, gpus)
    return device, 1


def _run(config: HarvestConfig, plan: dict, prefixes: dict[str, str], pending: list[Block],
         tokens_total: int, progress: bool) -> tuple[int, float]:
    """Run the pending blocks on the workers with a progress bar: (tokens fed to the model, tokens/s)."""
    if not pending:
        return 0, 0.0
    ray_started, actors = False, []
    try:
        if config.address is not None:
            ray_started = _init_ray(config.address)
        device, workers = _resolve_device(config)
        workers = min(workers, len(pending))
        if workers > 1 or config.address is not None:
            ray_started = _init_ray("local") or ray_started
            runners, actors = _ray_runners(config, plan, prefixes, device, workers)
        else:
            runners = [BlockHarvester(config, plan, prefixes, device).run_block]
        columns = [TextColumn("harvest"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                   RateColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
            task = bar.add_task("harvest", total=tokens_total)
            done, first = 0, None  # the rate is timed from the first batch (the model is loaded)

            def on_event(event: dict) -> None:
                nonlocal done, first
                if "tokens" in event:
                    done += event["tokens"]
                    bar.update(task, advance=event["tokens"])
                    first = first or (time.perf_counter(), done)

            _run_blocks(runners, pending, on_event)
        elapsed = time.perf_counter() - first[0] if first else 0.0
        return done, (done - first[1]) / elapsed if elapsed > 0 else 0.0
    finally:
        if actors or ray_started:
            import ray

            for actor in actors:
                ray.kill(actor)
            if ray_started:
                ray.shutdown()


def _init_ray(address: str) -> bool:
    """Connect to `address` ("local": start Ray on this machine's CPUs) unless connected; True if now."""
    try:
        return start_ray(address, num_cpus=os.cpu_count() or 1, log_to_driver=False)
    except RunError as error:  # a local Ray that did not start
        raise RunError(f"{error} --workers 1 runs without Ray") from None


def _ray_runners(config: HarvestConfig, plan: dict, prefixes: dict[str, str], device: str, workers: int):
    """One Ray actor per worker (a GPU each, or an equal share of this machine's CPUs)."""
    import ray

    cpus = os.cpu_count() or 1
    if device == "cuda":
        options, threads = {"num_gpus": 1, "num_cpus": 1}, 0
    elif config.address is not None:
        options, threads = {"num_cpus": 1}, 0
    else:
        options, threads = {"num_cpus": cpus / workers}, max(1, cpus // workers)
    actor_class = ray.remote(BlockHarvester)
    actors = [actor_class.options(**options).remote(config, plan, prefixes, device, threads)
              for _ in range(workers)]

    def runner(actor) -> Callable[[Block], Iterator[dict]]:
        return lambda block: (ray.get(ref) for ref in actor.run_block.remote(block))

    return [runner(actor) for actor in actors], actors


def _run_blocks(runners: list[Callable[[Block], Iterator[dict]]], blocks: list[Block],
                on_event: Callable[[dict], None]) -> None:
    """Each runner takes the next block until none is left; events reach `on_event` here."""
    if len(runners) == 1:
        try:
            for block in blocks:
                for event in runners[0](block):
                    on_event(event)
        except Exception as error:
            raise _worker_error(error) from None
        return
    todo: queue.Queue = queue.Queue()
    for block in blocks:
        todo.put(block)
    events: queue.Queue = queue.Queue()
    stop = threading.Event()

    def loop(runner) -> None:
        try:
            while not stop.is_set():
                try:
                    block = todo.get_nowait()
                except queue.Empty:
                    break
                for event in runner(block):
                    events.put(("event", event))
        except BaseException as error:  # reported to the driver thread, which raises it
            events.put(("error", error))
        finally:
            events.put(("done", None))

    threads = [threading.Thread(target=loop, args=(runner,), daemon=True) for runner in runners]
    for thread in threads:
        thread.start()
    finished = 0
    while finished < len(threads):
        try:
            kind, value = events.get(timeout=0.5)
        except queue.Empty:
            continue
        if kind == "event":
            on_event(value)
        elif kind == "error":
            stop.set()
            raise _worker_error(value)
        else:
            finished += 1


def _worker_error(error: BaseException) -> BaseException:
    """A Ray worker's own error out of Ray's wrapper (a RunError if it is not ours); others as they are."""
    if not type(error).__module__.startswith("ray."):
        return error
    cause = getattr(error, "cause", None)
    if isinstance(cause, DictsweepError):
        return cause
    return RunError(f"a harvest worker failed: {type(cause or error).__name__}: {cause or error}")


def _write_manifests(config: HarvestConfig, root: str, prefixes: dict[str, str], blocks: list[Block],
                     plan: dict) -> dict[str, Manifest]:
    """Every hook's manifest from the blocks' progress records (the last write of a harvest)."""
    from dictsweep.store import fs
    from dictsweep.store.dataset import write_manifest
    from dictsweep.store.manifest import ShardInfo

    records = [_read_json(fs.join(root, WORK_DIR, f"{block.key}.json")) for block in blocks]
    missing = [block.key for block, record in zip(blocks, records) if not _complete(record)]
    if missing:
        raise RunError(f"blocks {', '.join(missing[:5])} are unfinished after the workers returned; "
                       "rerun the same command to finish them")
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifests = {}
    for hook, prefix in prefixes.items():
        shards = {"train": [], "eval": []}
        total_sq, d_models = 0.0, set()
        for record in records:
            d_models.update([record["d_model"][hook]] if record["n_shards"] else [])
            for shard in sorted(record["shards"], key=lambda shard: shard["index"]):
                entry = shard["hooks"][hook]
                shards[record["split"]].append(ShardInfo(path=shard["path"], rows=shard["rows"],
                                                         bytes=entry["bytes"], sha256=entry["sha256"]))
                total_sq += entry["sum_sq_norm"]
        if len(d_models) != 1:
            raise RunError(f"--hook {hook}: blocks report output widths {sorted(d_models)}; expected one")
        n_rows = sum(shard.rows for shard in shards["train"])
        source = {"model": config.model, "hook": hook, "dataset": config.text, "context": config.context,
                  "created": created, "max_tokens": config.max_tokens, "seed": config.seed,
                  "include_special": config.include_special, "n_contexts": plan["n_contexts"],
                  "template": plan["template"]}
        manifests[hook] = write_manifest(prefix, d_models.pop(), config.dtype, shards["train"],
                                         shards["eval"], source=source,
                                         stats={"mean_sq_norm": total_sq / max(n_rows, 1)})
    return manifests


class RateColumn(ProgressColumn):
    """Tokens per second in the progress bar."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} tokens/s" if speed else "- tokens/s")
