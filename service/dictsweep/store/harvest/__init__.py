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

Modules by stage: `config` (HarvestConfig), `text` (text sources), `tokens` (template, packing,
eval hold-out, blocks), `worker` (BlockHarvester), `driver` (`harvest`); the `contexts/` format is
`dictsweep.store.contexts`. torch, transformers and ray are imported inside functions: the CLI imports
HarvestConfig for its help.
"""

from dictsweep.store.contexts import read_context_file, read_contexts, write_contexts
from dictsweep.store.harvest.config import PLAN_KEYS, WORK_DIR, HarvestConfig
from dictsweep.store.harvest.driver import HarvestResult, harvest, hook_prefixes
from dictsweep.store.harvest.text import check_text_source, iter_text
from dictsweep.store.harvest.tokens import Block, Template, eval_seqs, make_blocks, pack_contexts, tokenizer_template
from dictsweep.store.harvest.worker import BlockHarvester, shard_path

__all__ = [
    "PLAN_KEYS",
    "WORK_DIR",
    "Block",
    "BlockHarvester",
    "HarvestConfig",
    "HarvestResult",
    "Template",
    "check_text_source",
    "eval_seqs",
    "harvest",
    "hook_prefixes",
    "iter_text",
    "make_blocks",
    "pack_contexts",
    "read_context_file",
    "read_contexts",
    "shard_path",
    "tokenizer_template",
    "write_contexts",
]
