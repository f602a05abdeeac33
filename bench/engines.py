"""The in-process peer engines of the benchmark, one class each, behind one interface.

Every engine takes the query text, tokenizes it with the model's own tokenizer.json (the
`tokenizers` library, as the server does), generates greedily on the harness's thread count (one by default), and decodes the
answer back to text; the timed span is that whole text-in, text-out call.

    engine.run(queries) -> [(latency_ms, generated_tokens), ...]

`generated_tokens` counts the new tokens, end-of-sequence excluded. With `fixed=True` every
engine is made to generate exactly `max_new_tokens` tokens (EOS ignored or suppressed), and
`run` raises if one does not.
"""
from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "train") not in sys.path:
    sys.path.insert(0, str(REPO / "train"))

from tokenizers import Tokenizer  # noqa: E402

EOS_ID = 1
START_ID = 0


class EngineError(RuntimeError):
    pass


class Engine:
    """A peer engine measured in this Python process."""

    name = "engine"
    #: What the reader needs to know to reproduce it (one line for the report).
    detail = ""

    def __init__(self, tokenizer_path: Path, max_new_tokens: int, fixed: bool):
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.max_new_tokens = max_new_tokens
        self.fixed = fixed

    def generate_ids(self, input_ids: list[int]) -> list[int]:
        raise NotImplementedError

    def answer(self, query: str) -> tuple[str, int]:
        ids = self.tokenizer.encode(query).ids
        out = self.generate_ids(ids)
        return self.tokenizer.decode(out, skip_special_tokens=True), len(out)

    def run(self, queries: list[str]) -> list[tuple[float, int]]:
        samples = []
        for query in queries:
            start = time.perf_counter()
            _, tokens = self.answer(query)
            samples.append(((time.perf_counter() - start) * 1000.0, tokens))
            if self.fixed and tokens != self.max_new_tokens:
                raise EngineError(
                    f"{self.name} generated {tokens} tokens instead of the forced {self.max_new_tokens} "
                    f"for {query!r}")
        return samples

    def close(self) -> None:
        gc.collect()

    # Shared by the Hugging Face style engines.
    def _trim(self, new_ids: list[int]) -> list[int]:
        if self.fixed:
            return new_ids
        if EOS_ID in new_ids:
            new_ids = new_ids[: new_ids.index(EOS_ID)]
        return new_ids


def _generation_config(model_dir: Path, max_new_tokens: int, fixed: bool):
    from transformers import GenerationConfig

    config = dict(
        decoder_start_token_id=START_ID, eos_token_id=EOS_ID, pad_token_id=0,
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
    )
    if fixed:
        config["min_new_tokens"] = max_new_tokens
    return GenerationConfig(**config)


class _GenerateEngine(Engine):
    """Engines driven by Hugging Face `generate` (PyTorch and Optimum): set torch, model, config."""

    def generate_ids(self, input_ids):
        torch = self.torch
        ids = torch.tensor([input_ids], dtype=torch.long)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      generation_config=self.config)
        return self._trim(out[0, 1:].tolist())

    def close(self):
        del self.model
        super().close()


class PyTorchEngine(_GenerateEngine):
    name = "PyTorch generate (fp32)"

    def __init__(self, checkpoint: Path, max_new_tokens: int, fixed: bool, threads: int = 1):
        super().__init__(checkpoint / "tokenizer.json", max_new_tokens, fixed)
        import torch
        from transformers import T5ForConditionalGeneration

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = T5ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
        self.config = _generation_config(checkpoint, max_new_tokens, fixed)
        self.detail = (f"transformers `generate`, torch {torch.__version__}, fp32 weights, "
                       f"torch.set_num_threads({threads}), greedy, KV cache")


