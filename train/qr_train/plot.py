"""Draw a training curve (curve.json from qr_train.train) as a PNG.

    python -m qr_train.plot train/runs/qr-t5/curve.json docs/training-curve.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(curve_path: Path, out: Path) -> None:
    data = json.loads(curve_path.read_text())
    epochs = [p["epoch"] for p in data["epochs"]]
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [p["train_loss"] for p in data["epochs"]], marker="o", label="train loss")
    ax_loss.plot(epochs, [p["val_loss"] for p in data["epochs"]], marker="o", label="validation loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy per token")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_score.plot(epochs, [p["val_rouge_l"] for p in data["epochs"]], marker="o", label="validation ROUGE-L")
    ax_score.plot(epochs, [p["val_exact_match"] for p in data["epochs"]], marker="o", label="validation exact match")
    ax_score.plot(epochs, [p["unseen_entity_copy_rate"] for p in data["epochs"]], marker="o",
                  label="unseen names copied exactly")
    ax_score.set_xlabel("epoch")
    ax_score.set_ylim(0, 1)
    ax_score.legend()
    ax_score.grid(alpha=0.3)
    fig.suptitle(f"T5 from scratch, {data['parameters'] / 1e6:.1f}M parameters ({data['device']})")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("curve", type=Path)
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)
    plot(args.curve, args.out)
    print(f"curve -> {args.out}")


if __name__ == "__main__":
    main()
