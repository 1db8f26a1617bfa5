"""Read (ActivationDataset) and write (DatasetWriter) activation datasets at any fsspec URI."""

from __future__ import annotations

import hashlib
import math
import mmap
from typing import Literal

import blake3
import numpy as np
import safetensors.torch
import torch

from dictsweep.errors import DatasetError
from dictsweep.store import fs
from dictsweep.store.manifest import FORMAT, MANIFEST_NAME, TORCH_DTYPES, Manifest, ShardInfo
from dictsweep.store.shards import decode_shard, encode_shard

Split = Literal["train", "eval"]
GROUND_TRUTH_NAME = "ground_truth.safetensors"
NORM_SHARDS = 4  # shards read to estimate mean_sq_norm when the manifest has no stats


class ActivationDataset:
    """A dataset prefix: its manifest and verified, zero-copy shard reads."""

    def __init__(self, uri: str, manifest: Manifest):
        self.uri = uri.rstrip("/")
        self.manifest = manifest
        self._mean_sq_norm: dict[str, float] | None = None  # column -> its value, when read from shards

    @classmethod
    def open(cls, uri: str) -> ActivationDataset:
        """The dataset at `uri` (its manifest is read and checked now, its shards when read)."""
        return cls(uri, Manifest.load(uri))

    @property
    def d_model(self) -> int:
        return self.manifest.d_model

    @property
    def dtype(self) -> str:
        return self.manifest.dtype

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.manifest.dtype]

    @property
    def d_target(self) -> int:
        """The width of a transcoder dataset's `target` column; 0: the dataset has none."""
        return self.manifest.d_target or 0

    @property
    def n_rows(self) -> int:
        return self.manifest.n_rows

    @property
    def n_eval_rows(self) -> int:
        return sum(shard.rows for shard in self.manifest.eval_shards)

    def shards(self, split: Split = "train") -> list[ShardInfo]:
        """The shards of one split, in manifest order."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        return self.manifest.shards if split == "train" else self.manifest.eval_shards

    def shard_uri(self, info: ShardInfo) -> str:
        """Where a shard lives."""
        return fs.join(self.uri, info.path)

    def read_shard_bytes(
        self, index: int, split: Split = "train", buffer: bytearray | None = None, mapped: bool = False
    ) -> bytearray | memoryview | mmap.mmap:
        """The bytes of one shard, checked against the manifest's size and checksum (BLAKE3 where
        the manifest has it, else SHA-256; read into `buffer` when it is large enough: see
        `fs.read_bytearray`). With `mapped`, a local shard is mapped instead of read (`fs.read_mapped`):
        for a caller that is done with the bytes before the shard could be replaced."""
        info = self.shards(split)[index]
        where = f"shard {info.path} of {self.uri}"
        read = fs.read_mapped if mapped else fs.read_bytearray
        try:
            data = read(self.shard_uri(info), info.bytes, buffer)
        except FileNotFoundError:
            raise DatasetError(f"{where} is missing: the dataset is incomplete; copy or write it again") from None
        except OSError as error:
            raise DatasetError(f"cannot read {where}: {error} (check the path and your storage credentials)") from None
        if len(data) != info.bytes:
            raise DatasetError(
                f"{where}: {len(data)} bytes, the manifest says {info.bytes}: the "
                "object is truncated or was rewritten after the manifest"
            )
        algorithm, expected = ("blake3", info.blake3) if info.blake3 else ("sha256", info.sha256)
        digest = checksum(algorithm, data)
        if digest != expected:
            raise DatasetError(
                f"{where}: {algorithm} mismatch (expected {expected[:12]}.., got "
                f"{digest[:12]}..): the object is corrupt or was rewritten after "
                "the manifest"
            )
        return data

    def decode(
        self, data: bytearray, index: int, split: Split = "train", columns: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, np.ndarray]]:
        """Decode bytes from read_shard_bytes: [rows, d_model] (and the integer columns; a transcoder
        dataset's `target` [rows, d_target] among them, checked as `act` is)."""
        info = self.shards(split)[index]
        acts, extra = decode_shard(data, self.d_model, self.dtype, f"{info.path} of {self.uri}", self.d_target)
        for name, values in (("act", acts), ("target", extra.get("target"))):
            if values is None:
                continue
            if len(values) != info.rows:
                raise DatasetError(
                    f"shard {info.path} of {self.uri}: {len(values)} rows, the manifest "
                    f"says {info.rows}: the manifest does not describe this shard"
                )
            bad = first_non_finite(values)
            if bad is not None:
                row, column, value = bad
                raise DatasetError(
                    f"shard {info.path} of {self.uri}: row {row} holds {value} (column {column}{' of target' * (name == 'target')}); "
                    "activations must be finite: fix what wrote the shard and write it again"
                )
        return (acts, extra) if columns else acts

    def read_shard(
        self, index: int, split: Split = "train", columns: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, np.ndarray]]:
        """One verified shard as [rows, d_model] of the stored dtype (and its integer columns)."""
        return self.decode(self.read_shard_bytes(index, split), index, split, columns)

    def mean_sq_norm(self, column: str = "act") -> float:
        """Mean squared L2 norm of the train rows' `column` (act, or a transcoder dataset's target):
        manifest stats (`mean_sq_norm`, `target_mean_sq_norm`), else the first few shards."""
        stats, key = self.manifest.stats or {}, "mean_sq_norm" if column == "act" else f"{column}_mean_sq_norm"
        if isinstance(stats.get(key), (int, float)) and not isinstance(stats[key], bool):
            if not 0 < stats[key] < math.inf:
                raise DatasetError(
                    f"{fs.join(self.uri, 'manifest.json')}: field 'stats.{key}' is "
                    f"{stats[key]}; it must be a finite number > 0 (or absent)"
                )
            return float(stats[key])
        if self._mean_sq_norm is None or column not in self._mean_sq_norm:
            total, rows = 0.0, 0
            for index in range(min(NORM_SHARDS, len(self.manifest.shards))):
                acts, extra = self.read_shard(index, columns=True)
                values = acts if column == "act" else extra[column]
                total += sum_sq_norms(values)
                rows += len(values)
            self._mean_sq_norm = {**(self._mean_sq_norm or {}), column: total / max(rows, 1)}
        return self._mean_sq_norm[column]

    def ground_truth(self, name: str = "features") -> torch.Tensor | None:
        """The true features [n_features, d_model] (float32) of a synthetic dataset, else None; `name`
        "target_features": a synthetic transcoder dataset's [n_features, d_target]."""
        if self.manifest.ground_truth is None:
            return None
        uri = fs.join(self.uri, self.manifest.ground_truth)
        try:
            tensors = safetensors.torch.load(fs.read_bytes(uri))
        except FileNotFoundError:
            raise DatasetError(f"{uri} is missing (named by manifest.json field 'ground_truth')") from None
        except Exception as error:  # safetensors raises its own error types for bad files
            raise DatasetError(f"{uri}: not a readable safetensors file ({error})") from None
        features, width = tensors.get(name), self.d_model if name == "features" else self.d_target
        if name != "features" and features is None and not self.d_target:
            return None
        if features is None or features.ndim != 2 or features.shape[1] != width:
            found = "no such tensor" if features is None else f"shape {list(features.shape)}"
            raise DatasetError(f"{uri}: expected tensor {name!r} [n_features, {width}], found {found}")
        return features.float()


