#!/usr/bin/env bash
# Train several T5 reformulators side by side on one GPU (the `device` machine), then pack the
# checkpoints as fp16 into $OUT in parts small enough to come back. One run of this script was
# the source of the shipped model; see models/qreformulate-t5/MODEL_CARD.md.
#
#   bash train/scripts/device_sweep.sh CORPUS TOKENIZER MINUTES
#
# Each run is qr_train.train itself (the same script trains on CPU); only the sizes and the
# number of data workers differ. Small models leave a GPU mostly idle, so three share it.
set -u
corpus=$1 tokenizer=$2 minutes=$3
out=${OUT:-/tmp/sweep-out}
runs=${RUNS_DIR:-/tmp/sweep}
workers=${DATA_WORKERS:-4}
mkdir -p "$out" "$runs"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

common=(--corpus "$corpus" --tokenizer "$tokenizer" --minutes "$minutes" --batch-size 256
        --warmup-steps 400 --eval-every "${EVAL_EVERY:-1000}" --val-sample 300 --val-loss-rows 600
        --gen-batch-size 320 --seed 13 --data-workers "$workers" --threads 1)
# SWEEP=scratch (default): from-scratch sizes, the run the first shipped model came from.
# SWEEP=traffic: fine-tune the shipped checkpoint (INIT) with traffic-shaped rows, and one
# from-scratch run with them, for the grounding issue's retraining (MODEL_CARD.md, history).
init=${INIT:-../models/qreformulate-t5/pytorch}
declare -A sizes
if [ "${SWEEP:-scratch}" = traffic ]; then
  sizes=(
  [ft-lr5-aug85]="--init $init --lr 5e-4 --warmup-steps 200 --aug-rate 0.85 --traffic-rate 0.8"
  [ft-lr3-aug60]="--init $init --lr 3e-4 --warmup-steps 200 --aug-rate 0.6 --traffic-rate 0.8"
  [scratch-aug85]="--d-model 256 --num-heads 8 --d-kv 32 --d-ff 768 --encoder-layers 4 --decoder-layers 3 --lr 1.5e-3 --aug-rate 0.85 --traffic-rate 0.6"
  )
else
  sizes=(
  [d384-aug60]="--d-model 384 --num-heads 6 --d-kv 64 --d-ff 1024 --encoder-layers 6 --decoder-layers 3 --lr 1e-3 --aug-rate 0.6"
  [d384-aug85]="--d-model 384 --num-heads 6 --d-kv 64 --d-ff 1024 --encoder-layers 6 --decoder-layers 3 --lr 1e-3 --aug-rate 0.85"
  [d256-aug60]="--d-model 256 --num-heads 8 --d-kv 32 --d-ff 768 --encoder-layers 4 --decoder-layers 3 --lr 1.5e-3 --aug-rate 0.6"
  )
fi
if [ -n "${TINY:-}" ]; then  # a smoke test of this script on a CPU
  for k in "${!sizes[@]}"; do sizes[$k]="--d-model 32 --num-heads 2 --d-kv 8 --d-ff 64 --encoder-layers 1 --decoder-layers 1 --aug-rate 0.6 --limit-val 120"; done
fi
limit=$(python3 -c "print(int($minutes * 60 + 90))")
for name in "${!sizes[@]}"; do
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 timeout "$limit" python3 -m qr_train.train --out "$runs/$name" "${common[@]}" ${sizes[$name]} \
    >"$runs/$name.log" 2>&1 &
done
wait
for name in "${!sizes[@]}"; do echo "== $name"; tail -n 3 "$runs/$name.log"; done

# fp16 copies of each checkpoint (the CPU side casts back to fp32), curves and logs; then one tar
# cut into 15 MiB parts (the device returns at most 16 MiB per file).
python3 - "$runs" "$runs/pack" <<'PY'
import json, shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
runs, pack = Path(sys.argv[1]), Path(sys.argv[2])
pack.mkdir(parents=True, exist_ok=True)
for run in sorted(p for p in runs.iterdir() if (p / "checkpoint").is_dir()):
    dst = pack / run.name
    dst.mkdir(exist_ok=True)
    ck = run / "checkpoint"
    state = load_file(ck / "model.safetensors")
    save_file({k: v.half().contiguous() for k, v in state.items()}, dst / "model.safetensors")
    for f in ("config.json", "generation_config.json", "tokenizer.json"):
        if (ck / f).exists():
            shutil.copy(ck / f, dst / f)
    for f in (run / "curve.json", runs / f"{run.name}.log"):
        if f.exists():
            shutil.copy(f, dst / f.name)
    best = max(json.loads((run / "curve.json").read_text())["epochs"], key=lambda p: p["val_rouge_l"])
    print(run.name, "best", best)
PY
tar -C "$runs/pack" -cf "$runs/sweep.tar" .
split -b 15M -d "$runs/sweep.tar" "$out/sweep.tar.part"
ls -la "$out"
