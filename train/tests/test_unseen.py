"""The unseen-name probes (qr_train/unseen.py) on the shared corpus's held-out rows."""
import json
import re

import pytest

from qr_train.corpus import load_splits
from qr_train.unseen import PROBE_SEED, main, unseen_entity_set


@pytest.fixture(scope="module")
def splits(corpus_path):
    return load_splits(corpus_path)


def test_punctuated_probe_names_have_an_apostrophe_or_hyphen_and_sit_in_query_and_target(splits):
    probe = unseen_entity_set(splits["test"], splits["train"], seed=PROBE_SEED, limit=50, punctuated=True)
    assert len(probe) == 50
    in_query = 0
    for ex, names in probe:
        assert names
        for name in names:
            assert re.search(r"\w['’-]\w", name), name
            assert name in ex.target, (name, ex)
            in_query += name in ex.query
    # A few targets name what the query abbreviates ('NOAA'), as the plain probe's do.
    assert in_query >= 0.9 * sum(len(n) for _, n in probe)


def test_the_plain_probe_is_what_it_was(splits):
    """The flag draws nothing when off: the probe whose figures are quoted keeps its names (these
    are the names the code before the flag gave)."""
    plain = unseen_entity_set(splits["test"], splits["train"], seed=PROBE_SEED, limit=3)
    assert [n for _, names in plain for n in names] == [
        "Tämron Diaträsmi Bridge", "Caillean Thakvyl", "Gribrynddeak", "Tarprak Tävkalbrom District", "Sertthur",
        "Eamthea Stevvi"]
    more = unseen_entity_set(splits["test"], splits["train"], seed=PROBE_SEED, limit=20)
    assert not any(re.search(r"\w['’]\w", n) for _, names in more for n in names)


def test_score_counts_the_names_found_in_the_answers(tmp_path, corpus_path, capsys):
    probe = tmp_path / "probe.jsonl"
    main(["write", str(probe), "--punctuated", "--limit", "3", "--corpus", str(corpus_path)])
    rows = [json.loads(line) for line in probe.read_text().splitlines()]
    # The first row answered with its label, the others with nothing of theirs.
    answers = [rows[0]["subqueries"].split(" | ")] + [["Population"] for _ in rows[1:]]
    (tmp_path / "eval.json").write_text(json.dumps(
        {"examples": [{"query": r["query"], "predicted": a} for r, a in zip(rows, answers)]}))
    capsys.readouterr()
    main(["score", str(probe), str(tmp_path / "eval.json")])
    total = sum(len(r["names"]) for r in rows)
    assert capsys.readouterr().out.strip() == f"names copied: {len(rows[0]['names'])} of {total} " \
        f"({len(rows[0]['names']) / total:.1%})"
