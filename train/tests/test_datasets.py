"""Checks on the project's generated datasets (datasets/test.jsonl, datasets/dev.jsonl)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TRAIN_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = TRAIN_DIR.parent
SCRIPT = TRAIN_DIR / "make_datasets.py"
DATASETS = REPO_ROOT / "datasets"
KINDS = {"comparison", "chaining", "expansion"}


def _load_module():
    spec = importlib.util.spec_from_file_location("qr_make_datasets", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


md = _load_module()
CORPUS = Path(os.environ.get("QR_CORPUS", str(md.DEFAULT_CORPUS)))


def _read(name: str) -> list[dict]:
    path = DATASETS / f"{name}.jsonl"
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("name", ["test", "dev"])
def test_rows_parse_with_required_fields(name):
    rows = _read(name)
    assert rows, f"{name}.jsonl is empty"
    for row in rows:
        assert set(row) == {"query", "subqueries", "kind"}, row
        assert isinstance(row["query"], str) and row["query"].strip(), row
        assert isinstance(row["subqueries"], str), row
        assert row["kind"] in KINDS, row
        if row["subqueries"]:
            parts = row["subqueries"].split("|")
            assert all(p.strip() == p and p for p in parts), row


def test_test_set_size_kinds_and_labels():
    rows = _read("test")
    assert len(rows) >= 100
    counts = {k: sum(r["kind"] == k for r in rows) for k in KINDS}
    # roughly 50/25/25 % comparison/chaining/expansion
    assert 0.4 <= counts["comparison"] / len(rows) <= 0.6, counts
    assert 0.15 <= counts["chaining"] / len(rows) <= 0.35, counts
    assert 0.15 <= counts["expansion"] / len(rows) <= 0.35, counts
    for row in rows:
        assert len(row["subqueries"].split("|")) >= 2, row
    assert len({r["query"] for r in rows}) == len(rows), "duplicate test queries"


def test_dev_size_and_kinds():
    rows = _read("dev")
    assert 150 <= len(rows) <= 250
    assert {r["kind"] for r in rows} == KINDS
    assert len({r["query"] for r in rows}) == len(rows), "duplicate dev queries"
    lengths = sorted(len(r["query"].split()) for r in rows)
    assert lengths[0] <= 8 and lengths[-1] >= 30, "dev should mix short and long questions"


def test_dev_and_test_queries_are_disjoint():
    test_q = {r["query"] for r in _read("test")}
    dev_q = {r["query"] for r in _read("dev")}
    assert not test_q & dev_q


def test_generated_entities_appear_in_their_rows():
    for name, rows in md.generate().items():
        for row, entities in rows:
            assert entities, row
            for e in entities:
                assert e in row["subqueries"], (e, row)


def test_no_test_entity_occurs_in_corpus():
    if not CORPUS.is_file():
        pytest.skip(f"reference corpus not found at {CORPUS} (set QR_CORPUS); "
                    "entity-absence check skipped")
    text = md.corpus_text(CORPUS)
    used = []
    for _, entities in md.generate()["test"]:
        for e in entities:
            if e not in used:
                used.append(e)
    assert used
    assert md.entities_in_corpus(used, text) == []
    # ...and the whole entity pool, dev included.
    assert md.entities_in_corpus(md.all_entity_names(), text) == []


def test_make_datasets_check_passes():
    args = [sys.executable, str(SCRIPT), "--check"]
    if CORPUS.is_file():
        args += ["--corpus", str(CORPUS)]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
