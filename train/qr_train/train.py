"""Train a T5 reformulator: from scratch (default) or fine-tuning a local checkpoint (--init).

    python -m qr_train.train --out train/runs/qr-t5 [--init path/to/flan-t5-small]

Writes OUT/checkpoint/ (Hugging Face format + tokenizer.json, the best epoch by validation
ROUGE-L) and OUT/curve.json (per-epoch train/validation loss, validation ROUGE-L, and the
unseen-entity copy rate). Runs on CPU; uses a GPU when torch sees one.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import T5Config, T5ForConditionalGeneration

from . import subqueries as sq
from .corpus import DEFAULT_CORPUS, Example, load_splits
from .entities import collect_names
from .epochs import EpochSource, encode
from .metrics import MetricTable
from .tokenizer import EOS_ID, PAD_ID, save_tokenizer, train_tokenizer
from .unseen import unseen_entity_set, copy_rate


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="corpus.jsonl of the shared corpus")
    p.add_argument("--out", required=True, help="run directory (checkpoint/, curve.json)")
    p.add_argument("--init", help="local Hugging Face T5 checkpoint to fine-tune instead of training from scratch")
    p.add_argument("--tokenizer", help="tokenizer.json to use instead of training one on the training split")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-kv", type=int, default=32)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--d-ff", type=int, default=768)
    p.add_argument("--encoder-layers", type=int, default=4)
    p.add_argument("--decoder-layers", type=int, default=3)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=12, help="passes over the training rows (ignored with --steps or --minutes)")
    p.add_argument("--steps", type=int, default=0,
                   help="train for exactly N optimizer steps (the schedule follows steps; the same on any hardware)")
    p.add_argument("--minutes", type=float, default=0,
                   help="train for this much wall time instead of --epochs; the learning-rate schedule "
                        "follows elapsed time, so the model is annealed when the budget ends")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: once per epoch)")
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--aug-rate", type=float, default=0.6, help="share of training rows whose entities get swapped each epoch")
    p.add_argument("--traffic-rate", type=float, default=0.4,
                   help="traffic-shaped rows (traffic.py) added each epoch, as a share of the training rows")
    p.add_argument("--val-sample", type=int, default=300, help="validation rows generated each evaluation for ROUGE-L")
    p.add_argument("--val-loss-rows", type=int, default=500, help="validation rows for the validation loss")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--data-workers", type=int, default=0,
                   help="processes preparing augmented epochs ahead of the training loop (0: inline; use "
                        "several on a GPU, where preparing an epoch takes longer than training on it)")
    p.add_argument("--gen-batch-size", type=int, default=64, help="rows per generate() call in validation")
    p.add_argument("--limit-train", type=int, default=0, help="use only N training rows (tests)")
    p.add_argument("--limit-val", type=int, default=0, help="use only N validation rows (tests)")
    return p.parse_args(argv)


def build_model(args, tok: Tokenizer) -> T5ForConditionalGeneration:
    if args.init:
        return T5ForConditionalGeneration.from_pretrained(args.init)
    config = T5Config(
        vocab_size=tok.get_vocab_size(),
        d_model=args.d_model,
        d_kv=args.d_kv,
        d_ff=args.d_ff,
        num_layers=args.encoder_layers,
        num_decoder_layers=args.decoder_layers,
        num_heads=args.num_heads,
        dropout_rate=args.dropout,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
    )
    model = T5ForConditionalGeneration(config)
    # Transformers initialises an untied lm_head with std 1.0 (the mesh-tf convention, paired
    # with Adafactor); with AdamW from scratch that starts the loss near 50. Scale it like the
    # tied case does (d_model ** -0.5).
    with torch.no_grad():
        model.lm_head.weight.mul_(config.d_model ** -0.5)
    return model


def load_or_train_tokenizer(args, train: list[Example]) -> Tokenizer:
    if args.tokenizer:
        return Tokenizer.from_file(args.tokenizer)
    if args.init:
        path = Path(args.init) / "tokenizer.json"
        if not path.exists():
            raise SystemExit(f"--init {args.init}: no tokenizer.json there (save the tokenizer with the checkpoint)")
        return Tokenizer.from_file(str(path))
    texts = [ex.query for ex in train] + [ex.target for ex in train]
    return train_tokenizer(texts, args.vocab_size)


def batches(pairs, batch_size: int, rng: random.Random, shuffle: bool):
    """Length-bucketed batches: sort within chunks of 50 batches, so padding stays small."""
    order = list(range(len(pairs)))
    if shuffle:
        rng.shuffle(order)
    chunk = batch_size * 50
    groups = []
    for i in range(0, len(order), chunk):
        part = sorted(order[i:i + chunk], key=lambda k: len(pairs[k][0]))
        groups += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    if shuffle:
        rng.shuffle(groups)
    for idx in groups:
        src_len = max(len(pairs[k][0]) for k in idx)
        tgt_len = max(len(pairs[k][1]) for k in idx)
        src = np.full((len(idx), src_len), PAD_ID, dtype=np.int64)
        tgt = np.full((len(idx), tgt_len), -100, dtype=np.int64)
        for row, k in enumerate(idx):
            s, t = pairs[k]
            src[row, :len(s)] = s
            tgt[row, :len(t)] = t
        src_t = torch.from_numpy(src)
        yield src_t, (src_t != PAD_ID).long(), torch.from_numpy(tgt)


@torch.no_grad()
def generate(model, tok: Tokenizer, queries: list[str], device, batch_size: int = 64, max_new_tokens: int = 64) -> list[str]:
    model.eval()
    out: list[str] = []
    for i in range(0, len(queries), batch_size):
        enc = tok.encode_batch(queries[i:i + batch_size])
        length = max(len(e.ids) for e in enc)
        ids = torch.full((len(enc), length), PAD_ID, dtype=torch.long)
        for row, e in enumerate(enc):
            ids[row, :len(e.ids)] = torch.tensor(e.ids)
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=(ids != PAD_ID).long().to(device),
            max_new_tokens=max_new_tokens, num_beams=1, do_sample=False,
        )
        out += tok.decode_batch(gen.cpu().tolist(), skip_special_tokens=True)
    return out


@torch.no_grad()
def validation_loss(model, pairs, batch_size, device) -> float:
    model.eval()
    total, count = 0.0, 0
    for src, mask, tgt in batches(pairs, batch_size, random.Random(0), shuffle=False):
        loss = model(input_ids=src.to(device), attention_mask=mask.to(device), labels=tgt.to(device)).loss
        n = int((tgt != -100).sum())
        total += float(loss) * n
        count += n
    return total / max(count, 1)


def main(argv=None) -> None:
    args = parse_args(argv)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Adam's second-moment estimates of rarely used embedding rows decay into denormal floats,
    # which x86 CPUs handle many times slower than normal ones.
    torch.set_flush_denormal(True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    splits = load_splits(args.corpus)
    train, val = splits["train"], splits["validation"]
    if args.limit_train:
        train = train[: args.limit_train]
    if args.limit_val:
        val = val[: args.limit_val]
    tok = load_or_train_tokenizer(args, train)
    model = build_model(args, tok).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, vocab {tok.get_vocab_size()}, device {device}", flush=True)

    epochs = EpochSource(tok, train, collect_names(train), args.seed, args.aug_rate, args.data_workers,
                         args.traffic_rate)
    val_pairs = encode(tok, val)
    val_rng = random.Random(args.seed + 1)
    val_sample = val_rng.sample(val, min(args.val_sample, len(val)))
    probe = unseen_entity_set(val, train, seed=args.seed + 2, limit=min(args.val_sample, 150))

    on_gpu = device.type == "cuda"
    # fused AdamW is one kernel per step on a GPU; foreach is the fast path on CPU.
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01,
                              **({"fused": True} if on_gpu else {"foreach": True}))
    # bf16 autocast on a GPU (master weights stay fp32); plain fp32 on CPU.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total_steps = args.steps or steps_per_epoch * args.epochs
    budget = 0 if args.steps else args.minutes * 60
    started = time.time()

    def progress(step: int) -> float:
        """Share of training done: by wall time under --minutes, else by steps."""
        if budget:
            return min(1.0, (time.time() - started) / budget)
        return min(1.0, step / max(1, total_steps))

    def lr_factor(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress(step)))

    val_pairs = val_pairs[: args.val_loss_rows]
    rng = random.Random(args.seed)
    curve, best, step, epoch = [], -1.0, 0, 0
    eval_every = args.eval_every or steps_per_epoch
    loss_sum, loss_n, done = 0.0, 0, False
    while not done:
        epoch += 1
        model.train()
        pairs = epochs.next()
        for src, mask, tgt in batches(pairs, args.batch_size, rng, shuffle=True):
            for group in optim.param_groups:
                group["lr"] = args.lr * lr_factor(step)
            with autocast:
                loss = model(input_ids=src.to(device, non_blocking=True), attention_mask=mask.to(device, non_blocking=True),
                             labels=tgt.to(device, non_blocking=True)).loss
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            loss_sum += loss.detach()  # no .item() here: it would wait for the GPU every step
            loss_n += 1
            step += 1
            if step % 25 == 0:
                print(f"step {step} epoch {epoch} loss {float(loss_sum) / loss_n:.4f} lr {optim.param_groups[0]['lr']:.2e} "
                      f"elapsed {time.time() - started:.0f}s", flush=True)
            finished = progress(step) >= 1.0
            if step % eval_every == 0 or finished:
                point = evaluate_point(model, tok, val_pairs, val_sample, probe, args, device)
                point.update(step=step, epoch=round(step / steps_per_epoch, 2), train_loss=float(loss_sum) / max(loss_n, 1),
                             elapsed_seconds=round(time.time() - started, 1))
                loss_sum, loss_n = 0.0, 0
                curve.append(point)
                print(json.dumps(point), flush=True)
                if point["val_rouge_l"] > best:
                    best = point["val_rouge_l"]
                    model.save_pretrained(out / "checkpoint")
                    save_tokenizer(tok, out / "checkpoint")
                (out / "curve.json").write_text(json.dumps({
                    "parameters": n_params, "args": vars(args), "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if on_gpu else "CPU", "epochs": curve,
                }, indent=2))
                model.train()
            if finished:
                done = True
                break
    epochs.close()


def evaluate_point(model, tok, val_pairs, val_sample, probe, args, device) -> dict:
    v_loss = validation_loss(model, val_pairs, args.batch_size * 2, device)
    preds = generate(model, tok, [ex.query for ex in val_sample], device, args.gen_batch_size)
    table = MetricTable()
    for ex, text in zip(val_sample, preds):
        table.add(sq.split(text, ex.query), ex.subqueries, ex.kind)
    overall = table.rows()[0]
    probe_preds = generate(model, tok, [ex.query for ex, _ in probe], device, args.gen_batch_size)
    return {"val_loss": v_loss, "val_rouge_l": overall.rouge_l, "val_exact_match": overall.exact_match,
            "unseen_entity_copy_rate": copy_rate(probe, probe_preds)}


if __name__ == "__main__":
    main()
