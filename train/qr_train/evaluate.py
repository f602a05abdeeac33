"""Evaluate exported models and print the metric table.

    python -m qr_train.evaluate --model models/qreformulate-t5 [--fp32 DIR] [--json OUT]

Rows: each model (int8, and fp32 when given) and an echo-the-input baseline, on the corpus's
group-held-out test split and on the project's datasets/test.jsonl (unseen entities), overall
and per kind; plus the unseen-entity copy rate and, with --fp32, int8/fp32 greedy agreement.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import subqueries as sq
from .corpus import DEFAULT_CORPUS, REPO_ROOT, Example, load_labelled_jsonl, load_splits
from .metrics import MetricTable
from .onnx_loop import OnnxT5
from .unseen import copy_rate, unseen_entity_set

DEFAULT_LABELLED = REPO_ROOT / "datasets" / "test.jsonl"


def score(predictions: list[str], examples: list[Example]) -> list[dict]:
    table = MetricTable()
    for text, ex in zip(predictions, examples):
        table.add(sq.split(text, ex.query), ex.subqueries, ex.kind)
    return [row.as_dict() for row in table.rows()]


def predict(model: OnnxT5, queries: list[str], constrained: bool = False) -> tuple[list[str], float]:
    started = time.perf_counter()
    out = [model.generate(q, constrained=constrained) for q in queries]
    return out, (time.perf_counter() - started) * 1000 / max(len(queries), 1)


def evaluate(model_dirs: dict[str, Path], corpus: Path, labelled: Path | None, probe_size: int = 300) -> dict:
    """model_dirs: label -> model directory; a label ending in '+ constraint' decodes with the
    model's capitalised-word constraint (constraint.json)."""
    splits = load_splits(corpus)
    sets = {"corpus test split": splits["test"]}
    if labelled and labelled.exists():
        sets["datasets/test.jsonl"] = load_labelled_jsonl(labelled)
    probe = unseen_entity_set(splits["test"], splits["train"], seed=7, limit=probe_size)
    report: dict = {"tables": {}, "unseen_entities": {}, "ms_per_query": {}, "predictions": {}}
    for set_name, examples in sets.items():
        report["tables"][f"echo baseline / {set_name}"] = score([ex.query for ex in examples], examples)
    for label, model_dir in model_dirs.items():
        model = OnnxT5(model_dir)
        constrained = label.endswith("+ constraint")
        if constrained and model.property_words is None:
            raise SystemExit(f"{model_dir} has no constraint.json")
        for set_name, examples in sets.items():
            preds, ms = predict(model, [ex.query for ex in examples], constrained)
            report["tables"][f"{label} / {set_name}"] = score(preds, examples)
            report["ms_per_query"][f"{label} / {set_name}"] = ms
            report["predictions"][f"{label} / {set_name}"] = preds
        probe_preds, _ = predict(model, [ex.query for ex, _ in probe], constrained)
        report["unseen_entities"][label] = {
            "names": sum(len(n) for _, n in probe), "rows": len(probe),
            "copied_exactly": copy_rate(probe, probe_preds),
        }
    if "fp32" in model_dirs and "int8" in model_dirs:
        a, b = "fp32", "int8"
        for set_name in sets:
            pa, pb = report["predictions"][f"{a} / {set_name}"], report["predictions"][f"{b} / {set_name}"]
            report.setdefault("agreement", {})[set_name] = sum(x == y for x, y in zip(pa, pb)) / max(len(pa), 1)
    return report


def markdown(report: dict) -> str:
    lines = ["| model / set | rows | exact match | ROUGE-L | count acc. | Levenshtein |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, rows in report["tables"].items():
        for row in rows:
            label = name if row["name"] == "overall" else f"&nbsp;&nbsp;{row['name']}"
            lines.append(f"| {label} | {row['examples']} | {row['exact_match']:.3f} | {row['rouge_l']:.3f} "
                         f"| {row['count_accuracy']:.3f} | {row['levenshtein']:.3f} |")
    lines.append("")
    for label, u in report["unseen_entities"].items():
        lines.append(f"- unseen-entity probe, {label}: {u['copied_exactly']:.1%} of {u['names']} invented names "
                     f"(in {u['rows']} held-out rows) reproduced exactly")
    for set_name, agree in report.get("agreement", {}).items():
        lines.append(f"- int8 vs fp32 identical greedy output on {set_name}: {agree:.1%}")
    for name, ms in report["ms_per_query"].items():
        lines.append(f"- {name}: {ms:.1f} ms/query (Python ONNX Runtime loop, 1 thread)")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REPO_ROOT / "models" / "qreformulate-t5", help="int8 model directory")
    p.add_argument("--fp32", type=Path, help="the fp32 export of the same checkpoint, for parity")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--labelled", type=Path, default=DEFAULT_LABELLED, help="the project's labelled test set")
    p.add_argument("--json", type=Path, help="also write the full report (with predictions) here")
    p.add_argument("--constrained", action="store_true", help="also evaluate with the capitalised-word constraint")
    args = p.parse_args(argv)
    models = {"fp32": args.fp32} if args.fp32 else {}
    models["int8"] = args.model
    if args.constrained:
        models["int8 + constraint"] = args.model
    report = evaluate(models, args.corpus, args.labelled)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(markdown(report))


if __name__ == "__main__":
    main()
