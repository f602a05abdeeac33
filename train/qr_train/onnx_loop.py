"""A minimal greedy decoder over Optimum-layout T5 ONNX files, with Python ONNX Runtime.

Used to evaluate exported models (fp32 and int8) exactly as they ship, and as the
"hand-written Python loop" peer in the benchmark harness. The decoding loop, grounding and
guards are greedy.py's, shared with the llama.cpp runner (gguf_loop.py).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .greedy import DEFAULT_MAX_NEW_TOKENS, GreedyT5

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "EXACT_INT8_PRODUCTS", "OnnxT5", "open_session"]

# ONNX Runtime's switch for exact int8 products on x86 CPUs without VNNI, where its uint8 x int8
# kernels saturate pairs of products into 16 bits: the server sets it too
# (server/src/engine/onnx_session.rs), so both give the same answers on every CPU.
EXACT_INT8_PRODUCTS = ("session.x64quantprecision", "1")


def open_session(path: Path | str, threads: int = 1) -> ort.InferenceSession:
    """One ONNX Runtime session with exact int8 products, or, with a warning, without them for
    a file ONNX Runtime 1.31 cannot convert (an int8 weight read by two products)."""
    def options(exact: bool) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if exact:
            opts.add_session_config_entry(*EXACT_INT8_PRODUCTS)
        if threads > 1:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return opts

    try:
        return ort.InferenceSession(str(path), options(True), providers=["CPUExecutionProvider"])
    except Exception as exact_error:  # noqa: BLE001 (ONNX Runtime raises its own exception types)
        session = ort.InferenceSession(str(path), options(False), providers=["CPUExecutionProvider"])
        warnings.warn(f"{path}: ONNX Runtime cannot give this file exact int8 products ({exact_error}); "
                      "on CPUs without VNNI its answers may differ from other CPUs'", stacklevel=2)
        return session


class OnnxT5(GreedyT5):
    def __init__(self, model_dir: Path | str, threads: int = 1):
        model_dir = Path(model_dir)
        self.encoder = open_session(model_dir / "encoder_model.onnx", threads)
        self.decoder = open_session(model_dir / "decoder_model.onnx", threads)
        self.decoder_past = open_session(model_dir / "decoder_with_past_model.onnx", threads)
        config = json.loads((model_dir / "config.json").read_text())
        self._load_text_side(model_dir, config.get("decoder_start_token_id", 0), config.get("eos_token_id", 1))
        self.first_outputs = [o.name for o in self.decoder.get_outputs()]
        self.past_outputs = [o.name for o in self.decoder_past.get_outputs()]

    def _start(self, input_ids: list[int]) -> np.ndarray:
        ids = np.asarray([input_ids], dtype=np.int64)
        self._mask = np.ones_like(ids)
        hidden = self.encoder.run(None, {"input_ids": ids, "attention_mask": self._mask})[0]
        outputs = self.decoder.run(None, {
            "input_ids": np.asarray([[self.start_id]], dtype=np.int64),
            "encoder_attention_mask": self._mask,
            "encoder_hidden_states": hidden,
        })
        named = dict(zip(self.first_outputs, outputs))
        # The encoder key/values come from the first step only and are reused by every later one.
        self._cache = {k.replace("present.", "past_key_values."): v for k, v in named.items() if k != "logits"}
        return named["logits"][0, -1]

    def _step(self, token: int) -> np.ndarray:
        feeds = {"input_ids": np.asarray([[token]], dtype=np.int64), "encoder_attention_mask": self._mask,
                 **self._cache}
        logits = None
        for name, value in zip(self.past_outputs, self.decoder_past.run(None, feeds)):
            if name == "logits":
                logits = value
            else:
                self._cache[name.replace("present.", "past_key_values.")] = value
        return logits[0, -1]
