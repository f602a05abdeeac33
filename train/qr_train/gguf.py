"""Convert a T5 checkpoint to GGUF for llama.cpp's `t5` architecture, in Q8_0 and Q4_0.

    python -m qr_train.gguf MODEL_DIR OUT_DIR [--types q8_0,q4_0]

MODEL_DIR is a model directory with a `pytorch/` checkpoint (ours: models/qreformulate-t5) or a
Hugging Face T5 / Flan-T5 checkpoint itself (config.json, weights, tokenizer.json). OUT_DIR gets
model-q8_0.gguf and model-q4_0.gguf, plus config.json, tokenizer.json and grounding.json (when
MODEL_DIR has one) so that `qr_train.gguf_loop.GgufT5` answers exactly as the ONNX loop does.

What llama.cpp's loader reads (src/models/t5.cpp, src/llama-vocab.cpp; key and tensor names as
the `gguf` package spells them): `t5.block_count` is the encoder depth and
`t5.decoder_block_count` the decoder's, so uneven depths (ours: 4 + 3) load; the relative
attention bias lives in block 0 and is shared by the other blocks; a gated-GELU feed-forward
(Flan-T5, ours) has ffn_gate (wi_0) and ffn_up (wi_1), a ReLU one (T5 v1.0) ffn_up (wi) only.

Weights: every matrix of the blocks is quantized (Q8_0, or Q4_0 with the `gguf` package's
reference quantizer: the package cannot write K-quants); norms and relative attention biases
stay F32; the token embedding and the lm_head are Q8_0 in both files (llama.cpp's own
quantizer also keeps the output matrix above 4 bits). A tied lm_head (T5 v1.0) is written out
as an `output` tensor scaled by d_model**-0.5, as Hugging Face applies it: llama.cpp would
otherwise reuse the embedding unscaled, which keeps the argmax but not the log-probs.

Tokenizer: tokenizer.json's Unigram pieces and scores under `tokenizer.ggml.model = t5` (UGM),
token types (control, unknown, byte), padded with [PAD{i}] pieces up to the model's vocab size
(a Flan-T5-sized embedding is larger than its tokenizer). llama.cpp loads it; our runner still
tokenizes with tokenizer.json (see gguf_loop.py) since its NFKC normalizer has no sentencepiece
charsmap to carry over.
"""
from __future__ import annotations

import argparse
import base64
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

ARCH = "t5"
TYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
FILE_TYPES = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
# The embedding and the lm_head: the widest type the package can write below F16.
EDGE_TYPE = gguf.GGMLQuantizationType.Q8_0
# llama.cpp computes the relative-position buckets with this distance (llama_relative_position_bucket).
LLAMA_CPP_MAX_DISTANCE = 128
SIDE_FILES = ("config.json", "tokenizer.json", "grounding.json")


class ConversionError(ValueError):
    """The checkpoint is not a T5 that llama.cpp's t5 architecture computes correctly."""


def gguf_name(n_layers: int, n_decoder_layers: int) -> dict[str, str]:
    """Hugging Face T5 parameter name (without `.weight`) -> GGUF tensor name (without `.weight`)."""
    names = {"shared": "token_embd", "lm_head": "output",
             "encoder.final_layer_norm": "enc.output_norm", "decoder.final_layer_norm": "dec.output_norm"}
    attn = {"q": "q", "k": "k", "v": "v", "o": "o"}
    ffn = {"wi": "ffn_up", "wi_0": "ffn_gate", "wi_1": "ffn_up", "wo": "ffn_down"}
    for i in range(n_layers):
        hf, g = f"encoder.block.{i}.layer", f"enc.blk.{i}"
        names |= {f"{hf}.0.SelfAttention.{a}": f"{g}.attn_{b}" for a, b in attn.items()}
        names[f"{hf}.0.SelfAttention.relative_attention_bias"] = f"{g}.attn_rel_b"
        names[f"{hf}.0.layer_norm"] = f"{g}.attn_norm"
        names |= {f"{hf}.1.DenseReluDense.{a}": f"{g}.{b}" for a, b in ffn.items()}
        names[f"{hf}.1.layer_norm"] = f"{g}.ffn_norm"
    for i in range(n_decoder_layers):
        hf, g = f"decoder.block.{i}.layer", f"dec.blk.{i}"
        names |= {f"{hf}.0.SelfAttention.{a}": f"{g}.attn_{b}" for a, b in attn.items()}
        names[f"{hf}.0.SelfAttention.relative_attention_bias"] = f"{g}.attn_rel_b"
        names[f"{hf}.0.layer_norm"] = f"{g}.attn_norm"
        names |= {f"{hf}.1.EncDecAttention.{a}": f"{g}.cross_attn_{b}" for a, b in attn.items()}
        names[f"{hf}.1.layer_norm"] = f"{g}.cross_attn_norm"
        names |= {f"{hf}.2.DenseReluDense.{a}": f"{g}.{b}" for a, b in ffn.items()}
        names[f"{hf}.2.layer_norm"] = f"{g}.ffn_norm"
    return names


