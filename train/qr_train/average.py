"""Average the weights of training runs that share one initialisation (a "model soup").

    python -m qr_train.average OUT_RUN RUN [RUN ...]

Writes OUT_RUN/checkpoint (the element-wise mean of each RUN/checkpoint's tensors, stored in the
first run's dtypes, with its config and tokenizer) and OUT_RUN/curve.json (the first run's, with
an `averaged_from` list), so `python -m qr_train.ship --skip-train --run OUT_RUN` ships it.
Runs fine-tuned from one checkpoint stay in one basin, where the mean is usually at least as good
as either; runs trained from different random starts do not, so only average the former.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
COPIED = ("config.json", "generation_config.json", "tokenizer.json")


def average(runs: list[Path], out: Path) -> Path:
    if len(runs) < 2:
        raise SystemExit("give at least two runs to average")
    states = [load_file(run / "checkpoint" / WEIGHTS) for run in runs]
    first = states[0]
    for run, state in zip(runs[1:], states[1:]):
        if state.keys() != first.keys() or any(state[k].shape != first[k].shape for k in first):
            raise SystemExit(f"{run}: its tensors differ in names or shapes from {runs[0]}; only runs of one model average")
    ckpt = out / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    mean = {k: (sum(s[k].double() for s in states) / len(states)).to(first[k].dtype).contiguous() for k in first}
    save_file(mean, ckpt / WEIGHTS)
    for name in COPIED:
        if (runs[0] / "checkpoint" / name).exists():
            shutil.copy(runs[0] / "checkpoint" / name, ckpt / name)
    curve = json.loads((runs[0] / "curve.json").read_text())
    curve["averaged_from"] = [str(r) for r in runs]
    (out / "curve.json").write_text(json.dumps(curve, indent=2))
    return ckpt


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("runs", type=Path, nargs="+")
    args = p.parse_args(argv)
    print(average(args.runs, args.out))


if __name__ == "__main__":
    main()
