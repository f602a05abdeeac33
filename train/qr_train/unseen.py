"""The unseen-entity probe: held-out rows whose entity names are replaced by invented names
that never occur in the training data; the score is the share of those names that the model
writes back exactly (case-sensitive substring of its output)."""
from __future__ import annotations

from .corpus import Example
from .entities import NameFactory, find_mentions, substitute

# A seed range of its own, so probe names are not the names training invented.
PROBE_SEED_OFFSET = 1_000_003


def unseen_entity_set(held_out: list[Example], train: list[Example], seed: int, limit: int) -> list[tuple[Example, list[str]]]:
    training_text = "\n".join(ex.query + "\n" + ex.target for ex in train).lower()
    names = NameFactory(seed + PROBE_SEED_OFFSET)
    out = []
    for ex in held_out:
        mentions = find_mentions(ex)
        if not mentions:
            continue
        mapping = {}
        for m in mentions:
            new = names.invented(m.name)
            while new.lower() in training_text:
                new = names.invented(m.name)
            mapping[m.name] = new
        swapped = substitute(ex, mapping)
        expected = [n for n in mapping.values() if n in swapped.target]
        if expected:
            out.append((swapped, expected))
        if len(out) >= limit:
            break
    return out


def copy_rate(probe: list[tuple[Example, list[str]]], predictions: list[str]) -> float:
    hits = total = 0
    for (_, names), text in zip(probe, predictions):
        for name in names:
            total += 1
            hits += name in text
    return hits / max(total, 1)
