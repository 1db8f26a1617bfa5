"""A harvest worker: loads the model once, then forwards blocks of contexts and writes their shards."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from dictsweep.errors import InputError, RunError
from dictsweep.store.contexts import context_file_uri, read_context_file
from dictsweep.store.harvest.config import WORK_DIR, HarvestConfig
from dictsweep.store.harvest.tokens import Block

if TYPE_CHECKING:
    import torch

SPLIT_IDS = {"train": 0, "eval": 1}


def shard_path(block: Block, shard: int) -> str:
    return f"{block.split}/{block.index:05d}-{shard:03d}.arrow"


class BlockHarvester:
    """One worker: loads the model once, then runs blocks (in this process or as a Ray actor)."""

    def __init__(self, config: HarvestConfig, plan: dict, prefixes: dict[str, str], device: str, threads: int = 0):
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
        file_index, row = divmod(int(seq), self.plan["contexts_per_file"])
        if file_index not in self._files:
            if len(self._files) >= 2:
                self._files.pop(next(iter(self._files)))
            uri = context_file_uri(next(iter(self.prefixes.values())), file_index)
            self._files[file_index] = read_context_file(uri)
        _, offsets, tokens = self._files[file_index]
        return tokens[offsets[row] : offsets[row + 1]]

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
        record = read_json(progress_uri) or {
            "split": block.split,
            "block": block.index,
            "seq_first": int(block.seqs[0]),
            "seq_last": int(block.seqs[-1]),
            "n_contexts": len(block.seqs),
            "shards": [],
        }
        contexts = [self._context(seq) for seq in block.seqs]
        special = np.asarray(self.plan["special_ids"], dtype=np.int32)
        keeps = [
            np.ones(len(ids), bool) if config.include_special else ~np.isin(ids, special) for ids in contexts
        ]  # the positions that become rows
        columns = {
            "seq": np.repeat(block.seqs, [keep.sum() for keep in keeps]),
            "pos": np.concatenate([np.flatnonzero(keep) for keep in keeps]).astype(np.int32),
            "token_id": np.concatenate([ids[keep] for ids, keep in zip(contexts, keeps)]).astype(np.int32),
        }
        buffers: dict[str, torch.Tensor] = {}  # hook (and target hook) -> [n_rows, width] in the stored dtype
        yield from self._forward(contexts, keeps, buffers)
        targets = config.targets()

        n_rows = len(columns["seq"])
        record |= {
            "rows": n_rows,
            "n_shards": math.ceil(n_rows / config.shard_rows),
            "d_model": {hook: int(buffer.shape[1]) for hook, buffer in buffers.items()},
        }
        order = np.random.default_rng([config.seed, SPLIT_IDS[block.split], block.index]).permutation(n_rows)
        finished = {shard["index"] for shard in record["shards"]}
        for shard, indices in enumerate(np.array_split(order, record["n_shards"])):
            if shard in finished:
                continue
            per_hook = {}
            for hook in config.hooks:
                acts = buffers[hook][torch.from_numpy(indices)]  # [shard rows, d_model]
                target = buffers[targets[hook]][torch.from_numpy(indices)] if hook in targets else None
                info = write_shard(
                    self.prefixes[hook],
                    shard_path(block, shard),
                    acts,
                    config.dtype,
                    {name: values[indices] for name, values in columns.items()},
                    target,
                )
                train = block.split == "train"
                per_hook[hook] = {
                    "bytes": info.bytes,
                    "sha256": info.sha256,
                    "blake3": info.blake3,
                    "sum_sq_norm": sum_sq_norms(acts) if train else 0.0,
                    **({"target_sum_sq_norm": sum_sq_norms(target) if train else 0.0} if target is not None else {}),
                }
            record["shards"].append(
                {"index": shard, "path": shard_path(block, shard), "rows": len(indices), "hooks": per_hook}
            )
            fs.write_text(progress_uri, json.dumps(record))
            yield {"shard": shard}
        if record["n_shards"] == 0:
            fs.write_text(progress_uri, json.dumps(record))

    def _forward(
        self, contexts: list[np.ndarray], keeps: list[np.ndarray], buffers: dict[str, torch.Tensor]
    ) -> Iterator[dict]:
        """Fill `buffers` (hook -> [rows, d_model]) batch by batch with the kept positions' outputs."""
        import torch

        from dictsweep.store.manifest import TORCH_DTYPES
        from dictsweep.store.models import capture_outputs

        config, store_dtype = self.config, TORCH_DTYPES[self.config.dtype]
        n_rows, row = int(sum(keep.sum() for keep in keeps)), 0
        hooks = list(dict.fromkeys(config.hooks + config.target_hooks))  # a target may be another pair's input
        with capture_outputs(self._model, hooks) as capture:
            for start in range(0, len(contexts), config.batch_size):
                batch = contexts[start : start + config.batch_size]
                batch_keeps = keeps[start : start + config.batch_size]
                width = max(len(ids) for ids in batch)
                input_ids = torch.full((len(batch), width), self.plan["pad_id"], dtype=torch.long)  # [B, T]
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, T]
                for i, ids in enumerate(batch):
                    input_ids[i, : len(ids)] = torch.from_numpy(ids.astype(np.int64))
                    attention_mask[i, : len(ids)] = 1
                outputs = capture.run(
                    input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
                )
                check_order(list(outputs), config.targets())
                batch_index = torch.from_numpy(np.repeat(np.arange(len(batch)), [keep.sum() for keep in batch_keeps]))
                positions = torch.from_numpy(np.concatenate([np.flatnonzero(keep) for keep in batch_keeps]))
                for hook, output in outputs.items():
                    option = f"--hook {hook}" if hook in config.hooks else f"--target-hook {hook}"
                    _check_output(option, output, (len(batch), width))
                    rows = output[batch_index.to(output.device), positions.to(output.device)]
                    rows = rows.to("cpu", store_dtype)  # [kept positions, d_model]
                    if not torch.isfinite(rows).all():
                        raise RunError(
                            f"{option}: non-finite activations in the block's contexts "
                            f"{start}..{start + len(batch) - 1}: outside {config.dtype}'s range? "
                            "try --dtype bfloat16 or float32"
                        )
                    if hook not in buffers:
                        buffers[hook] = torch.empty((n_rows, rows.shape[1]), dtype=store_dtype)
                    buffers[hook][row : row + len(positions)] = rows
                row += len(positions)
                yield {"tokens": int(sum(len(ids) for ids in batch))}


