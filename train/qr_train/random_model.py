"""Randomly initialised T5 checkpoints for tests and latency work on real architectures.

    python -m qr_train.random_model tiny OUT_CKPT          # a few hundred K parameters, corpus tokenizer
    python -m qr_train.random_model flan-t5-small OUT_CKPT # exact flan-t5-small shape, vocab 32128
    python -m qr_train.random_model flan-t5-base OUT_CKPT

Then `python -m qr_train.export OUT_CKPT OUT_ONNX` runs the same exporter and quantizer as the
shipped model. Outputs are nonsense (random weights); only the shapes and the work are real.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import T5Config, T5ForConditionalGeneration

from .corpus import DEFAULT_CORPUS, load_splits
from .tokenizer import EOS_ID, PAD_ID, save_tokenizer, train_tokenizer

# The published configurations of google/flan-t5-small and google/flan-t5-base.
SHAPES = {
    "tiny": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4),
    "flan-t5-small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6, vocab_size=32128),
    "flan-t5-base": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12, vocab_size=32128),
}


def write_random_checkpoint(shape: str, out: Path, corpus: Path = DEFAULT_CORPUS, vocab_size: int = 2048,
                            seed: int = 0, texts: list[str] | None = None, model_vocab_size: int | None = None,
                            **config) -> Path:
    """A random checkpoint of the given shape; the tokenizer (vocab_size pieces) is trained on `texts`
    (default: corpus queries).

    model_vocab_size: a larger embedding than the tokenizer, as the flan-t5 shapes have. `config`
    overrides T5Config fields of the shape (e.g. num_decoder_layers, feed_forward_proj="relu",
    tie_word_embeddings=True for a T5 v1.0 layout)."""
    torch.manual_seed(seed)
    if texts is None:
        texts = [ex.query for ex in load_splits(corpus)["train"][:4000]]
    tok = train_tokenizer(texts, vocab_size)
    params = dict(SHAPES[shape])
    # flan-t5's vocab (32128) is larger than our tokenizer's: the ids our tokenizer produces
    # are all valid rows of the bigger embedding, and the work per token is the real one.
    params.setdefault("vocab_size", model_vocab_size or tok.get_vocab_size())
    settings = dict(
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID,
    )
    model = T5ForConditionalGeneration(T5Config(**{**params, **settings, **config})).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_tokenizer(tok, out)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out", type=Path)
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    write_random_checkpoint(args.shape, args.out, args.corpus, seed=args.seed)
    print(f"random {args.shape} checkpoint -> {args.out}")


if __name__ == "__main__":
    main()
