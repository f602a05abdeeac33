"""A minimal greedy decoder over Optimum-layout T5 ONNX files, with Python ONNX Runtime.

Used to evaluate exported models (fp32 and int8) exactly as they ship, and as the
"hand-written Python loop" peer in the benchmark harness.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from . import grounding
from .grounding import GroundingState, Rules, TokenGrounding

# The server's default budget (`--default-max-new-tokens`). Training targets are clipped at 96
# tokens (epochs.py); at 64, answers naming three long or accented names were cut in the third
# subquery, whose partial part the guards then dropped.
DEFAULT_MAX_NEW_TOKENS = 96


class OnnxT5:
    def __init__(self, model_dir: Path | str, threads: int = 1):
        model_dir = Path(model_dir)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 1:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")

        def session(name: str) -> ort.InferenceSession:
            return ort.InferenceSession(str(model_dir / name), opts, providers=["CPUExecutionProvider"])

        self.encoder = session("encoder_model.onnx")
        self.decoder = session("decoder_model.onnx")
        self.decoder_past = session("decoder_with_past_model.onnx")
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config = json.loads((model_dir / "config.json").read_text())
        self.start_id = config.get("decoder_start_token_id", 0)
        self.eos_id = config.get("eos_token_id", 1)
        self.first_outputs = [o.name for o in self.decoder.get_outputs()]
        self.past_outputs = [o.name for o in self.decoder_past.get_outputs()]
        # grounding.json: grounded decoding and the guards (docs/grounding.md); None decodes unconstrained.
        self.rules: Rules | None = Rules.load(model_dir)
        self.grounding: TokenGrounding | None = None
        if self.rules is not None:
            vocab = self.tokenizer.get_vocab_size()
            pieces = [self.tokenizer.id_to_token(i) or "" for i in range(vocab)]
            special = [i for i, p in enumerate(pieces) if p in ("<pad>", "</s>", "<unk>")]
            self.grounding = TokenGrounding(pieces, self.rules, self.eos_id, special)

    def generate_ids(self, input_ids: list[int], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, ignore_eos: bool = False,
                     constraint: GroundingState | None = None, scores: bool = False) -> list[int]:
        """Greedy ids; with `scores`, each chosen token's log-prob lands in `self.last_logprobs`."""
        ids = np.asarray([input_ids], dtype=np.int64)
        mask = np.ones_like(ids)
        hidden = self.encoder.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        outputs = self.decoder.run(None, {
            "input_ids": np.asarray([[self.start_id]], dtype=np.int64),
            "encoder_attention_mask": mask,
            "encoder_hidden_states": hidden,
        })
        named = dict(zip(self.first_outputs, outputs))
        # The encoder key/values come from the first step only and are reused by every later one.
        cache = {k.replace("present.", "past_key_values."): v for k, v in named.items() if k != "logits"}
        logits = named["logits"]
        generated: list[int] = []
        self.last_logprobs: list[float] = []
        for _ in range(max_new_tokens):
            row = logits[0, -1]
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
            feeds = {"input_ids": np.asarray([[token]], dtype=np.int64), "encoder_attention_mask": mask, **cache}
            outputs = self.decoder_past.run(None, feeds)
            for name, value in zip(self.past_outputs, outputs):
                if name == "logits":
                    logits = value
                else:
                    cache[name.replace("present.", "past_key_values.")] = value
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
