"""The harvest's text: a file, a folder of them, a saved `datasets` folder or a Hugging Face dataset,
as pieces of documents."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from dictsweep.errors import InputError
from dictsweep.store.harvest.config import HarvestConfig

TEXT_PIECE_CHARS = 1 << 20  # a text file is read and tokenised in pieces of about this many characters
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")


def iter_text(config: HarvestConfig) -> Iterator[tuple[str, bool]]:
    """(piece of text, whether a document ends with it), over the whole text source."""
    path = os.path.expanduser(config.text)
    if os.path.isdir(path) and _is_saved_dataset(path):
        yield from _dataset_text(config, path)
    elif os.path.isdir(path):
        files = sorted(
            os.path.join(folder, name)
            for folder, _, names in os.walk(path)
            for name in names
            if name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES) and not name.startswith(".")
        )
        if not files:
            raise InputError(
                f"--text {config.text}: the folder holds no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files"
            )
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
    return os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(os.path.join(path, "state.json"))


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
        raise InputError(
            f"--text {where}: expected a JSON object with a string field {text_field!r} (set --text-field)"
        )
    return record[text_field]


def _dataset_text(config: HarvestConfig, saved: str | None) -> Iterator[tuple[str, bool]]:
    """The documents of a saved `datasets` folder or of a Hugging Face dataset name."""
    try:
        import datasets
    except ImportError:
        raise InputError(
            f"--text {config.text}: no such file or folder (and the `datasets` "
            "package, needed for dataset names, is not installed)"
        ) from None
    try:
        if saved is not None:
            data = datasets.load_from_disk(saved)
            if isinstance(data, datasets.DatasetDict):
                data = data[config.text_split]
        else:
            name, _, subset = config.text.partition(":")
            data = datasets.load_dataset(name, subset or None, split=config.text_split)
    except Exception as error:  # datasets raises many types (FileNotFoundError, ConnectionError, ...)
        raise InputError(
            f"--text {config.text}: not a local file or folder, and the Hugging Face "
            f"dataset could not be loaded ({type(error).__name__}: {error}); check the "
            "path or name, or download the dataset first"
        ) from None
    if config.text_field not in data.column_names:
        raise InputError(
            f"--text {config.text}: no column {config.text_field!r} (columns: "
            f"{', '.join(data.column_names)}; set --text-field)"
        )
    for batch in data.iter(batch_size=1024):
        for text in batch[config.text_field]:
            if text and text.strip():
                yield text, True
