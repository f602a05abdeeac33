"""Grounded decoding and output guards: the Python twin of the Rust engine's rule.

The contract is docs/grounding.md; tests/golden/grounding.json holds hand-written cases that
this module and the Rust code (src/grounding.rs, src/guards.rs, server/src/engine/grounding.rs)
must both pass. In short: every word the model writes is copied from the query (case may
change), a known name close to a misspelled query word, or a word of the model's generative
vocabulary (output words of the training data not copied from their own query); after
decoding, degenerate parts are cut or dropped, and when nothing usable is left the answer is
the query itself with the reason.

    python -m qr_train.grounding MODEL_DIR     # write MODEL_DIR/grounding.json from the corpus
"""
from __future__ import annotations

import argparse
import json
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .corpus import DEFAULT_CORPUS, Example, load_splits

FILE_NAME = "grounding.json"
REPO_ROOT = Path(__file__).resolve().parents[2]
GOLDEN = REPO_ROOT / "tests" / "golden" / "grounding.json"

DEFAULT_GUARDS = {"max_subquery_words": 16, "max_word_repeats": 3, "no_repeat_ngram": 3, "max_subqueries": 8}
DEFAULT_STOPWORDS = ["a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "has", "have", "in", "is",
                     "of", "on", "or", "the", "to", "was", "with"]
DEFAULT_FUZZY = {"min_len": 5, "long_len": 8}
# Reasons, as the proto's FallbackReason names them (without the prefix).
NONE, EMPTY, UNGROUNDED, OFF_TOPIC, DEGENERATE, LOW_CONFIDENCE = (
    "NONE", "EMPTY", "UNGROUNDED", "OFF_TOPIC", "DEGENERATE", "LOW_CONFIDENCE")

_WS = re.compile(r"\s+")
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
METASPACE = "▁"


def fold(word: str) -> bytes:
    """ASCII lowercase of the UTF-8 bytes; non-ASCII bytes stay as they are."""
    return word.encode("utf-8").lower()


def _is_word_char(c: str) -> bool:
    return c == "_" or c.isalpha() or c.isnumeric()


def _strip_edges(raw: str) -> str:
    start, end = 0, len(raw)
    while start < end and not _is_word_char(raw[start]):
        start += 1
    while end > start and not _is_word_char(raw[end - 1]):
        end -= 1
    return raw[start:end]


def _runs(core: str) -> list[str]:
    out, cur = [], []
    for c in core:
        if _is_word_char(c):
            cur.append(c)
        elif cur:
            out.append("".join(cur))
            cur = []
    if cur:
        out.append("".join(cur))
    return out


def _depossess(core: str) -> str:
    return core[:-2] if core.endswith(("'s", "’s")) else core


def query_words(query: str) -> set[bytes]:
    """Folded forms of the query's words (docs/grounding.md, "Words")."""
    out: set[bytes] = set()
    # The model reads the query through the tokenizer's NFKC normaliser, so it copies `km2` for
    # `km²` and `fi` for the ligature `ﬁ`: both spellings are the query's words.
    normalised = unicodedata.normalize("NFKC", query)
    texts = [query] if normalised == query else [query, normalised]
    for raw in (token for text in texts for token in text.split()):
        core = _strip_edges(raw)
        forms = [raw, core, _depossess(core), raw.rstrip("?!,;:"), *_runs(core)]
        for form in forms:
            if form:
                out.add(fold(form))
                out.add(fold(form[:1].upper() + form[1:]))
    return out


