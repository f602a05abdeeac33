"""Greedy decoding of a T5 GGUF file (qr_train.gguf) with llama.cpp, through llama-cpp-python.

    from qr_train.gguf_loop import GgufT5
    GgufT5("out/model-q8_0.gguf").generate("Who was born first, X or Y?")

The interface is the ONNX loop's (greedy.py): `generate_ids`, `generate`, `answer`, grounded
decoding and the guards when the file's directory has grounding.json. llama-cpp-python's
high-level `Llama` class drives decoder-only models, so this uses its low-level binding of
llama.h: `llama_encode` runs the encoder over the query, then `llama_decode` runs one decoder
step per token on llama.cpp's KV cache, starting from `llama_model_decoder_start_token`.

The query is tokenized with the directory's tokenizer.json (the `tokenizers` library, as the
server and the ONNX loop do) and the ids are fed to llama.cpp: the GGUF carries the same pieces
and scores, but llama.cpp's Unigram tokenizer cannot apply our NFKC normalizer, so its own
tokenization could differ on some inputs.

llama-cpp-python is not part of the `make test` environment: it is installed by
`make bench-deps` (bench/requirements.txt), which compiles llama.cpp.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from .greedy import GreedyT5

_BACKEND_READY = False
_QUIET_LOG = None  # the ctypes callback must outlive every call into llama.cpp


def _init_backend(verbose: bool) -> None:
    global _BACKEND_READY, _QUIET_LOG
    import llama_cpp

    if _BACKEND_READY:
        return
    if not verbose:
        @llama_cpp.llama_log_callback
        def quiet(level, text, user_data):  # noqa: ARG001
            pass

        _QUIET_LOG = quiet
        llama_cpp.llama_log_set(_QUIET_LOG, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    _BACKEND_READY = True


class LlamaCppError(RuntimeError):
    pass


class GgufT5(GreedyT5):
    """A GGUF file of qr_train.gguf, with tokenizer.json (and grounding.json, when any) beside it.

    n_ctx bounds the query's tokens and the generated ones alike; verbose shows llama.cpp's log
    (decided by the first GgufT5 of the process).
    """

    def __init__(self, gguf_path: Path | str, threads: int = 1, n_ctx: int = 512, verbose: bool = False):
        import llama_cpp

        self.path = Path(gguf_path)
        if not self.path.is_file():
            raise FileNotFoundError(self.path)
        _init_backend(verbose)
        self._lib = llama_cpp
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self.model:
            raise LlamaCppError(f"llama.cpp could not load {self.path}")
        if not (llama_cpp.llama_model_has_encoder(self.model) and llama_cpp.llama_model_has_decoder(self.model)):
            raise LlamaCppError(f"{self.path} is not an encoder-decoder model")
        cparams = llama_cpp.llama_context_default_params()
        # The whole query goes through the encoder in one batch (llama.cpp cannot split it), and
        # the decoder's cache holds the start token and every generated token.
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        # Flash attention off. llama.cpp's default (auto) turns it on, which only the cross-attention
        # can use (T5's relative position bias is a KQ bias, which the kernel lacks), and that measured
        # slower at one thread on every T5 shape we run (16 tokens, on the 2-core Xeon of
        # docs/benchmarks.md: shipped 26.6 -> 20.1 ms, flan-t5-small Q8_0 176 -> 145 ms,
        # flan-t5-base Q8_0 653 -> 581 ms).
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise LlamaCppError(f"llama.cpp could not make a context for {self.path}")
        self.n_ctx = n_ctx
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        start = llama_cpp.llama_model_decoder_start_token(self.model)
        self._load_text_side(self.path.parent, start if start >= 0 else 0, llama_cpp.llama_vocab_eos(vocab))
        self._token = (llama_cpp.llama_token * 1)()

    def _logits(self) -> np.ndarray:
        ptr = self._lib.llama_get_logits_ith(self.ctx, -1)
        # A view of llama.cpp's buffer: used before the next llama_decode overwrites it.
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _decode(self, token: int) -> np.ndarray:
        self._token[0] = token
        rc = self._lib.llama_decode(self.ctx, self._lib.llama_batch_get_one(self._token, 1))
        if rc != 0:
            # 1: no room left in the decoder's cache (n_ctx tokens).
            raise LlamaCppError(f"llama_decode returned {rc}")
        return self._logits()

    def _start(self, input_ids: list[int]) -> np.ndarray:
        if not input_ids or len(input_ids) > self.n_ctx:
            raise LlamaCppError(f"{len(input_ids)} input tokens: llama.cpp's encoder takes 1 to {self.n_ctx} here")
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self.ctx), True)
        ids = (self._lib.llama_token * len(input_ids))(*input_ids)
        rc = self._lib.llama_encode(self.ctx, self._lib.llama_batch_get_one(ids, len(input_ids)))
        if rc != 0:
            raise LlamaCppError(f"llama_encode returned {rc}")
        return self._decode(self.start_id)

    def _step(self, token: int) -> np.ndarray:
        return self._decode(token)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self._lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self._lib.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- interpreter shutdown
            pass


def system_info() -> str:
    """The CPU features llama.cpp was compiled with and uses (those reported as 1), e.g. 'AVX512 VNNI ...'."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    on = [part.split("=")[0].strip() for part in info.removeprefix("CPU :").split("|") if part.strip().endswith("= 1")]
    return "CPU: " + " ".join(on) if on else info


def llama_cpp_version() -> str:
    """llama-cpp-python's version, or 'not installed'."""
    from importlib import metadata

    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return "not installed"
