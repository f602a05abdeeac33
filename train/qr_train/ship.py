"""Reproduce the shipped model from the corpus, end to end, on CPU:

    python -m qr_train.ship [--out models/qreformulate-t5] [--run train/runs/qr-t5] [--skip-train]

train (qr_train.train with the shipped hyper-parameters) -> export with Optimum -> int8
(quantize_dynamic, MatMulConstBOnly) -> grounding.json (docs/grounding.md) -> pytorch/ (the fp16
checkpoint, for qserver's native decoder and the peer benchmarks) -> evaluation (fp32 vs int8 vs echo) -> MODEL_CARD.md facts
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

from . import evaluate, export, grounding, plot, train
from .corpus import DEFAULT_CORPUS, REPO_ROOT
from .onnx_loop import DEFAULT_MAX_NEW_TOKENS

# The hyper-parameters of the shipped model (see MODEL_CARD.md for why this size). The shipped
# checkpoint was trained on a GPU with `--minutes 7 --data-workers 4` instead of `--steps`
# (train/scripts/device_sweep.sh), which ended at step 4806; `--steps` schedules about the
# same learning-rate curve by step, so a CPU gets the same training, only slower.
SHIPPED_TRAIN_ARGS = [
    "--vocab-size", "2048", "--d-model", "256", "--num-heads", "8", "--d-kv", "32", "--d-ff", "768",
    "--encoder-layers", "4", "--decoder-layers", "3", "--batch-size", "256", "--lr", "1.5e-3",
    "--warmup-steps", "400", "--steps", "4800", "--aug-rate", "0.6", "--eval-every", "1000",
    "--val-sample", "300", "--val-loss-rows", "600", "--gen-batch-size", "320", "--seed", "13",
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
    # Grounded decoding and the guards always ship: the fp32 export answers under the same rule.
    _, guard_check = grounding.write(args.out, args.corpus)
    shutil.copy(args.out / grounding.FILE_NAME, fp32_dir / grounding.FILE_NAME)
    write_pytorch_fp16(checkpoint, args.out / "pytorch")

    report = evaluate.evaluate({"fp32": fp32_dir, "int8": args.out, "int8" + evaluate.UNGUARDED: args.out},
                               args.corpus, evaluate.DEFAULT_LABELLED)
    report.pop("predictions")
    report["guards_on_validation_references"] = guard_check
    curve = json.loads((args.run / "curve.json").read_text())
    report["training"] = {k: curve.get(k) for k in ("parameters", "args", "device", "device_name", "averaged_from")}
    report["training"]["epochs"] = curve["epochs"]
    report["commit"] = git_commit()
    (args.out / "metrics.json").write_text(json.dumps(report, indent=2))
    if len(curve["epochs"]) >= 2:
        plot.plot(args.run / "curve.json", REPO_ROOT / "docs" / "training-curve.png")
    else:  # a run evaluated only at its end (a CPU fine-tune): no curve to draw; keep the last one
        print("one evaluation point: docs/training-curve.png left as it is")
    (args.out / "MODEL_CARD.md").write_text(model_card(args.out, report, args.skip_train))
    print(evaluate.markdown(report))


def _size_mib(model_dir: Path) -> float:
    return sum((model_dir / name).stat().st_size for name in export.ONNX_FILES) / 2**20


def model_card(model_dir: Path, report: dict, reused_run: bool) -> str:
    t = report["training"]
    a = t["args"]
    last = t["epochs"][-1]
    best = max(t["epochs"], key=lambda p: p["val_rouge_l"])
    on_gpu = t["device"].startswith("cuda")
    hardware = f"one {t.get('device_name') or 'CUDA GPU'} (bf16 autocast)" if on_gpu else "the CPU"
    schedule = (f"cosine schedule over {a['steps']} steps" if a.get("steps")
                else f"cosine schedule over a {a['minutes']}-minute wall-time budget")
    grounding_note = ("`grounding.json` (grounded decoding and output guards, `docs/grounding.md`: the generative "
                      "vocabulary, the known names and the guard sizes, learned from the training data)")
    tok_source = "Given with `--tokenizer`" if a.get("tokenizer") else "Taken from the `--init` checkpoint"
    tok_note = (f"\n  {tok_source}: trained on the training split by `qr_train.tokenizer`. A retrained one\n"
                "  has the same pieces; equal-score pieces may take other ids (trainer order), so retrain\n"
                "  the model with its tokenizer, never mix the two." if a.get("tokenizer") or a.get("init") else "")
    gpu_note = ("\n- This checkpoint: run `d256-aug60` of `train/scripts/device_sweep.sh` (three sizes trained side\n"
                "  by side on one GPU, `--minutes 7`), fp16 copy brought back, then exported and evaluated on\n"
                "  CPU by `python -m qr_train.ship --skip-train --run runs/gpu-d256`." if on_gpu and not a.get("init") else "")
    init_note = (f"\n- This checkpoint: `{a['init']}` fine-tuned on {hardware} with traffic-shaped rows mixed in\n"
                 f"  (`qr_train.traffic`, rate {a.get('traffic_rate')}):\n"
                 f"  `python -m qr_train.train --init ... --minutes {a.get('minutes')} --batch-size {a['batch_size']} --lr {a['lr']}`,\n"
                 + ("  on the device with `SWEEP=traffic train/scripts/device_sweep.sh` (fp16 copies brought back),\n  "
                    if on_gpu else "  ")
                 + (f"weights averaged over the runs {', '.join(f'`{Path(r).name}`' for r in t['averaged_from'])} "
                    "(`python -m qr_train.average`, a run named twice weighing twice; the settings above are the first run's),\n  "
                    if t.get("averaged_from") else "")
                 + "then `python -m qr_train.ship --skip-train --run RUN`." if a.get("init") else "")
    curve_note = ("Curve: `docs/training-curve.png`." if len(t["epochs"]) >= 2 else
                  "This run was evaluated once, at its end (no curve); `docs/training-curve.png` is an earlier run's.")
    shape = (f"T5 (v1.1 style: gated-GELU, untied lm_head), d_model {a['d_model']}, {a['encoder_layers']} encoder + "
             f"{a['decoder_layers']} decoder layers, {a['num_heads']} heads x d_kv {a['d_kv']}, d_ff {a['d_ff']}, "
             f"vocab {json.loads((model_dir / 'config.json').read_text())['vocab_size']}")
    return f"""# qreformulate-t5

