"""Reading the query-reformulation corpus and splitting it by group.

Split rule (deterministic, leak-free): every row whose `subqueries` value is the same belongs
to one group (the 5 paraphrases of one reformulation). A group goes to
  test        when sha1(subqueries) mod 10 == 0,
  validation  when sha1(subqueries) mod 10 == 1,
  train       otherwise,
so all paraphrases of one group land on one side, and the split never depends on row order.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CORPUS = REPO_ROOT.parent / "shared" / "datasets" / "query-reformulation" / "corpus.jsonl"

SPLITS = ("train", "validation", "test")
_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class Example:
    query: str
    subqueries: tuple[str, ...]
    kind: str = ""

    @property
    def target(self) -> str:
        """The model's target text: subqueries joined by ' | ' (see subqueries.py)."""
        return " | ".join(self.subqueries)


def clean_subquery(text: str) -> str:
    """Collapse whitespace runs (the corpus writes 'Needles, California' as 'Needles  California')."""
    return _WS.sub(" ", text).strip()


def split_target(text: str) -> tuple[str, ...]:
    """Split a '|'-joined target into cleaned, non-empty subqueries (the serving rule, minus fallback)."""
    return tuple(s for s in (clean_subquery(p) for p in text.split("|")) if s)


def split_of(subqueries: str) -> str:
    bucket = int(hashlib.sha1(subqueries.encode("utf-8")).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def classify_kind(subqueries: tuple[str, ...]) -> str:
    """Heuristic kind label for corpus rows, used only for per-kind reporting.

    chaining: each later subquery starts with the word the previous one ended with (the answer
    type feeds the next hop: 'Desert Located In Country|Country Part Of Continent');
    comparison: every subquery ends with the same property ('X Birth Date|Y Birth Date');
    expansion: anything else (aspects of one topic).
    """
    if len(subqueries) >= 2:
        words = [s.lower().split() for s in subqueries]
        if all(w for w in words) and all(words[i][0] == words[i - 1][-1] for i in range(1, len(words))):
            return "chaining"
        if all(w[-1] == words[0][-1] for w in words) and len({" ".join(w) for w in words}) == len(words):
            return "comparison"
    return "expansion"


def load_corpus(path: Path | str = DEFAULT_CORPUS) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"corpus not found at {path}; pass --corpus PATH (the shared query-reformulation corpus)"
        )
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_splits(path: Path | str = DEFAULT_CORPUS) -> dict[str, list[Example]]:
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for row in load_corpus(path):
        subs = split_target(row["subqueries"])
        out[split_of(row["subqueries"])].append(Example(row["query"].strip(), subs, classify_kind(subs)))
    return out


def load_labelled_jsonl(path: Path | str) -> list[Example]:
    """The project's own labelled files (datasets/test.jsonl): subqueries as '|' string or list."""
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            subs = row.get("subqueries", "")
            subs = split_target(subs) if isinstance(subs, str) else tuple(clean_subquery(s) for s in subs)
            rows.append(Example(row["query"].strip(), subs, row.get("kind", "") or classify_kind(subs)))
    return rows