@dataclass
class Checkpoint:
    config: dict
    tensors: dict[str, np.ndarray]  # Hugging Face names (with .weight), float32
    tokenizer: dict                 # tokenizer.json


def find_checkpoint(model_dir: Path) -> Path:
    """MODEL_DIR/pytorch when it holds the checkpoint (our model directories), else MODEL_DIR."""
    inner = model_dir / "pytorch"
    return inner if (inner / "config.json").is_file() else model_dir


def load_checkpoint(model_dir: Path) -> Checkpoint:
    import torch
    from transformers import T5ForConditionalGeneration

    ckpt = find_checkpoint(model_dir)
    tokenizer_path = next((p for p in (ckpt / "tokenizer.json", model_dir / "tokenizer.json") if p.is_file()), None)
    if tokenizer_path is None:
        raise ConversionError(f"no tokenizer.json in {ckpt} or {model_dir}: save one with "
                              "`AutoTokenizer.from_pretrained(CKPT).save_pretrained(CKPT)` (a fast tokenizer)")
    # transformers reads every layout a user may bring (safetensors, shards, pytorch_model.bin, fp16/bf16).
    model = T5ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    config = model.config.to_dict()
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return Checkpoint(config, tensors, json.loads(tokenizer_path.read_text(encoding="utf-8")))


def check_supported(config: dict) -> None:
    """Refuse what llama.cpp's t5 graph would compute differently from Hugging Face."""
    if config.get("model_type") not in ("t5", None):
        raise ConversionError(f"model_type {config.get('model_type')!r} is not t5 (mT5/UMT5 are not handled here)")
    proj = config.get("feed_forward_proj", "relu")
    if proj not in ("relu", "gated-gelu"):
        # llama.cpp applies GELU to a gate and ReLU without one: nothing else.
        raise ConversionError(f"feed_forward_proj {proj!r}: llama.cpp's t5 runs only 'relu' and 'gated-gelu'")
    if config.get("relative_attention_max_distance", 128) != LLAMA_CPP_MAX_DISTANCE:
        raise ConversionError(f"relative_attention_max_distance {config['relative_attention_max_distance']}: "
                              f"llama.cpp hard-codes {LLAMA_CPP_MAX_DISTANCE}")


def _tied(config: dict) -> bool:
    return bool(config.get("tie_word_embeddings", True))