class DatasetWriter:
    """Writes shards as rows arrive and `manifest.json` last, so an unfinished write is no dataset."""

    def __init__(
        self,
        uri: str,
        d_model: int,
        dtype: str = "float32",
        shard_rows: int = 65536,
        source: dict | None = None,
        overwrite: bool = False,
        d_target: int = 0,
    ):
        """`d_target` > 0: a transcoder dataset, whose every row has a `target` of that width."""
        if dtype not in TORCH_DTYPES:
            raise DatasetError(f"dtype {dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
        if d_model <= 0 or shard_rows <= 0:
            raise DatasetError(f"d_model and shard_rows must be > 0, got {d_model} and {shard_rows}")
        self.uri = uri.rstrip("/")
        self.d_model, self.dtype, self.shard_rows, self.source = d_model, dtype, shard_rows, source
        self.d_target = d_target
        manifest_uri = fs.join(self.uri, MANIFEST_NAME)
        if fs.exists(manifest_uri):
            if not overwrite:
                raise DatasetError(
                    f"{self.uri} already holds a dataset ({MANIFEST_NAME}); choose another location or pass overwrite"
                )
            fs.remove(manifest_uri)  # the old dataset stops being one before its shards change
        # rows waiting for a full shard, per split: [(acts [n, d_model], columns [n])]
        self._pending: dict[str, list] = {"train": [], "eval": []}
        self._pending_rows = {"train": 0, "eval": 0}
        self._written: dict[str, list[ShardInfo]] = {"train": [], "eval": []}
        self._sum_sq_norms = {"act": 0.0, "target": 0.0}  # float64 sums over written train rows
        self._closed = False

    def add(
        self,
        acts: torch.Tensor,
        split: Split = "train",
        columns: dict[str, np.ndarray] | None = None,
        target: torch.Tensor | None = None,
    ) -> None:
        """Buffer rows [n, d_model] (and integer columns [n]; a transcoder dataset's `target` [n, d_target]);
        write every shard that fills."""
        self._check_open()
        if split not in self._pending:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if (
            not isinstance(acts, torch.Tensor)
            or acts.ndim != 2
            or acts.shape[1] != self.d_model
            or not acts.is_floating_point()
        ):
            found = f"{list(acts.shape)} {acts.dtype}" if isinstance(acts, torch.Tensor) else type(acts).__name__
            raise DatasetError(f"DatasetWriter.add: expected a float tensor of shape [n, {self.d_model}], got {found}")
        if (target is None) != (not self.d_target) or (
            target is not None and (target.shape != (len(acts), self.d_target) or not target.is_floating_point())
        ):
            found = "none" if target is None else f"{list(target.shape)} {target.dtype}"
            raise DatasetError(
                f"DatasetWriter.add: expected target [{len(acts)}, {self.d_target}] (d_target={self.d_target}), got {found}"
            )
        if target is not None:  # buffered beside the rows' act: [n, d_model + d_target]
            acts = torch.cat([acts.to(TORCH_DTYPES[self.dtype]), target.to(acts.device, TORCH_DTYPES[self.dtype])], 1)
        columns = {name: np.array(values) for name, values in (columns or {}).items()}  # copies
        for name, values in columns.items():
            if values.shape != (len(acts),) or values.dtype.kind not in "iu":
                raise DatasetError(
                    f"DatasetWriter.add: column {name!r} must be integers of shape "
                    f"[{len(acts)}], got {values.dtype} {list(values.shape)}"
                )
        pending = self._pending[split]
        if pending and set(pending[0][1]) != set(columns):
            raise DatasetError(
                f"DatasetWriter.add: columns {sorted(columns)} differ from the earlier "
                f"rows' {sorted(pending[0][1])}; every add to a split needs the same columns"
            )
        if len(acts):
            # a copy, so that the caller may reuse its tensor
            pending.append((acts.detach().to("cpu", TORCH_DTYPES[self.dtype], copy=True), columns))
            self._pending_rows[split] += len(acts)
        if self._pending_rows[split] >= self.shard_rows:
            self._flush(split, final=False)

    def write_file(self, rel_path: str, data: bytes) -> None:
        """Write an extra file (ground truth, contexts) under the dataset prefix."""
        self._check_open()
        fs.write_bytes(fs.join(self.uri, rel_path), data)

    def close(
        self,
        ground_truth: torch.Tensor | None = None,
        extra_stats: dict | None = None,
        target_ground_truth: torch.Tensor | None = None,
    ) -> Manifest:
        """Write the last partial shards, the ground truth if given (`features`, and a synthetic
        transcoder dataset's `target_features` [n_features, d_target]), then manifest.json."""
        self._check_open()
        for split in ("train", "eval"):
            self._flush(split, final=True)
        n_rows = sum(shard.rows for shard in self._written["train"])
        if n_rows == 0:
            raise DatasetError(f"DatasetWriter for {self.uri}: no train rows were added")
        ground_truth_name = None
        if ground_truth is not None:
            if ground_truth.ndim != 2 or ground_truth.shape[1] != self.d_model:
                raise DatasetError(f"ground truth must be [n_features, {self.d_model}], got {list(ground_truth.shape)}")
            tensors = {"features": ground_truth.detach().to("cpu", torch.float32).contiguous()}
            if target_ground_truth is not None:
                tensors["target_features"] = target_ground_truth.detach().to("cpu", torch.float32).contiguous()
            self.write_file(GROUND_TRUTH_NAME, safetensors.torch.save(tensors))
            ground_truth_name = GROUND_TRUTH_NAME
        stats = {"mean_sq_norm": self._sum_sq_norms["act"] / n_rows}
        if self.d_target:
            stats["target_mean_sq_norm"] = self._sum_sq_norms["target"] / n_rows
        manifest = write_manifest(
            self.uri,
            self.d_model,
            self.dtype,
            self._written["train"],
            self._written["eval"],
            source=self.source,
            ground_truth=ground_truth_name,
            stats={**stats, **(extra_stats or {})},
            d_target=self.d_target or None,
        )
        self._closed = True
        return manifest

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is None and not self._closed:
            self.close()
        self._closed = True  # after an error no manifest is written: the prefix is no dataset

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"DatasetWriter for {self.uri} is closed")

    def _flush(self, split: str, final: bool) -> None:
        """Write the buffered rows of `split` as full shards (and, when final, the partial rest)."""
        pending = self._pending[split]
        if not pending:
            return
        if len(pending) == 1:
            acts, columns = pending[0]
        else:
            acts = torch.cat([chunk for chunk, _ in pending])  # [pending rows, d_model]
            columns = {name: np.concatenate([cols[name] for _, cols in pending]) for name in pending[0][1]}
        start = 0
        while len(acts) - start >= self.shard_rows or (final and start < len(acts)):
            stop = min(start + self.shard_rows, len(acts))
            shard_columns = {name: values[start:stop] for name, values in columns.items()}
            self._write_shard(split, acts[start:stop], shard_columns)
            start = stop
        rest = {name: values[start:].copy() for name, values in columns.items()}
        pending[:] = [(acts[start:].clone(), rest)] if start < len(acts) else []
        self._pending_rows[split] = len(acts) - start

    def _write_shard(self, split: str, acts: torch.Tensor, columns: dict[str, np.ndarray]) -> None:
        """Write `acts` [rows, d_model] (stored dtype) and `columns` as the split's next shard."""
        path = f"{split}/{len(self._written[split]):05d}.arrow"
        acts, target = (acts[:, : self.d_model], acts[:, self.d_model :]) if self.d_target else (acts, None)
        self._written[split].append(write_shard(self.uri, path, acts, self.dtype, columns, target))
        if split == "train":
            self._sum_sq_norms["act"] += sum_sq_norms(acts)
            self._sum_sq_norms["target"] += sum_sq_norms(target) if target is not None else 0.0


