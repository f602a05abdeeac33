"""Evaluate exported models and print the metric table.

    python -m qr_train.evaluate --model models/qreformulate-t5 [--fp32 DIR] [--unguarded] [--json OUT]
                                [--gguf OUT/model-q8_0.gguf ...]

Rows: each model (int8, and fp32 when given) answering as the server does (grounded decoding
and the guards of docs/grounding.md when the model ships grounding.json) and an echo-the-input
baseline, on the corpus's group-held-out test split, the project's datasets/test.jsonl (unseen
entities) and datasets/robustness.jsonl (traffic-shaped queries), overall and per kind, with
the trust metrics (invented-word, degenerate and fallback rates); plus the unseen-entity copy
rate and, with --fp32, int8/fp32 greedy agreement. --unguarded adds the same model decoding
plain greedy with today's split, for comparison. --gguf adds a GGUF file of the same checkpoint
(`qr_train.gguf`), run by llama.cpp (`qr_train.gguf_loop`, needs llama-cpp-python: `make
bench-deps`) with the grounding.json beside it, and the share of its answers identical to the
int8 ONNX model's (and the fp32 one's, with --fp32).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import grounding
from . import subqueries as sq
from .corpus import DEFAULT_CORPUS, REPO_ROOT, Example, load_labelled_jsonl, load_splits
from .greedy import GreedyT5
from .metrics import MetricTable
from .onnx_loop import OnnxT5
from .unseen import PROBE_SEED, copy_rate, unseen_entity_set

DEFAULT_LABELLED = REPO_ROOT / "datasets" / "test.jsonl"
DEFAULT_ROBUSTNESS = REPO_ROOT / "datasets" / "robustness.jsonl"
UNGUARDED = " unguarded"
GGUF = "gguf "  # label prefix of a GGUF file run by llama.cpp


def load_model(path: Path) -> GreedyT5:
    """An ONNX model directory (OnnxT5) or a .gguf file (GgufT5, llama.cpp)."""
    if Path(path).suffix == ".gguf":
        from .gguf_loop import GgufT5

        return GgufT5(path)
    return OnnxT5(path)


def runtime(label: str) -> str:
    return "llama.cpp via llama-cpp-python" if label.startswith(GGUF) else "Python ONNX Runtime loop"


def score(answers: list[tuple[list[str], str]], examples: list[Example], rules: grounding.Rules | None) -> list[dict]:
    """answers: (subqueries, fallback reason) per example."""
    table = MetricTable()
    for (subs, reason), ex in zip(answers, examples):
        # Invented and degenerate judge what the model wrote; a fallback is the user's query.
        written = reason == grounding.NONE
        table.add(subs, ex.subqueries, ex.kind,
                  invented=(written and grounding.has_invented_word(subs, ex.query, rules)) if rules else None,
                  degenerate=written and grounding.is_degenerate(subs, ex.query, rules),
                  fallback=not written)
    return [row.as_dict() for row in table.rows()]


def echo_answers(examples: list[Example]) -> list[tuple[list[str], str]]:
    """The echo baseline: an answer that always falls back to the query."""
    return [([ex.query], "ECHO") for ex in examples]


def predict(model: GreedyT5, queries: list[str], guarded: bool = True) -> tuple[list[tuple[list[str], str]], float]:
    """(subqueries, reason) per query as the server answers; unguarded: plain greedy and split."""
    started = time.perf_counter()
    if guarded:
        out = [model.answer(q)[:2] for q in queries]
    else:
        out = [(sq.split(model.generate(q, grounded=False), q), grounding.NONE) for q in queries]
    return out, (time.perf_counter() - started) * 1000 / max(len(queries), 1)


def evaluate(model_dirs: dict[str, Path], corpus: Path, labelled: Path | None, probe_size: int = 300,
             robustness: Path | None = DEFAULT_ROBUSTNESS) -> dict:
    """model_dirs: label -> model directory or .gguf file; a label ending in ' unguarded' decodes plain greedy."""
    splits = load_splits(corpus)
    sets = {"corpus test split": splits["test"]}
    if labelled and labelled.exists():
        sets["datasets/test.jsonl"] = load_labelled_jsonl(labelled)
    if robustness and robustness.exists():
        sets["datasets/robustness.jsonl"] = load_labelled_jsonl(robustness)
    probe = unseen_entity_set(splits["test"], splits["train"], seed=PROBE_SEED, limit=probe_size)
    report: dict = {"tables": {}, "unseen_entities": {}, "ms_per_query": {}, "predictions": {}}
    first_rules = next((grounding.Rules.load(d) for d in model_dirs.values()), None)
    for set_name, examples in sets.items():
        report["tables"][f"echo baseline / {set_name}"] = score(echo_answers(examples), examples, first_rules)
    for label, model_dir in model_dirs.items():
        model = load_model(model_dir)
        guarded = not label.endswith(UNGUARDED)
        rules = model.rules
        for set_name, examples in sets.items():
            answers, ms = predict(model, [ex.query for ex in examples], guarded)
            report["tables"][f"{label} / {set_name}"] = score(answers, examples, rules)
            report["ms_per_query"][f"{label} / {set_name}"] = ms
            report["predictions"][f"{label} / {set_name}"] = [" | ".join(s) for s, _ in answers]
        probe_answers, _ = predict(model, [ex.query for ex, _ in probe], guarded)
        report["unseen_entities"][label] = {
            "names": sum(len(n) for _, n in probe), "rows": len(probe),
            "copied_exactly": copy_rate(probe, [" | ".join(s) for s, _ in probe_answers]),
        }
    if "fp32" in model_dirs and "int8" in model_dirs:
        a, b = "fp32", "int8"
        for set_name in sets:
            pa, pb = report["predictions"][f"{a} / {set_name}"], report["predictions"][f"{b} / {set_name}"]
            report.setdefault("agreement", {})[set_name] = identical_share(pa, pb)
    # Each GGUF model against the ONNX ones it was converted alongside: identical answers.
    for label in (x for x in model_dirs if x.startswith(GGUF)):
        for ref in (r for r in ("int8", "fp32") if r in model_dirs):
            report.setdefault("identical", {})[f"{label} vs {ref}"] = {
                set_name: identical_share(report["predictions"][f"{label} / {set_name}"],
                                          report["predictions"][f"{ref} / {set_name}"]) for set_name in sets}
    return report


def identical_share(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(len(a), 1)


def markdown(report: dict) -> str:
    lines = ["| model / set | rows | exact match | ROUGE-L | count acc. | Levenshtein | invented | degenerate | fallback |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rows in report["tables"].items():
        for row in rows:
            label = name if row["name"] == "overall" else f"&nbsp;&nbsp;{row['name']}"
            invented = "n/a" if row.get("invented_rate") is None else f"{row['invented_rate']:.3f}"
            lines.append(f"| {label} | {row['examples']} | {row['exact_match']:.3f} | {row['rouge_l']:.3f} "
                         f"| {row['count_accuracy']:.3f} | {row['levenshtein']:.3f} | {invented} "
                         f"| {row.get('degenerate_rate', 0):.3f} | {row.get('fallback_rate', 0):.3f} |")
    lines.append("")
    for label, u in report["unseen_entities"].items():
        lines.append(f"- unseen-entity probe, {label}: {u['copied_exactly']:.1%} of {u['names']} invented names "
                     f"(in {u['rows']} held-out rows) reproduced exactly")
    for set_name, agree in report.get("agreement", {}).items():
        lines.append(f"- int8 vs fp32 identical greedy output on {set_name}: {agree:.1%}")
    for pair, shares in report.get("identical", {}).items():
        for set_name, share in shares.items():
            lines.append(f"- {pair} identical answers on {set_name}: {share:.1%}")
    for name, ms in report["ms_per_query"].items():
        lines.append(f"- {name}: {ms:.1f} ms/query ({runtime(name)}, 1 thread)")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REPO_ROOT / "models" / "qreformulate-t5", help="int8 model directory")
    p.add_argument("--fp32", type=Path, help="the fp32 export of the same checkpoint, for parity")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--labelled", type=Path, default=DEFAULT_LABELLED, help="the project's labelled test set")
    p.add_argument("--robustness", type=Path, default=DEFAULT_ROBUSTNESS, help="the project's traffic-shaped set")
    p.add_argument("--json", type=Path, help="also write the full report (with predictions) here")
    p.add_argument("--unguarded", action="store_true", help="also evaluate plain greedy without grounding and guards")
    p.add_argument("--gguf", type=Path, action="append", default=[],
                   help="a GGUF file of the same checkpoint (qr_train.gguf), run by llama.cpp; repeatable")
    args = p.parse_args(argv)
    models = {"fp32": args.fp32} if args.fp32 else {}
    models["int8"] = args.model
    if args.unguarded:
        models["int8" + UNGUARDED] = args.model
    for path in args.gguf:
        models[GGUF + path.stem.removeprefix("model-")] = path
    report = evaluate(models, args.corpus, args.labelled, robustness=args.robustness)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(markdown(report))


if __name__ == "__main__":
    main()
