"""A T5-style tokenizer trained on the corpus: Unigram with byte fallback.

Ids: <pad>=0, </s>=1, <unk>=2, then the 256 byte pieces <0x00>..<0xFF>, then learned pieces.
Byte fallback means no input is ever <unk>: an unseen character becomes its UTF-8 bytes, and a
small vocabulary splits unseen words into known pieces the model can copy. Saved as
tokenizer.json, which the Rust `tokenizers` crate loads as well.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram
from tokenizers.trainers import UnigramTrainer

SPECIALS = ["<pad>", "</s>", "<unk>"]
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
BYTE_PIECES = [f"<0x{i:02X}>" for i in range(256)]


def _pipeline(tok: Tokenizer) -> Tokenizer:
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS_ID)]
    )
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = _pipeline(Tokenizer(Unigram()))
    trainer = UnigramTrainer(
        vocab_size=vocab_size - len(BYTE_PIECES),
        special_tokens=SPECIALS,
        unk_token="<unk>",
        max_piece_length=12,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Rebuild the model with the byte pieces right after the specials and byte fallback on.
    learned = json.loads(tok.to_str())["model"]["vocab"]
    floor = min(score for _, score in learned) - 1.0
    vocab = [(p, 0.0) for p in SPECIALS]
    vocab += [(p, floor) for p in BYTE_PIECES]
    # The trainer orders pieces of equal score arbitrarily (17 of 2048 moved between two runs on
    # the corpus), which would change their ids; score, then the piece itself, fixes the order.
    learned = sorted(learned, key=lambda ps: (-round(ps[1], 9), ps[0]))
    vocab += [(p, s) for p, s in learned if p not in SPECIALS]
    tok = _pipeline(Tokenizer(Unigram(vocab, unk_id=UNK_ID, byte_fallback=True)))
    tok.add_special_tokens(SPECIALS)
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    tok.save(str(path))
    return path
