"""Calibrate the confidence fallback on the validation split, and set it only when it pays.

    python -m qr_train.confidence MODEL_DIR [--write]

The server can answer with the query itself when the model's mean token log-probability is
below `min_mean_logprob` (grounding.json). Whether that helps is an empirical question: a
small model is often confidently wrong. This answers every validation row (the corpus's
validation split plus traffic-shaped rows made from it, so both styles count), then, for each
candidate threshold, scores the answers a server with that threshold would give (ROUGE-L
against the labels; below the threshold the answer is the query). The best threshold is
written (`--write`) only when it beats no threshold by at least `--min-gain` ROUGE-L.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from . import grounding
from .corpus import DEFAULT_CORPUS, Example, load_splits
from .entities import NameFactory, collect_names
from .metrics import rouge_l
from .onnx_loop import OnnxT5
from .traffic import Facts, TrafficMaker


def validation_rows(corpus: Path, traffic: int, seed: int = 29) -> list[Example]:
    val = load_splits(corpus)["validation"]
    maker = TrafficMaker(val, Facts.from_examples(val, min_entities=2), NameFactory(seed, collect_names(val)), 0.5, seed)
    return val + maker.rows(traffic)


def sweep(scored: list[tuple[float, float, float]]) -> list[dict]:
    """scored: (mean log-prob, answer ROUGE-L, echo ROUGE-L) per row -> one point per threshold."""
    lps = np.array([s[0] for s in scored])
    answer = np.array([s[1] for s in scored])
    echo = np.array([s[2] for s in scored])
    points = [{"threshold": None, "rouge_l": float(answer.mean()), "fallback_rate": 0.0}]
    for t in np.quantile(lps, [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3]):
        below = lps < t
        points.append({"threshold": round(float(t), 4), "rouge_l": float(np.where(below, echo, answer).mean()),
                       "fallback_rate": float(below.mean())})
    return points


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--traffic", type=int, default=600, help="traffic-shaped rows made from the validation split")
    p.add_argument("--min-gain", type=float, default=0.005)
    p.add_argument("--write", action="store_true", help="write the threshold into grounding.json when it pays")
    args = p.parse_args(argv)
    model = OnnxT5(args.model_dir)
    if model.rules is None:
        raise SystemExit(f"{args.model_dir} has no {grounding.FILE_NAME}: nothing to calibrate")
    scored = []
    for ex in validation_rows(args.corpus, args.traffic):
        subs, reason, lp = model.answer(ex.query)
        scored.append((lp, rouge_l(subs, ex.subqueries), rouge_l([ex.query], ex.subqueries)))
    points = sweep(scored)
    best = max(points, key=lambda q: q["rouge_l"])
    pays = best["threshold"] is not None and best["rouge_l"] - points[0]["rouge_l"] >= args.min_gain
    print(json.dumps({"rows": len(scored), "points": points, "best": best, "pays": pays}, indent=1))
    if args.write:
        path = args.model_dir / grounding.FILE_NAME
        data = json.loads(path.read_text(encoding="utf-8"))
        data["min_mean_logprob"] = best["threshold"] if pays else None
        path.write_text(json.dumps(data, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
        print(f"{path}: min_mean_logprob = {data['min_mean_logprob']}")


if __name__ == "__main__":
    main()
