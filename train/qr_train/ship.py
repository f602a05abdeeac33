"""Reproduce the shipped model from the corpus, end to end, on CPU:

    python -m qr_train.ship [--out models/qreformulate-t5] [--run train/runs/qr-t5] [--skip-train]

train (qr_train.train with the shipped hyper-parameters) -> export with Optimum -> int8
(quantize_dynamic, MatMulConstBOnly) -> constraint.json (property words) -> pytorch/ (the fp16
checkpoint, for the peer benchmarks) -> evaluation (fp32 vs int8 vs echo) -> MODEL_CARD.md facts
in OUT/metrics.json and the training curve in docs/training-curve.png.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import torch
from transformers import T5ForConditionalGeneration

from . import constraint, evaluate, export, plot, train
from .corpus import DEFAULT_CORPUS, REPO_ROOT, load_splits

# The hyper-parameters of the shipped model (see MODEL_CARD.md for why this size).
SHIPPED_TRAIN_ARGS = [
    "--vocab-size", "2048", "--d-model", "192", "--num-heads", "6", "--d-kv", "32", "--d-ff", "512",
    "--encoder-layers", "3", "--decoder-layers", "2", "--batch-size", "32", "--lr", "2e-3",
    "--warmup-steps", "200", "--minutes", "75", "--eval-every", "400", "--val-sample", "100",
    "--val-loss-rows", "400", "--seed", "13", "--threads", "2",
]


def write_pytorch_fp16(checkpoint: Path, out: Path) -> None:
    model = T5ForConditionalGeneration.from_pretrained(checkpoint).half()
    model.save_pretrained(out, safe_serialization=True)
    shutil.copy(checkpoint / "tokenizer.json", out / "tokenizer.json")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "models" / "qreformulate-t5")
    p.add_argument("--run", type=Path, default=REPO_ROOT / "train" / "runs" / "qr-t5")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--skip-train", action="store_true", help="reuse RUN/checkpoint from an earlier training run")
    p.add_argument("--exclude-nodes-like", default="", help="MatMul name fragments to keep fp32 (see export.py)")
    args = p.parse_args(argv)

    if not args.skip_train:
        train.main(["--out", str(args.run), "--corpus", str(args.corpus)] + SHIPPED_TRAIN_ARGS)
    checkpoint = args.run / "checkpoint"
    fp32_dir = args.run / "onnx-fp32"
    if args.out.exists():
        shutil.rmtree(args.out)
    export.export_fp32(checkpoint, fp32_dir)
    export.quantize_dir(fp32_dir, args.out, [x for x in args.exclude_nodes_like.split(",") if x])
    words = constraint.learn_property_words(load_splits(args.corpus)["train"])
    constraint.save(args.out, words)
    shutil.copy(args.out / constraint.FILE_NAME, fp32_dir / constraint.FILE_NAME)
    write_pytorch_fp16(checkpoint, args.out / "pytorch")

    report = evaluate.evaluate({"fp32": fp32_dir, "int8": args.out, "int8 + constraint": args.out},
                               args.corpus, evaluate.DEFAULT_LABELLED)
    report.pop("predictions")
    curve = json.loads((args.run / "curve.json").read_text())
    report["training"] = {k: curve[k] for k in ("parameters", "args", "device")}
    report["training"]["epochs"] = curve["epochs"]
    report["commit"] = git_commit()
    (args.out / "metrics.json").write_text(json.dumps(report, indent=2))
    plot.plot(args.run / "curve.json", REPO_ROOT / "docs" / "training-curve.png")
    print(evaluate.markdown(report))


if __name__ == "__main__":
    main()
