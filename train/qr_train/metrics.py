"""Evaluation metrics, defined exactly as the Rust `qreformulate::metrics` module defines them.

Per example:
- exact_match: normalised predicted list == normalised expected list (order matters);
  normalised = lower-cased, whitespace runs collapsed, trimmed.
- rouge_l: ROUGE-L F1 (longest common subsequence) over word tokens of the subqueries joined
  by a space; word tokens = maximal runs of Unicode alphanumerics or '_' after lower-casing.
- count_accuracy: the two lists have the same length.
- levenshtein: 0 when the counts differ, else the mean over positions of
  1 - lev(p, e) / max(len(p), len(e)) on normalised strings (characters; both empty -> 1).
A table row is the mean over its examples.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

_WS = re.compile(r"\s+")
_TOKEN = re.compile(r"[^\W]+", re.UNICODE)  # alphanumerics and '_'


def normalise(text: str) -> str:
    return _WS.sub(" ", text.lower()).strip()


def word_tokens(subqueries: Sequence[str]) -> list[str]:
    return _TOKEN.findall(" ".join(subqueries).lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(predicted: Sequence[str], expected: Sequence[str]) -> float:
    p, e = word_tokens(predicted), word_tokens(expected)
    lcs = lcs_length(p, e)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(e)
    return 2 * precision * recall / (precision + recall)


def levenshtein_distance(a: str, b: str) -> int:
    a_chars, b_chars = list(a), list(b)
    prev = list(range(len(b_chars) + 1))
    for i, x in enumerate(a_chars, 1):
        cur = [i]
        for j, y in enumerate(b_chars, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def levenshtein_score(predicted: Sequence[str], expected: Sequence[str]) -> float:
    if len(predicted) != len(expected):
        return 0.0
    if not expected:
        return 1.0
    total = 0.0
    for p, e in zip(predicted, expected):
        p, e = normalise(p), normalise(e)
        longest = max(len(p), len(e))
        total += 1.0 if longest == 0 else 1.0 - levenshtein_distance(p, e) / longest
    return total / len(expected)


def exact_match(predicted: Sequence[str], expected: Sequence[str]) -> bool:
    return [normalise(p) for p in predicted] == [normalise(e) for e in expected]


@dataclass
class MetricRow:
    name: str
    examples: int = 0
    exact_match: float = 0.0
    rouge_l: float = 0.0
    count_accuracy: float = 0.0
    levenshtein: float = 0.0
    # Trust metrics (docs/grounding.md): shares of answers with an invented word (None without a
    # grounding vocabulary), breaking a guard, and falling back to the query.
    invented_rate: float | None = None
    degenerate_rate: float = 0.0
    fallback_rate: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class MetricTable:
    """Accumulates examples; `rows()` gives overall then per-kind means."""

    _sums: dict = field(default_factory=lambda: defaultdict(lambda: [0] + [0.0] * 7))
    _invented_known: bool = True

    def add(self, predicted: Sequence[str], expected: Sequence[str], kind: str = "", *,
            invented: bool | None = None, degenerate: bool = False, fallback: bool = False) -> None:
        if invented is None:
            self._invented_known = False
        scores = (
            float(exact_match(predicted, expected)),
            rouge_l(predicted, expected),
            float(len(predicted) == len(expected)),
            levenshtein_score(predicted, expected),
            float(bool(invented)),
            float(degenerate),
            float(fallback),
        )
        for key in ("overall", kind or "unknown"):
            acc = self._sums[key]
            acc[0] += 1
            for i, s in enumerate(scores, 1):
                acc[i] += s

    def rows(self) -> list[MetricRow]:
        order = ["overall"] + sorted(k for k in self._sums if k != "overall")
        out = []
        for key in order:
            n, em, rl, ca, lv, inv, deg, fb = self._sums[key]
            if n:
                out.append(MetricRow(key, n, em / n, rl / n, ca / n, lv / n,
                                     inv / n if self._invented_known else None, deg / n, fb / n))
        return out