class OptimumEngine(_GenerateEngine):
    def __init__(self, onnx_dir: Path, label: str, max_new_tokens: int, fixed: bool, threads: int = 1):
        super().__init__(onnx_dir / "tokenizer.json", max_new_tokens, fixed)
        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTModelForSeq2SeqLM

        torch.set_num_threads(threads)
        self.torch = torch
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if threads > 1:  # as qserver does: three sessions must not busy-wait against each other
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.model = ORTModelForSeq2SeqLM.from_pretrained(
            onnx_dir, use_cache=True, use_merged=False, session_options=options,
            provider="CPUExecutionProvider",
        )
        self.config = _generation_config(onnx_dir, max_new_tokens, fixed)
        self.name = f"Optimum ORT ({label})"
        self.detail = (f"`ORTModelForSeq2SeqLM.generate` on `{_rel(onnx_dir)}`, onnxruntime {ort.__version__}, "
                       f"use_cache=True, split decoders (no merged), intra_op_num_threads={threads}"
                       + (", allow_spinning=0" if threads > 1 else ""))



class CTranslate2Engine(Engine):
    name = "CTranslate2 (int8_float32)"

    def __init__(self, ct2_dir: Path, tokenizer_path: Path, max_new_tokens: int, fixed: bool, threads: int = 1):
        super().__init__(tokenizer_path, max_new_tokens, fixed)
        import ctranslate2

        self.translator = ctranslate2.Translator(
            str(ct2_dir), device="cpu", compute_type="int8_float32", intra_threads=threads, inter_threads=1)
        self.options = dict(beam_size=1, max_decoding_length=max_new_tokens)
        if fixed:
            self.options["min_decoding_length"] = max_new_tokens
        self.detail = (f"ctranslate2 {ctranslate2.__version__} `Translator.translate_batch` (batch of 1) on "
                       f"`{_rel(ct2_dir)}` (TransformersConverter, fp32 load, int8_float32), compute_type "
                       f"int8_float32, intra_threads={threads}, beam_size=1, tokens from tokenizer.json; "
                       f"GEMM backend: {_ct2_backend()}")

    def generate_ids(self, input_ids):
        source = [self.tokenizer.id_to_token(i) for i in input_ids]
        result = self.translator.translate_batch([source], **self.options)
        tokens = result[0].hypotheses[0]  # end token excluded
        ids = [self.tokenizer.token_to_id(t) for t in tokens]
        # Ids past our tokenizer (a flan-t5-sized embedding padded with <extra_id_*>) decode to nothing.
        return [i if i is not None else 2 for i in ids]

    def close(self):
        del self.translator
        super().close()


def ctranslate2_batched(ct2_dir: Path, tokenizer_path: Path, queries: list[str], requests: int, max_new_tokens: int,
                        batch: int = 8, inter_threads: int = 2) -> dict:
    """CTranslate2's own batching as the load table's peer: `requests` queries (cycling through `queries`) in one
    `translate_batch` call, `max_batch_size` batch, `inter_threads` batches at once on 1 thread each. Throughput only:
    one call has no per-request latency."""
    import ctranslate2

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    sources = [[tokenizer.id_to_token(i) for i in tokenizer.encode(q).ids] for q in queries]
    sources = [sources[i % len(sources)] for i in range(requests)]
    translator = ctranslate2.Translator(str(ct2_dir), device="cpu", compute_type="int8_float32",
                                        intra_threads=1, inter_threads=inter_threads)
    options = dict(beam_size=1, max_decoding_length=max_new_tokens, max_batch_size=batch)
    try:
        translator.translate_batch(sources[: 2 * batch], **options)  # warm-up
        started = time.perf_counter()
        results = translator.translate_batch(sources, **options)
        seconds = time.perf_counter() - started
    finally:
        del translator
    tokens = sum(len(r.hypotheses[0]) for r in results) / len(results)
    return dict(engine=f"CTranslate2 {ctranslate2.__version__} translate_batch, max_batch_size {batch}, "
                       f"{inter_threads} x 1 threads (in-process, plain greedy)",
                concurrency=None, requests=requests, errors=0, throughput_rps=requests / seconds,
                p50_ms=None, p99_ms=None, mean_ms=None, mean_tokens=tokens)