A small T5 trained **from scratch** (no pretrained weights can be downloaded on our machines)
to rewrite a question into search-engine subqueries joined by ` | `. Generated by
`python -m qr_train.ship`; the numbers below come from `metrics.json` beside this file.

## Provenance
- Corpus: `../shared/datasets/query-reformulation/corpus.jsonl` (alexdong/query-reformulation,
  commit afb246c8d9c37e6451ee1af0e78dd581e51b2a4f, MIT), read from that path, never copied.
- Split: by group (all paraphrases of one `subqueries` value on one side): sha1(subqueries)
  mod 10 == 0 -> test, == 1 -> validation, else train (`qr_train/corpus.py`).
- Code commit: {report['commit']}{' (training run reused with --skip-train)' if reused_run else ''}.
- Command: `cd train && ../.venv/bin/python -m qr_train.ship` (hyper-parameters in
  `qr_train/ship.py: SHIPPED_TRAIN_ARGS`); seed {a['seed']}; device {t['device']}.{gpu_note}{init_note}

## Model
- {shape}; {t['parameters'] / 1e6:.2f}M parameters.
- Tokenizer: Unigram with byte fallback (`<pad>`=0, `</s>`=1, `<unk>`=2; never `<unk>`), `tokenizer.json`.{tok_note}
- Files: `encoder_model.onnx`, `decoder_model.onnx`, `decoder_with_past_model.onnx` (int8,
  dynamic quantization of the weight MatMuls, {_size_mib(model_dir):.1f} MiB in all), `config.json`,
  `generation_config.json`, `tokenizer.json`, {grounding_note}, `pytorch/` (the fp16 checkpoint:
  qserver's native decoder quantizes its decoder weights to int8 at start-up, and the peer
  benchmarks build their engines from it).
- Training: AdamW, peak lr {a['lr']}, batch {a['batch_size']}, warm-up {a['warmup_steps']} steps,
  {schedule}, on {hardware}; entity-swap augmentation rate {a['aug_rate']}, a fresh augmentation
  each epoch; traffic-shaped rows (`qr_train.traffic`) at {a.get('traffic_rate', 0)} x the training rows per epoch. {last['step']} steps ({last['epoch']} epochs) in {last['elapsed_seconds'] / 60:.1f}
  minutes; the checkpoint kept is the best by validation ROUGE-L (step {best['step']}:
  {best['val_rouge_l']:.3f}, exact match {best['val_exact_match']:.3f}, unseen-entity copy rate
  {best['unseen_entity_copy_rate']:.3f}). {curve_note}

## Evaluation (`python -m qr_train.evaluate --unguarded`, greedy, at most {DEFAULT_MAX_NEW_TOKENS} new tokens)

`int8` answers as the server does: grounded decoding and the output guards of
`docs/grounding.md`; `int8 unguarded` is plain greedy with the plain split, for comparison.
invented = answers with a word neither in the query, a known name near a query word, nor the
generative vocabulary; degenerate = answers breaking a guard; fallback = answers that are the
query itself because nothing usable was left. The guards' sizes, checked on the validation
split's references: {report.get('guards_on_validation_references')}.

{evaluate.markdown(report)}

Metric definitions are in `train/qr_train/metrics.py` (the same as the server's Evaluate RPC).
The unseen-entity probe replaces the entity names of held-out rows with invented names that
occur nowhere in the training data and counts the names written back exactly.

## Limits
Trained from scratch on 2.3k groups of one public corpus: it knows that corpus's properties
('Birth Date', 'Height', 'Located In Country', ...) and copies names it never saw, but it has no
world knowledge a pretrained Flan-T5 brings. Bring one (`README.md`, "Bringing a real Flan-T5").
"""


if __name__ == "__main__":
    main()
