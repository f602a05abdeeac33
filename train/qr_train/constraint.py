"""Capitalised-word constraint for decoding: the model may only write a capitalised word that
the query contains (or its capitalised form), or one of the model's own property words
('Birth', 'Date', 'Population', 'Country'...), learned from the training targets.

A small model trained from scratch tends to write a name it memorised instead of the one
asked about; this closes that door without retraining. Words are tracked as UTF-8 bytes so
byte-fallback pieces work, and only candidates among the top-k logits are considered, so the
model's own ranking decides among the allowed continuations.

The property words ship with the model as `constraint.json`; the Rust engine reads the same
file and applies the same rule (server/src/engine/constraint.rs).
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from .corpus import Example

FILE_NAME = "constraint.json"
METASPACE = "▁"
_EDGE_PUNCT = re.compile(r"^[^\w]+|[^\w]+$", re.UNICODE)
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def query_words(query: str) -> set[str]:
    """Words of the query, edge punctuation and possessive 's stripped, plus capitalised forms."""
    out: set[str] = set()
    for raw in query.split():
        word = _EDGE_PUNCT.sub("", raw)
        if word.endswith(("'s", "’s")):
            word = word[:-2]
        for w in (word, raw.rstrip("?!,;:")):  # 'St.' keeps its dot, 'Tesla,' loses its comma
            if w:
                out.add(w)
                out.add(w[:1].upper() + w[1:])
    return out


def learn_property_words(train: list[Example], min_groups: int = 3) -> list[str]:
    """Capitalised target words that are not copied from the query, seen in >= min_groups groups."""
    groups: dict[str, set] = defaultdict(set)
    for ex in train:
        in_query = query_words(ex.query)
        for sub in ex.subqueries:
            for word in sub.split():
                if word[:1].isupper() and word not in in_query:
                    groups[word].add(ex.subqueries)
    return sorted(w for w, g in groups.items() if len(g) >= min_groups)


def save(model_dir: Path, property_words: list[str], top_k: int = 8) -> Path:
    path = Path(model_dir) / FILE_NAME
    path.write_text(json.dumps({"top_k": top_k, "property_words": property_words}, ensure_ascii=False, indent=0))
    return path


class WordConstraint:
    """Per-request state machine over pieces; `choose(logits)` picks the next token id."""

    def __init__(self, pieces: list[str], property_words: list[str], query: str, eos_id: int, top_k: int = 8):
        self.pieces = pieces
        self.eos_id = eos_id
        self.top_k = top_k
        allowed = {w.encode() for w in property_words} | {w.encode() for w in query_words(query)}
        self.full = allowed
        self.prefixes = {w[:i] for w in allowed for i in range(1, len(w) + 1)}
        self.word = b""

    @staticmethod
    def _capitalised(word: bytes) -> bool:
        text = word.decode("utf-8", "ignore")  # an unfinished character counts as not capitalised
        return bool(text) and text[0].isupper()

    def _ok_complete(self, word: bytes) -> bool:
        return not self._capitalised(word) or word in self.full

    def _ok_partial(self, word: bytes) -> bool:
        return not self._capitalised(word) or word in self.prefixes

    def _step(self, token: int) -> bytes | None:
        """The current word after `token`, or None if the token breaks the rule."""
        if token == self.eos_id:
            return b"" if self._ok_complete(self.word) else None
        piece = self.pieces[token]
        byte = _BYTE_PIECE.match(piece)
        if byte:
            # Checked like any continuation: an unfinished first character is not capitalised yet.
            word = self.word + bytes([int(byte.group(1), 16)])
            return word if self._ok_partial(word) else None
        text = piece.encode()
        if piece.startswith(METASPACE):
            if not self._ok_complete(self.word):
                return None
            word = piece[1:].encode()
        else:
            word = self.word + text
        return word if self._ok_partial(word) else None

    def choose(self, logits: np.ndarray) -> int:
        order = np.argpartition(-logits, self.top_k)[: self.top_k]
        for token in order[np.argsort(-logits[order])]:
            word = self._step(int(token))
            if word is not None:
                self.word = word
                return int(token)
        best = int(logits.argmax())
        self.word = self._step(best) or b""
        return best