class OnnxLoopEngine(Engine):
    name = "Python ORT loop (int8)"

    def __init__(self, onnx_dir: Path, max_new_tokens: int, fixed: bool, threads: int = 1):
        super().__init__(onnx_dir / "tokenizer.json", max_new_tokens, fixed)
        import onnxruntime as ort
        from qr_train.onnx_loop import OnnxT5

        self.model = OnnxT5(onnx_dir, threads=threads)
        self.detail = (f"`qr_train.onnx_loop.OnnxT5` (hand-written greedy loop, numpy) on `{_rel(onnx_dir)}`, "
                       f"onnxruntime {ort.__version__}, {threads} intra-op thread(s)")

    def generate_ids(self, input_ids):
        return self.model.generate_ids(input_ids, self.max_new_tokens, ignore_eos=self.fixed)

    def close(self):
        del self.model
        super().close()


class LlamaCppEngine(Engine):
    """llama.cpp on a GGUF file made by `qr_train.gguf`, through llama-cpp-python's low-level API."""

    def __init__(self, gguf_file: Path, label: str, max_new_tokens: int, fixed: bool, threads: int = 1):
        super().__init__(gguf_file.parent / "tokenizer.json", max_new_tokens, fixed)
        self.name = f"llama.cpp ({label})"
        try:
            import llama_cpp  # noqa: F401
        except ImportError as e:
            raise EngineError(f"llama-cpp-python is not installed ({e}): `make bench-deps` builds it "
                              "(bench/requirements.txt)") from e
        from qr_train.gguf_loop import GgufT5, llama_cpp_version, system_info

        self.model = GgufT5(gguf_file, threads=threads)
        self.detail = (f"`qr_train.gguf_loop.GgufT5` on `{_rel(gguf_file)}` (`qr_train.gguf`: {GGUF_LAYOUT[label]}): "
                       f"llama-cpp-python {llama_cpp_version()} (llama.cpp built from its sdist by pip, "
                       f"`{system_info()}`), `llama_encode` then one `llama_decode` per token, greedy in Python, "
                       f"n_threads = n_threads_batch = {threads}, tokens from tokenizer.json")

    def generate_ids(self, input_ids):
        return self.model.generate_ids(input_ids, self.max_new_tokens, ignore_eos=self.fixed)

    def close(self):
        self.model.close()
        del self.model
        super().close()


GGUF_LAYOUT = {
    "Q8_0": "every matrix Q8_0, norms and relative-attention biases F32",
    "Q4_0": "block matrices Q4_0, token embedding and lm_head Q8_0, norms and relative-attention biases F32",
}


def convert_gguf(checkpoint: Path, out_dir: Path) -> Path:
    """`qr_train.gguf` on the PyTorch checkpoint: out_dir/model-q8_0.gguf and model-q4_0.gguf."""
    from qr_train.gguf import convert

    convert(checkpoint, out_dir)
    return out_dir


def convert_ctranslate2(checkpoint: Path, out_dir: Path) -> Path:
    """CTranslate2's TransformersConverter on the PyTorch checkpoint, loaded as fp32, quantized int8_float32.

    The vocabulary comes from the checkpoint's tokenizer.json (ids unchanged), padded with
    <extra_id_*> up to the model's vocab size, as the converter does for T5.
    """
    import torch
    from ctranslate2.converters import TransformersConverter
    from transformers import PreTrainedTokenizerFast

    class Converter(TransformersConverter):
        def load_model(self, model_class, model_name_or_path, **kwargs):
            kwargs["dtype"] = torch.float32  # the converter would keep the checkpoint's fp16
            return model_class.from_pretrained(model_name_or_path, **kwargs)

        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return PreTrainedTokenizerFast(
                tokenizer_file=str(Path(model_name_or_path) / "tokenizer.json"),
                pad_token="<pad>", eos_token="</s>", unk_token="<unk>")

    Converter(str(checkpoint)).convert(str(out_dir), quantization="int8_float32", force=True)
    return out_dir


def _ct2_backend() -> str:
    """CTranslate2 uses Intel MKL on Intel CPUs only and oneDNN elsewhere (its CT2_VERBOSE log says which)."""
    try:
        with open("/proc/cpuinfo") as f:
            intel = "GenuineIntel" in f.read(4096)
    except OSError:
        return "unknown"
    return "Intel MKL" if intel else "oneDNN (MKL is not used on non-Intel CPUs)"


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)
