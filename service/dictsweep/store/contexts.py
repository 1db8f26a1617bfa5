"""The `contexts/` format: every harvested context's token ids, so a row (`seq`, `pos`) traces back to
its token and held-out text can be fed to the model again.

`<prefix>/contexts/NNNNN.arrow`: Arrow IPC files, columns `seq` (int64, ascending across files) and
`token_ids` (list<int32>), about CONTEXT_FILE_TOKENS tokens per file (a whole number of contexts:
file k holds contexts k * per_file .. (k + 1) * per_file - 1).
"""

from __future__ import annotations

import os

import numpy as np

from dictsweep.errors import InputError
from dictsweep.store import fs

CONTEXT_FILE_TOKENS = 1 << 22  # tokens per contexts/ file (16 MiB of int32)


def context_file_uri(prefix: str, file_index: int) -> str:
    return fs.join(prefix, "contexts", f"{file_index:05d}.arrow")


def _context_files(prefix: str) -> list[str]:
    """URIs of the dataset's contexts/ files, in order."""
    filesystem, path = fs.resolve(fs.join(prefix, "contexts"))
    return [
        fs.join(prefix, "contexts", os.path.basename(name))
        for name in sorted(filesystem.glob(path.rstrip("/") + "/*.arrow"))
    ]


def write_contexts(prefix: str, offsets: np.ndarray, tokens: np.ndarray, per_file: int) -> None:
    """`contexts/NNNNN.arrow` under `prefix`: columns seq (int64), token_ids (list<int32>)."""
    import pyarrow as pa

    n_contexts = len(offsets) - 1
    for file_index, first in enumerate(range(0, n_contexts, per_file)):
        last = min(first + per_file, n_contexts)
        local = (offsets[first : last + 1] - offsets[first]).astype(np.int32)
        token_ids = pa.ListArray.from_arrays(pa.array(local), pa.array(tokens[offsets[first] : offsets[last]]))
        batch = pa.record_batch(
            [pa.array(np.arange(first, last, dtype=np.int64)), token_ids], names=["seq", "token_ids"]
        )
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
        fs.write_bytes(context_file_uri(prefix, file_index), sink.getvalue().to_pybytes())


def read_context_file(uri: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seqs [n] int64, offsets [n + 1], token ids) of one contexts/ file."""
    import pyarrow as pa

    table = pa.ipc.open_file(pa.py_buffer(fs.read_bytes(uri))).read_all()
    token_ids = table.column("token_ids").combine_chunks()
    return (table.column("seq").to_numpy(), token_ids.offsets.to_numpy().astype(np.int64), token_ids.values.to_numpy())


def read_contexts(prefix: str) -> list[np.ndarray]:
    """Every context's token ids, indexed by seq: `read_contexts(uri)[seq][pos]` is a row's token."""
    contexts: list[np.ndarray] = []
    for uri in _context_files(prefix):
        seqs, offsets, tokens = read_context_file(uri)
        if len(seqs) and seqs[0] != len(contexts):
            raise InputError(f"{uri} starts at seq {seqs[0]}, expected {len(contexts)}: a contexts file is missing")
        contexts += [tokens[offsets[i] : offsets[i + 1]] for i in range(len(seqs))]
    return contexts


def read_seqs(prefix: str, wanted: list[int]) -> dict[int, np.ndarray]:
    """Token ids of contexts `wanted` from `<prefix>/contexts/`, reading files in order until found."""
    missing, found = set(wanted), {}
    for uri in _context_files(prefix):
        seqs, offsets, tokens = read_context_file(uri)
        for row in np.flatnonzero(np.isin(seqs, list(missing))):
            found[int(seqs[row])] = tokens[offsets[row] : offsets[row + 1]]
            missing.discard(int(seqs[row]))
        if not missing:
            return found
    raise InputError(
        f"{prefix}/contexts/ lacks the eval contexts {sorted(missing)[:5]}: the dataset's "
        "contexts/ and shards do not belong together"
    )
