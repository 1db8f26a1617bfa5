"""The per-latent data file of `dictsweep inspect`: one Parquet row per latent (schema in docs/inspect.md)."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dictsweep.analysis.directions import Matches
from dictsweep.analysis.stats import HIST_BINS, Summary, hist_edges
from dictsweep.errors import InputError
from dictsweep.store import fs

LatentTables = list[dict]  # one record per latent, in SCHEMA's fields

CONTEXT = pa.struct(
    [
        ("kind", pa.string()),
        ("act", pa.float32()),
        ("seq", pa.int64()),
        ("pos", pa.int32()),
        ("token_ids", pa.list_(pa.int32())),
        ("tokens", pa.list_(pa.string())),
        ("token_acts", pa.list_(pa.float32())),
        ("center", pa.int32()),
    ]
)
NEIGHBOUR = pa.struct([("latent", pa.int32()), ("cosine", pa.float32())])
MATCH = pa.struct([("dictionary", pa.string()), ("latent", pa.int32()), ("cosine", pa.float32())])
TOKEN = pa.struct([("token", pa.string()), ("token_id", pa.int32()), ("logit", pa.float32())])
SCHEMA = pa.schema(
    [
        ("latent", pa.int32()),
        ("fire_count", pa.int64()),
        ("frequency", pa.float64()),
        ("mean_act", pa.float32()),
        ("max_act", pa.float32()),
        ("hist", pa.list_(pa.int64(), HIST_BINS)),
        ("top_acts", pa.list_(pa.float32())),
        ("contexts", pa.list_(CONTEXT)),
        ("neighbours", pa.list_(NEIGHBOUR)),
        ("matches", pa.list_(MATCH)),
        ("promoted", pa.list_(TOKEN)),
        ("suppressed", pa.list_(TOKEN)),
    ]
)


def _finite(values: np.ndarray) -> list[float | None]:
    return [float(value) if np.isfinite(value) else None for value in values]


def latent_tables(
    summary: Summary,
    windows_by_latent: dict[int, list[tuple[str, object]]],
    near: Matches,
    others: dict[str, Matches],
    effects: tuple[Matches, Matches] | None,
    source,
) -> LatentTables:
    """One record per latent from the pass's summary, its windows (kind, Window), its nearest latents,
    its matches in other dictionaries, and the tokens it promotes and suppresses."""
    n_latents = len(summary.fire_count)
    fired = np.maximum(summary.fire_count, 1)
    token_cache: dict[int, str] = {}

    def strings(ids: np.ndarray) -> list[str]:
        missing = [int(i) for i in ids if int(i) not in token_cache]
        if missing:
            token_cache.update(zip(missing, source.token_strings(np.asarray(missing))))
        return [token_cache[int(i)] for i in ids]

    records = []
    for latent in range(n_latents):
        keep = summary.top_rows[latent] != -1
        contexts = []
        for kind, window in windows_by_latent.get(latent, []):
            contexts.append(
                {
                    "kind": kind,
                    "act": window.act,
                    "seq": window.seq,
                    "pos": window.pos,
                    "token_ids": window.token_ids.tolist(),
                    "tokens": strings(window.token_ids),
                    "token_acts": _finite(window.acts),
                    "center": window.center,
                }
            )
        records.append(
            {
                "latent": latent,
                "fire_count": int(summary.fire_count[latent]),
                "frequency": float(summary.fire_count[latent]) / max(summary.rows, 1),
                "mean_act": float(summary.act_sum[latent] / fired[latent]),
                "max_act": float(summary.act_max[latent]),
                "hist": summary.hist[latent].tolist(),
                "top_acts": summary.top_values[latent][keep].tolist(),
                "contexts": contexts,
                "neighbours": [
                    {"latent": int(i), "cosine": float(c)} for i, c in zip(near.indices[latent], near.scores[latent])
                ],
                "matches": [
                    {"dictionary": other, "latent": int(i), "cosine": float(c)}
                    for other, found in sorted(others.items())
                    for i, c in zip(found.indices[latent], found.scores[latent])
                ],
                "promoted": _tokens(effects[0], latent, strings) if effects else [],
                "suppressed": _tokens(effects[1], latent, strings) if effects else [],
            }
        )
    return records


def _tokens(matches: Matches, latent: int, strings) -> list[dict]:
    ids = matches.indices[latent].numpy()
    return [
        {"token": token, "token_id": int(i), "logit": float(logit)}
        for token, i, logit in zip(strings(ids), ids, matches.scores[latent].tolist())
    ]


def write_data_file(path: str, records: LatentTables, meta: dict) -> None:
    """Write the records as Parquet; `meta` (and the histogram's bin edges) go in the file's metadata
    under `dictsweep.inspect`."""
    table = pa.Table.from_pylist(records, schema=SCHEMA)
    info = {**meta, "hist_edges": hist_edges()}
    table = table.replace_schema_metadata({"dictsweep.inspect": json.dumps(info)})
    pq.write_table(table, path)


def read_data_file(path: str) -> tuple[pa.Table, dict]:
    """A data file (a path or URI) and its `dictsweep.inspect` metadata, checked as untrusted: an
    InputError names the file and the field that is not as `write_data_file` writes it."""
    try:
        table = pq.read_table(pa.BufferReader(fs.read_bytes(path)))
    except (pa.ArrowException, OSError) as error:
        raise InputError(f"{path}: not a readable Parquet data file ({error})") from None
    for field in SCHEMA:
        found = table.schema.field(field.name).type if field.name in table.schema.names else None
        if found is None or not found.equals(field.type):
            raise InputError(f"{path}: field '{field.name}' should be {field.type} (found {found or 'none'})")
        where = null_field(table.column(field.name).combine_chunks(), field.name)
        if where:
            raise InputError(f"{path}: field '{where}' holds an empty value (null)")
    try:
        meta = json.loads((table.schema.metadata or {})[b"dictsweep.inspect"])
    except (KeyError, ValueError):
        raise InputError(f"{path}: field 'dictsweep.inspect' of its metadata is missing or not JSON") from None
    edges = meta.get("hist_edges") if isinstance(meta, dict) else None
    if not (
        isinstance(edges, list)
        and len(edges) == HIST_BINS + 1
        and all(isinstance(edge, (int, float)) and math.isfinite(edge) and edge > 0 for edge in edges)
        and edges == sorted(edges)
    ):
        raise InputError(
            f"{path}: field 'dictsweep.inspect.hist_edges' should be {HIST_BINS + 1} rising positive numbers"
        )
    return table, meta


def null_field(values: pa.Array, name: str) -> str | None:
    """The first field at or under `name` (`contexts.center`) holding a null; floats may (unknown values)."""
    if pa.types.is_floating(values.type):
        return None
    if values.null_count:
        return name
    if pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type):
        return null_field(pc.list_flatten(values), name)
    if pa.types.is_struct(values.type):
        for index, child in enumerate(values.type):
            found = null_field(pc.struct_field(values, [index]), f"{name}.{child.name}")
            if found:
                return found
    return None