def write_shard(
    uri: str,
    path: str,
    acts: torch.Tensor,
    dtype: str,
    columns: dict[str, np.ndarray] | None = None,
    target: torch.Tensor | None = None,
) -> ShardInfo:
    """Write `acts` [rows, d_model] (cast to `dtype`), `columns` and a transcoder's `target` [rows,
    d_target] as the shard `<uri>/<path>`.

    For writers that place shards themselves (several workers, one dataset); the manifest entry
    it returns goes to `write_manifest` once every shard is written.
    """
    data = encode_shard(acts, dtype, columns, target)
    fs.write_bytes(fs.join(uri, path), data)
    return ShardInfo(
        path=path,
        rows=len(acts),
        bytes=len(data),
        sha256=checksum("sha256", data),
        blake3=checksum("blake3", data),
    )


def checksum(algorithm: str, data) -> str:
    """Hex digest of a shard's bytes: "blake3" (what readers check) or "sha256" (kept in manifests
    for other tools and for datasets written before BLAKE3)."""
    if algorithm == "blake3":
        return blake3.blake3(data, max_threads=1).hexdigest()
    return hashlib.sha256(data).hexdigest()


def write_manifest(
    uri: str,
    d_model: int,
    dtype: str,
    shards: list[ShardInfo],
    eval_shards: list[ShardInfo],
    source: dict | None = None,
    stats: dict | None = None,
    ground_truth: str | None = None,
    d_target: int | None = None,
) -> Manifest:
    """Write `<uri>/manifest.json` for shards already written: the last step of any writer."""
    manifest = Manifest(
        format=FORMAT,
        d_model=d_model,
        dtype=dtype,
        n_rows=sum(shard.rows for shard in shards),
        shards=shards,
        eval_shards=eval_shards,
        source=source,
        stats=stats,
        ground_truth=ground_truth,
        d_target=d_target,
    )
    fs.write_text(fs.join(uri, MANIFEST_NAME), manifest.to_json())
    return manifest


