"""Label tasks from a harvested dataset's own tokens, for probing and absorption without downloads.

Every row of a harvested dataset maps back to its token (`seq`, `pos` into `contexts/`); the
model's tokenizer gives each token id its text and whether it starts a word: WordPiece marks a
continuation with "##"; byte-level BPE ("Ġ") and SentencePiece ("▁") mark a word start with a
leading space, and the first token of a context or after a special token starts one too. From
that, binary tasks per row:
- `word_start`: the token starts a word (else it continues one);
- `capitalised`: its text begins with an upper-case letter;
- `digit`: its text is all digits;
- `punctuation`: its text is all punctuation or symbols;
- `first_letter_<x>`: it is a whole alphabetic word (starts a word, the next token does not continue
  it) beginning with letter x, against every other whole alphabetic word (absorption's 26 classes).
"""

from __future__ import annotations

import string
import unicodedata
from typing import NamedTuple

import numpy as np

LETTERS = string.ascii_lowercase
BASE_TASKS = ("word_start", "capitalised", "digit", "punctuation")


class Vocabulary(NamedTuple):
    """Per token id: its text (markers removed) and whether it carries a word-start marker."""

    text: list[str]
    marked_start: np.ndarray  # [vocab] bool: the token says it starts a word
    continuation_scheme: bool  # True: WordPiece ("##" marks a continuation); False: markers mark starts
    special: np.ndarray  # [vocab] bool


def vocabulary(tokenizer, special_ids: list[int]) -> Vocabulary:
    """The tokenizer's pieces as `Vocabulary`, its marking scheme found from the vocabulary itself."""
    size = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    pieces = [piece or "" for piece in pieces]
    continuation = sum(piece.startswith("##") for piece in pieces)
    spaced = sum(piece.startswith(("Ġ", "▁")) for piece in pieces)
    wordpiece = continuation > spaced
    text, marked = [], np.zeros(size, dtype=bool)
    for token_id, piece in enumerate(pieces):
        if wordpiece:
            marked[token_id] = not piece.startswith("##")
            text.append(piece[2:] if piece.startswith("##") else piece)
        else:
            marked[token_id] = piece.startswith(("Ġ", "▁"))
            text.append(tokenizer.convert_tokens_to_string([piece]).strip())
    special = np.zeros(size, dtype=bool)
    special[[i for i in special_ids if 0 <= i < size]] = True
    return Vocabulary(text, marked, wordpiece, special)


def is_punctuation(text: str) -> bool:
    return bool(text) and all(unicodedata.category(char)[0] in "PS" for char in text)


class TokenTable(NamedTuple):
    """Per token id, the facts the tasks read."""

    capitalised: np.ndarray
    digit: np.ndarray
    punctuation: np.ndarray
    alphabetic: np.ndarray
    first_letter: np.ndarray  # index into LETTERS, -1 when not a letter


def token_table(vocab: Vocabulary) -> TokenTable:
    capitalised = np.array([bool(t) and t[0].isupper() for t in vocab.text])
    digit = np.array([bool(t) and t.isdigit() and t.isascii() for t in vocab.text])
    punctuation = np.array([is_punctuation(t) for t in vocab.text])
    alphabetic = np.array([bool(t) and t.isascii() and t.isalpha() for t in vocab.text])
    first = np.array([LETTERS.find(t[0].lower()) if t and t.isascii() else -1 for t in vocab.text])
    return TokenTable(capitalised, digit, punctuation, alphabetic, first)


def row_labels(vocab: Vocabulary, table: TokenTable, contexts: dict[int, np.ndarray], seqs, positions) -> dict:
    """Per row (`seqs`, `positions` into `contexts`): every base task's label (bool), and `letter`
    (index into LETTERS of a whole alphabetic word, -1 for any other row)."""
    tokens = np.array([contexts[int(s)][int(p)] for s, p in zip(seqs, positions)], dtype=np.int64)
    previous = np.array(
        [contexts[int(s)][int(p) - 1] if p > 0 else -1 for s, p in zip(seqs, positions)], dtype=np.int64
    )
    following = np.array(
        [contexts[int(s)][int(p) + 1] if p + 1 < len(contexts[int(s)]) else -1 for s, p in zip(seqs, positions)],
        dtype=np.int64,
    )

    def starts(ids: np.ndarray, before: np.ndarray) -> np.ndarray:
        marked = vocab.marked_start[np.maximum(ids, 0)]
        if vocab.continuation_scheme:
            return marked
        after_special = (before < 0) | vocab.special[np.maximum(before, 0)]
        return marked | after_special

    word_start = starts(tokens, previous)
    ends_word = (following < 0) | starts(following, tokens) | vocab.special[np.maximum(following, 0)]
    whole_word = word_start & ends_word & table.alphabetic[tokens]
    return {
        "word_start": word_start,
        "capitalised": table.capitalised[tokens],
        "digit": table.digit[tokens],
        "punctuation": table.punctuation[tokens],
        "letter": np.where(whole_word, table.first_letter[tokens], -1),
    }
