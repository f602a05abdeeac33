"""Greedy decoding shared by the T5 runners (ONNX Runtime in onnx_loop.py, llama.cpp in gguf_loop.py).

A runner implements two steps, `_start(input_ids)` (encoder and the first decoder step) and
`_step(token)` (one more decoder step on its cache), each returning the logits row of the next
token; this class owns the rest: the tokenizer, grounded decoding when the model directory
ships grounding.json (docs/grounding.md), end of sequence, log-probs and the server's guards.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from . import grounding
from .grounding import GroundingState, Rules, TokenGrounding

# The server's default budget (`--default-max-new-tokens`). Training targets are clipped at 96
# tokens (epochs.py); at 64, answers naming three long or accented names were cut in the third
# subquery, whose partial part the guards then dropped.
DEFAULT_MAX_NEW_TOKENS = 96


class GreedyT5:
    tokenizer: Tokenizer
    start_id: int
    eos_id: int
    rules: Rules | None
    grounding: TokenGrounding | None

    def _load_text_side(self, model_dir: Path, start_id: int, eos_id: int) -> None:
        """tokenizer.json and grounding.json of `model_dir`; the decoder's start and end ids."""
        self.tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        self.start_id, self.eos_id = start_id, eos_id
        # grounding.json: grounded decoding and the guards (docs/grounding.md); None decodes unconstrained.
        self.rules = Rules.load(model_dir)
        self.grounding = None
        if self.rules is not None:
            vocab = self.tokenizer.get_vocab_size()
            pieces = [self.tokenizer.id_to_token(i) or "" for i in range(vocab)]
            special = [i for i, p in enumerate(pieces) if p in ("<pad>", "</s>", "<unk>")]
            self.grounding = TokenGrounding(pieces, self.rules, self.eos_id, special)

    def _start(self, input_ids: list[int]) -> np.ndarray:
        """Encode the input, run the decoder on the start token: the first logits row."""
        raise NotImplementedError

    def _step(self, token: int) -> np.ndarray:
        """Feed the chosen token to the decoder: the next logits row."""
        raise NotImplementedError

    def generate_ids(self, input_ids: list[int], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, ignore_eos: bool = False,
                     constraint: GroundingState | None = None, scores: bool = False) -> list[int]:
        """Greedy ids; with `scores`, each chosen token's log-prob lands in `self.last_logprobs`."""
        row = self._start(input_ids)
        generated: list[int] = []
        self.last_logprobs: list[float] = []
        for _ in range(max_new_tokens):
            token = constraint.choose(row) if constraint else int(row.argmax())
            if constraint:
                constraint.commit(token)
            if scores:
                top = float(row.max())
                self.last_logprobs.append(float(row[token]) - top - float(np.log(np.exp(row - top).sum())))
            if token == self.eos_id and not ignore_eos:
                break
            generated.append(token)
            if len(generated) == max_new_tokens:
                break
            row = self._step(token)
        return generated

    def generate(self, query: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, grounded: bool = True) -> str:
        """The model's text; grounded decoding when the model ships grounding.json and `grounded`."""
        ids = self.tokenizer.encode(query).ids
        state = self.grounding.for_query(query) if grounded and self.grounding else None
        out = self.generate_ids(ids, max_new_tokens, constraint=state, scores=True)
        return self.tokenizer.decode(out, skip_special_tokens=True)

    def answer(self, query: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> tuple[list[str], str, float]:
        """What the server answers: (subqueries, fallback reason, mean token log-prob)."""
        text = self.generate(query, max_new_tokens)
        mean_logprob = float(np.mean(self.last_logprobs)) if self.last_logprobs else 0.0
        subs, reason = grounding.sanitize(text, query, self.rules, mean_logprob)
        return subs, reason, mean_logprob