def mapped_tensors(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array, in Hugging Face's (out, in) layout, which is ggml's {in, out}."""
    c = ckpt.config
    n_enc, n_dec = c["num_layers"], c.get("num_decoder_layers") or c["num_layers"]
    names = gguf_name(n_enc, n_dec)
    out: dict[str, np.ndarray] = {}
    for hf_name, array in ckpt.tensors.items():
        if hf_name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            continue  # the same matrix as shared.weight
        if hf_name == "lm_head.weight" and _tied(c):
            continue  # written below, scaled
        base = hf_name.removesuffix(".weight")
        if base not in names:
            raise ConversionError(f"unexpected tensor {hf_name} {tuple(array.shape)}")
        out[names[base] + ".weight"] = np.ascontiguousarray(array, dtype=np.float32)
    if _tied(c):
        # Hugging Face scales the decoder output by d_model**-0.5 before a tied lm_head.
        out["output.weight"] = (out["token_embd.weight"] * (c["d_model"] ** -0.5)).astype(np.float32)
    return out


def tensor_type(name: str, array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    if array.ndim == 1 or name.endswith("rel_b.weight"):
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        return gguf.GGMLQuantizationType.F32  # rows must be whole blocks
    if name in ("token_embd.weight", "output.weight"):
        return EDGE_TYPE
    return qtype


def vocab_fields(tokenizer: dict, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and token types of a Unigram tokenizer.json, padded to vocab_size."""
    model = tokenizer["model"]
    if model.get("type") != "Unigram":
        raise ConversionError(f"tokenizer.json model {model.get('type')!r}: llama.cpp's t5 tokenizer is Unigram")
    pieces = [p for p, _ in model["vocab"]]
    scores = [float(s) for _, s in model["vocab"]]
    if len(pieces) > vocab_size:
        raise ConversionError(f"the tokenizer has {len(pieces)} pieces, more than the model's vocab_size {vocab_size}")
    special = {t["id"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    types = []
    for i, piece in enumerate(pieces):
        if i == model.get("unk_id"):
            types.append(gguf.TokenType.UNKNOWN)
        elif i in special:
            types.append(gguf.TokenType.CONTROL)
        elif model.get("byte_fallback") and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    # Added tokens past the Unigram vocabulary (Flan-T5's <extra_id_*>).
    for t in sorted(tokenizer.get("added_tokens", []), key=lambda t: t["id"]):
        if t["id"] == len(pieces) and t["id"] < vocab_size:
            pieces.append(t["content"])
            scores.append(-1000.0)
            types.append(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    for i in range(len(pieces), vocab_size):
        pieces.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    return pieces, scores, [int(t) for t in types]


def _normalizers(tokenizer: dict) -> list[dict]:
    n = tokenizer.get("normalizer") or {}
    return n.get("normalizers", []) if n.get("type") == "Sequence" else [n]


def precompiled_charsmap(tokenizer: dict) -> bytes | None:
    """sentencepiece's normalization table when tokenizer.json carries one (Flan-T5 does; ours is NFKC)."""
    for n in _normalizers(tokenizer):
        if n.get("type") == "Precompiled" and n.get("precompiled_charsmap"):
            return base64.b64decode(n["precompiled_charsmap"])
    return None


def _adds_space_prefix(tokenizer: dict) -> bool:
    pre = tokenizer.get("pre_tokenizer") or {}
    for p in (pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]):
        if p.get("type") == "Metaspace":  # newer tokenizers write prepend_scheme, older add_prefix_space
            return p["prepend_scheme"] != "never" if "prepend_scheme" in p else p.get("add_prefix_space", True)
    return True


def _removes_extra_whitespace(tokenizer: dict) -> bool:
    return any(n.get("type") == "Replace" and (n.get("pattern") or {}).get("Regex") == " {2,}"
               for n in _normalizers(tokenizer))


def write_gguf(ckpt: Checkpoint, path: Path, kind: str, name: str = "qreformulate-t5") -> Path:
    """One GGUF file of `kind` (q8_0 or q4_0)."""
    c = ckpt.config
    check_supported(c)
    qtype = TYPES[kind]
    n_dec = c.get("num_decoder_layers") or c["num_layers"]
    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_name(name)
    w.add_context_length(c.get("n_positions", 512))
    w.add_embedding_length(c["d_model"])
    w.add_feed_forward_length(c["d_ff"])
    w.add_block_count(c["num_layers"])
    w.add_decoder_block_count(n_dec)
    w.add_head_count(c["num_heads"])
    w.add_key_length(c["d_kv"])
    w.add_value_length(c["d_kv"])
    w.add_layer_norm_eps(c["layer_norm_epsilon"])
    w.add_layer_norm_rms_eps(c["layer_norm_epsilon"])
    w.add_relative_attn_buckets_count(c["relative_attention_num_buckets"])
    w.add_decoder_start_token_id(c.get("decoder_start_token_id", 0))
    w.add_file_type(FILE_TYPES[kind])

    pieces, scores, types = vocab_fields(ckpt.tokenizer, c["vocab_size"])
    w.add_tokenizer_model("t5")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(_adds_space_prefix(ckpt.tokenizer))
    w.add_remove_extra_whitespaces(_removes_extra_whitespace(ckpt.tokenizer))
    charsmap = precompiled_charsmap(ckpt.tokenizer)
    if charsmap:
        w.add_precompiled_charsmap(charsmap)
    w.add_eos_token_id(c.get("eos_token_id", 1))
    w.add_pad_token_id(c.get("pad_token_id", 0))
    unk = ckpt.tokenizer["model"].get("unk_id")
    if unk is not None:
        w.add_unk_token_id(unk)
    w.add_add_bos_token(False)
    w.add_add_eos_token(True)

    for tname, array in mapped_tensors(ckpt).items():
        t = tensor_type(tname, array, qtype)
        if t == gguf.GGMLQuantizationType.F32:
            w.add_tensor(tname, array)
        else:
            w.add_tensor(tname, gguf.quants.quantize(array, t), raw_dtype=t)
    path.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_path(out_dir: Path, kind: str) -> Path:
    return out_dir / f"model-{kind}.gguf"


def convert(model_dir: Path, out_dir: Path, kinds: tuple[str, ...] = ("q8_0", "q4_0")) -> list[Path]:
    """OUT_DIR/model-{kind}.gguf for each kind, and the side files the runner reads."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    ckpt = load_checkpoint(model_dir)
    check_supported(ckpt.config)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [write_gguf(ckpt, gguf_path(out_dir, k), k, name=model_dir.resolve().name) for k in kinds]
    source = find_checkpoint(model_dir)
    for side in SIDE_FILES:
        found = next((d / side for d in (model_dir, source) if (d / side).is_file()), None)
        if found:
            shutil.copy(found, out_dir / side)
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path, help="a model directory with pytorch/, or a Hugging Face T5 checkpoint")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--types", default="q8_0,q4_0", help=f"comma-separated, from {','.join(TYPES)}")
    args = p.parse_args(argv)
    kinds = tuple(k for k in args.types.split(",") if k)
    bad = set(kinds) - set(TYPES)
    if bad:
        p.error(f"unknown types {sorted(bad)}")
    for path in convert(args.model_dir, args.out_dir, kinds):
        print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