def osa_distance(a: str, b: str, limit: int) -> int:
    """Optimal string alignment distance (adjacent transpositions cost 1), or limit + 1 when above limit."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]


@dataclass
class Rules:
    """A model's grounding file, or the defaults (no vocabulary) for a model without one."""

    generative: set[bytes] = field(default_factory=set)
    known: set[bytes] = field(default_factory=set)
    stopwords: set[bytes] = field(default_factory=lambda: {fold(w) for w in DEFAULT_STOPWORDS})
    fuzzy: dict = field(default_factory=lambda: dict(DEFAULT_FUZZY))
    guards: dict = field(default_factory=lambda: dict(DEFAULT_GUARDS))
    min_mean_logprob: float | None = None
    has_vocabulary: bool = False
    # Known words by every string left after deleting up to 2 of their characters.
    _known_by_deletion: dict[str, list[str]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict) -> "Rules":
        if data.get("version") != 1:
            raise ValueError(f"{FILE_NAME}: version must be 1, got {data.get('version')!r}")
        rules = cls(
            generative={fold(w) for w in data["generative_words"]},
            known={fold(w) for w in data["known_words"]},
            stopwords={fold(w) for w in data.get("stopwords", DEFAULT_STOPWORDS)},
            fuzzy={**DEFAULT_FUZZY, **data.get("fuzzy", {})},
            guards={**DEFAULT_GUARDS, **data.get("guards", {})},
            min_mean_logprob=data.get("min_mean_logprob"),
            has_vocabulary=True,
        )
        for w in rules.known:
            text = w.decode("utf-8", "replace")
            for key in _deletions(text, 2):
                rules._known_by_deletion.setdefault(key, []).append(text)
        return rules

    @classmethod
    def load(cls, model_dir: Path) -> "Rules | None":
        path = Path(model_dir) / FILE_NAME
        return cls.from_json(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None

    def fuzzy_words(self, query: str) -> set[bytes]:
        """Known words close to a query word that is not itself known (a misspelled name)."""
        out: set[bytes] = set()
        if not self.has_vocabulary:
            return out
        min_len, long_len = self.fuzzy["min_len"], self.fuzzy["long_len"]
        for raw in query.split():
            core = _strip_edges(raw)
            for form in {core, _depossess(core)}:
                if len(form) < min_len or fold(form) in self.known:
                    continue
                limit = 2 if len(form) >= long_len else 1
                folded = fold(form).decode("utf-8")
                # Two words within distance d share a string reachable by at most d deletions
                # from each: look those up instead of comparing with every known word.
                for key in _deletions(folded, limit):
                    for k in self._known_by_deletion.get(key, ()):
                        if osa_distance(folded, k, limit) <= limit:
                            out.add(k.encode("utf-8"))
        return out


def _deletions(word: str, depth: int) -> set[str]:
    out, frontier = {word}, {word}
    for _ in range(depth):
        frontier = {w[:i] + w[i + 1:] for w in frontier for i in range(len(w))}
        out |= frontier
    return out


class QueryContext:
    """What one request's checks need: the folded query words (with fuzzy matches) and the rules."""

    def __init__(self, query: str, rules: Rules | None):
        self.query = query
        self.rules = rules or Rules()
        self.words = query_words(query) | self.rules.fuzzy_words(query)

    def grounded(self, word: str) -> bool:
        f = fold(word)
        return f in self.words or f in self.rules.generative

    def content(self, words: Iterable[str]) -> set[bytes]:
        return {fold(w) for w in words} - self.rules.stopwords


def normalise_query(query: str) -> str:
    return _WS.sub(" ", query).strip()


def _parts(text: str) -> list[list[str]]:
    return [p.split() for p in text.split("|") if p.split()]


def _cut(words: list[str], guards: dict) -> list[str]:
    """The longest prefix that breaks no guard of step 3."""
    n = guards["no_repeat_ngram"]
    counts: dict[bytes, int] = defaultdict(int)
    grams: set[tuple[bytes, ...]] = set()
    folded: list[bytes] = []
    for i, w in enumerate(words):
        f = fold(w)
        if i + 1 >= n:  # checked first: it cuts earlier than the other two
            gram = tuple(folded[i + 1 - n:]) + (f,)
            if gram in grams:
                return words[:i + 1 - n]  # the repeat goes as a whole
            grams.add(gram)
        if i >= guards["max_subquery_words"] or counts[f] >= guards["max_word_repeats"]:
            return words[:i]
        counts[f] += 1
        folded.append(f)
    return words


def sanitize(text: str, query: str, rules: Rules | None, mean_logprob: float | None = None) -> tuple[list[str], str]:
    """(subqueries, reason): the guards of docs/grounding.md, steps 1-7."""
    ctx = QueryContext(query, rules)
    guards = ctx.rules.guards
    parts = _parts(text)
    fallback = [normalise_query(query)]
    if not parts:
        return fallback, EMPTY
    kept: list[list[str]] = []
    dropped: set[str] = set()
    for words in parts:
        if len(kept) >= guards["max_subqueries"]:
            break
        if ctx.rules.has_vocabulary and not all(ctx.grounded(w) for w in words):
            dropped.add(UNGROUNDED)
            continue
        words = _cut(words, guards)
        if not words:
            dropped.add(DEGENERATE)
            continue
        if not _on_topic(ctx, words, kept[-1] if kept else None):
            dropped.add(OFF_TOPIC)
            continue
        if any(_contains_run(k, words) for k in kept):
            continue
        kept.append(words)
    if not kept:
        reason = UNGROUNDED if UNGROUNDED in dropped else OFF_TOPIC if OFF_TOPIC in dropped else DEGENERATE
        return fallback, reason
    threshold = ctx.rules.min_mean_logprob
    if threshold is not None and mean_logprob is not None and mean_logprob < threshold:
        return fallback, LOW_CONFIDENCE
    return [" ".join(w) for w in kept], NONE


RELATED_PREFIX = 5


def _related(a: bytes, b: bytes) -> bool:
    """Equal, or sharing the first RELATED_PREFIX bytes ('textiles' and 'textile')."""
    return a == b or (len(a) >= RELATED_PREFIX and len(b) >= RELATED_PREFIX and a[:RELATED_PREFIX] == b[:RELATED_PREFIX])


def _on_topic(ctx: "QueryContext", words: list[str], previous: list[str] | None) -> bool:
    """Step 4: a content word of the part is related to a query word or a previous part's word."""
    anchors = ctx.words | ({fold(w) for w in previous} if previous else set())
    return any(w in anchors or any(_related(w, a) for a in anchors) for w in ctx.content(words))


def _contains_run(kept: list[str], words: list[str]) -> bool:
    """Step 5: `words` (folded) occur as a contiguous run inside `kept`."""
    k, w = [fold(x) for x in kept], [fold(x) for x in words]
    return any(k[i:i + len(w)] == w for i in range(len(k) - len(w) + 1))


def is_degenerate(subqueries: Sequence[str], query: str, rules: Rules | None) -> bool:
    """The served subqueries break a guard of step 3, 4, 5 or 6 (the degenerate-rate metric)."""
    ctx = QueryContext(query, rules)
    guards = ctx.rules.guards
    if len(subqueries) > guards["max_subqueries"]:
        return True
    seen: list[list[str]] = []
    for sub in subqueries:
        words = sub.split()
        if not words or _cut(words, guards) != words:
            return True
        if not _on_topic(ctx, words, seen[-1] if seen else None):
            return True
        if any(_contains_run(k, words) for k in seen):
            return True
        seen.append(words)
    return False


def has_invented_word(subqueries: Sequence[str], query: str, rules: Rules) -> bool:
    ctx = QueryContext(query, rules)
    return any(not ctx.grounded(w) for sub in subqueries for w in sub.split())


# ---------------------------------------------------------------------------------------------
# Token level: the automaton the decoder consults.
# ---------------------------------------------------------------------------------------------

class Trie:
    """A byte trie: nodes are dicts of children; the key None marks a complete word."""

    def __init__(self, words: Iterable[bytes] = ()):
        self.root: dict = {}
        for w in words:
            node = self.root
            for b in w:
                node = node.setdefault(b, {})
            node[None] = True


def piece_bytes(piece: str) -> bytes:
    m = _BYTE_PIECE.match(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace(METASPACE, " ").encode("utf-8")


class TokenGrounding:
    """Per-model: every token's bytes and the generative-word trie; `for_query` gives the state."""

    def __init__(self, pieces: Sequence[str], rules: Rules, eos_id: int, special: Iterable[int]):
        special = set(special)
        self.token_bytes: list[bytes | None] = [
            None if i in special or not p else piece_bytes(p) for i, p in enumerate(pieces)]
        self.eos_id = eos_id
        self.rules = rules
        self.generative = Trie(rules.generative)

    def for_query(self, query: str) -> "GroundingState":
        ctx = QueryContext(query, self.rules)
        return GroundingState(self, Trie(ctx.words).root)


class GroundingState:
    """The word in progress, as a node in each trie (None: that trie has no such prefix)."""

    def __init__(self, model: TokenGrounding, query_root: dict):
        self.model = model
        self.query_root = query_root
        self.nodes: tuple[dict | None, dict | None] | None = None  # None: no word in progress

    def _end_word(self, nodes) -> bool:
        return nodes is None or any(n is not None and None in n for n in nodes)

    def step(self, token: int):
        """The state after `token` (an opaque value for `commit`), or False when not allowed."""
        if token == self.model.eos_id:
            return None if self._end_word(self.nodes) else False
        data = self.model.token_bytes[token] if token < len(self.model.token_bytes) else None
        if data is None:
            return False
        nodes = self.nodes
        for b in data:
            if b in b" \t\n\r\x0b\x0c|":
                if not self._end_word(nodes):
                    return False
                nodes = None
                continue
            b = b + 32 if 65 <= b <= 90 else b
            if nodes is None:
                nodes = (self.model.generative.root, self.query_root)
            nodes = tuple(n.get(b) if n is not None else None for n in nodes)
            if nodes[0] is None and nodes[1] is None:
                return False
        return nodes

    def allowed(self, token: int) -> bool:
        return self.step(token) is not False

    def commit(self, token: int) -> None:
        state = self.step(token)
        assert state is not False, "commit of a disallowed token: this is a bug"
        self.nodes = state

    def choose(self, logits: np.ndarray, top_k: int = 8) -> int:
        """The best allowed token: the top k first, then the whole row; end-of-sequence if none."""
        order = np.argpartition(-logits, top_k)[:top_k]
        for token in order[np.argsort(-logits[order])]:
            if self.allowed(int(token)):
                return int(token)
        for token in np.argsort(-logits):
            if self.allowed(int(token)):
                return int(token)
        return self.model.eos_id


# ---------------------------------------------------------------------------------------------
# Building the file from the training data.
# ---------------------------------------------------------------------------------------------

def training_rows(corpus: Path) -> tuple[list[Example], list[Example], list[Example]]:
    """The training split; one epoch of traffic rows but the open and misspelled ones (the model
    learns from both); and validation."""
    from .entities import collect_names
    from .traffic import Facts, epoch_rows

    splits = load_splits(corpus)
    train = splits["train"]
    traffic = epoch_rows(train, Facts.from_examples(train), collect_names(train), seed=13, epoch=1, aug_rate=0.0,
                         n=len(train) // 2)
    # Open rows echo their query, whose slots hold filler and invented words (traffic.py): no
    # names worth correcting a typo towards. Misspelled rows' names are spelled right in the
    # target and wrong in the query; `learn` keeps every traffic row out of the generative
    # vocabulary, and these stay out of the known words too: they add none (their targets are
    # the other rows'), and a name is the fuzzy rule's to correct near a query word.
    return train, [r for r in traffic if r.kind not in ("open", "misspelled")], splits["validation"]


# A generative word must be written, not copied, in at least this many distinct training targets.
# Properties, relations and types recur ('Birth Date', 'Located In'); a word written in one
# target only is that row's world knowledge ('The Lord of the Rings Frodo | ... Gandalf'), and
# allowing it everywhere let the model answer 'mona lisa Frodo | mona lisa Aragorn' (docs/grounding.md).
MIN_TARGETS = 2


def learn(train: list[Example], traffic: Sequence[Example] = (), min_targets: int = MIN_TARGETS) -> dict:
    """The file's content: vocabularies and guard sizes from the training targets. Traffic rows
    add known words and guard sizes, never generative words: they reuse the training split's
    property phrases in new targets, which would count one row's phrase many times over."""
    generative: dict[bytes, set] = defaultdict(set)
    known: set[bytes] = set()
    max_words, max_repeats, max_subs, ngram = 1, 1, 1, 2
    rows = list(train) + list(traffic)
    for i, ex in enumerate(rows):
        in_query = query_words(ex.query) if i < len(train) else None
        max_subs = max(max_subs, len(ex.subqueries))
        for sub in ex.subqueries:
            words = sub.split()
            max_words = max(max_words, len(words))
            folded = [fold(w) for w in words]
            max_repeats = max(max_repeats, max(folded.count(f) for f in folded))
            for f in folded:
                known.add(f)
                if in_query is not None and f not in in_query:
                    generative[f].add(ex.subqueries)
    # The smallest n-gram size that no training subquery repeats.
    while any(_repeats_ngram([fold(w) for w in s.split()], ngram) for ex in rows for s in ex.subqueries):
        ngram += 1
    return {
        "version": 1,
        "generative_words": sorted(w.decode("utf-8") for w, g in generative.items() if len(g) >= min_targets),
        "known_words": sorted(w.decode("utf-8") for w in known),
        "stopwords": DEFAULT_STOPWORDS,
        "fuzzy": DEFAULT_FUZZY,
        "guards": {"max_subquery_words": max_words, "max_word_repeats": max_repeats, "no_repeat_ngram": ngram,
                   "max_subqueries": max_subs},
        "min_mean_logprob": None,
    }


def _repeats_ngram(folded: list[bytes], n: int) -> bool:
    grams = [tuple(folded[i:i + n]) for i in range(len(folded) - n + 1)]
    return len(grams) != len(set(grams))


def check_on(rules: Rules, rows: list[Example]) -> dict:
    """How many references the guards alone, and grounding with them, would change."""
    guards_only = Rules(guards=rules.guards, stopwords=rules.stopwords)
    changed_by_guards = sum(sanitize(ex.target, ex.query, guards_only)[0] != list(ex.subqueries) for ex in rows)
    changed = sum(sanitize(ex.target, ex.query, rules)[0] != list(ex.subqueries) for ex in rows)
    degenerate = sum(is_degenerate(list(ex.subqueries), ex.query, rules) for ex in rows)
    invented = sum(has_invented_word(list(ex.subqueries), ex.query, rules) for ex in rows)
    return {"rows": len(rows), "changed_by_guards": changed_by_guards, "changed_by_grounding_and_guards": changed,
            "flagged_degenerate": degenerate, "with_ungrounded_word": invented}


def choose_guards(loosest: dict, val: list[Example]) -> dict:
    """Tighten each guard from the training data's extremes while it changes no more validation
    references than the loosest setting does (the extremes are often one noisy row)."""
    def changed(guards: dict) -> int:
        rules = Rules(guards=guards)
        return sum(sanitize(ex.target, ex.query, rules)[0] != list(ex.subqueries) for ex in val)

    guards, floor = dict(loosest), changed(loosest)
    for key, lowest in (("no_repeat_ngram", 2), ("max_word_repeats", 1), ("max_subquery_words", 1), ("max_subqueries", 1)):
        while guards[key] > lowest and changed({**guards, key: guards[key] - 1}) <= floor:
            guards[key] -= 1
    return guards


def write(model_dir: Path, corpus: Path = DEFAULT_CORPUS) -> tuple[Path, dict]:
    train, traffic, val = training_rows(corpus)
    data = learn(train, traffic)
    data["guards"] = choose_guards(data["guards"], val)
    path = Path(model_dir) / FILE_NAME
    path.write_text(json.dumps(data, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    return path, check_on(Rules.from_json(data), val)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    args = p.parse_args(argv)
    path, check = write(Path(args.model_dir), Path(args.corpus))
    data = json.loads(path.read_text(encoding="utf-8"))
    print(f"wrote {path}: {len(data['generative_words'])} generative words, {len(data['known_words'])} known words, "
          f"guards {data['guards']}")
    print(f"validation split: {json.dumps(check)}")


if __name__ == "__main__":
    main()