def check_order(ran: list[str], targets: dict[str, str]) -> None:
    """InputError unless each hook's module ran before its target's (`ran`: hooks in the order they ran):
    a transcoder spliced into the model replaces its target with what it reads from its hook."""
    for hook, target in targets.items():
        if ran.index(target) < ran.index(hook):
            raise InputError(
                f"--target-hook {target} runs before its --hook {hook} in the forward pass; a transcoder "
                "reads an earlier activation (e.g. an MLP's input) and reconstructs a later one (its output)"
            )


def _check_output(option: str, output, batch_shape: tuple[int, int]) -> None:
    """InputError unless a hook's output is [batch, tokens, d_model]; `option` names the hook."""
    import torch

    if not isinstance(output, torch.Tensor) or output.ndim != 3 or tuple(output.shape[:2]) != batch_shape:
        found = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise InputError(
            f"{option}: its output is {found}, expected [batch, tokens, d_model] = "
            f"[{batch_shape[0]}, {batch_shape[1]}, d]; choose a module that outputs one "
            "vector per token"
        )


def read_json(uri: str) -> dict | None:
    """A harvest's plan or progress record, or None where none is written yet."""
    from dictsweep.store import fs

    try:
        return json.loads(fs.read_text(uri))
    except FileNotFoundError:
        return None