# float dtype -> its bits as (signed, unsigned) integers, and the bits of +inf: a value is NaN or
# infinite exactly when its bits without the sign reach those of +inf (the exponent all ones)
BIT_VIEWS = {
    torch.float16: (np.int16, np.uint16, 0x7C00),
    torch.bfloat16: (np.int16, np.uint16, 0x7F80),
    torch.float32: (np.int32, np.uint32, 0x7F800000),
}


def first_non_finite(acts: torch.Tensor) -> tuple[int, int, float] | None:
    """(row, column, value) of the first NaN or infinite value of `acts` [rows, d_model], else None.

    The usual, finite shard costs two integer max reductions over its bits (no temporary, and ten
    times faster than a float16 min/max); only a bad shard pays for finding the place.
    """
    if not acts.numel():
        return None
    if not any_non_finite(acts):
        return None
    row, column = (~torch.isfinite(acts)).nonzero()[0].tolist()
    return row, column, float(acts[row, column])


def any_non_finite(acts: torch.Tensor) -> bool:
    """Whether `acts` holds a NaN or an infinity, from its bits: as signed integers the largest
    positive value reaches +inf's bits, or as unsigned integers the largest negative one (above
    every positive one) reaches -inf's."""
    if acts.dtype not in BIT_VIEWS or not acts.is_contiguous() or acts.device.type != "cpu":
        low, high = torch.aminmax(acts)
        return not (math.isfinite(float(low)) and math.isfinite(float(high)))
    signed, unsigned, inf_bits = BIT_VIEWS[acts.dtype]
    bits = acts.detach().reshape(-1).view(torch.uint8).numpy()  # the same bytes, no copy
    sign_bit = 1 << (np.dtype(signed).itemsize * 8 - 1)
    return bool(bits.view(signed).max() >= inf_bits or bits.view(unsigned).max() >= sign_bit | inf_bits)


def sum_sq_norms(acts: torch.Tensor, chunk_rows: int = 65536) -> float:
    """Sum over rows of the squared L2 norm, accumulated in float64 ([rows, d_model] in)."""
    total = 0.0
    for chunk in acts.split(chunk_rows):
        rows = chunk.float().numpy()  # [chunk_rows, d_model]; einsum makes no squared copy
        total += float(np.einsum("ij,ij->", rows, rows, dtype=np.float64))
    return total
