"""GGUF conversion (qr_train.gguf) of tiny random T5s, read back with the `gguf` package.

Uneven depths (2 encoder + 1 decoder layers, like the shipped 4 + 3), a Flan-T5 layout
(gated-GELU, untied lm_head) and a T5 v1.0 one (ReLU, tied lm_head). The tensor names are
checked against the `gguf` package's own Hugging Face -> GGUF name map for T5, the values by
dequantizing them. The last tests run the files in llama.cpp when llama-cpp-python is
installed (`make bench-deps`), and are skipped otherwise.
"""
import base64
import json

import gguf
import numpy as np
import pytest
import torch
from transformers import T5ForConditionalGeneration

from qr_train import gguf as convert_gguf
from qr_train.random_model import write_random_checkpoint

QUERIES = [
    "Who was born first, Charles Alton Ellis or Al Gore?",
    "Which plate is the densest among the Philippine Sea Plate and Pacific Plate?",
    "What are the population figures for Te Anau and Woodend, Victoria?",
]
T = gguf.GGMLQuantizationType


def _model(root, name, **config):
    ckpt = write_random_checkpoint("tiny", root / name / "ckpt", vocab_size=300, seed=3, texts=QUERIES * 30,
                                   num_layers=2, num_decoder_layers=1, **config)
    out = root / name / "gguf"
    convert_gguf.convert(ckpt, out)
    return ckpt, out


@pytest.fixture(scope="module")
def flan(tmp_path_factory):
    """Flan-T5 layout: gated-GELU, untied lm_head."""
    return _model(tmp_path_factory.mktemp("gguf"), "flan")


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    """T5 v1.0 layout: ReLU, tied lm_head; the vocab padded past the tokenizer (as Flan-T5's is)."""
    return _model(tmp_path_factory.mktemp("gguf"), "v1", feed_forward_proj="relu", tie_word_embeddings=True,
                  model_vocab_size=320)


def _fields(reader: gguf.GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def _hf_weights(ckpt) -> dict[str, np.ndarray]:
    model = T5ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _read(out, kind):
    reader = gguf.GGUFReader(out / f"model-{kind}.gguf")
    return reader, _fields(reader), {t.name: t for t in reader.tensors}


def test_metadata_uneven_depths(flan):
    ckpt, out = flan
    config = json.loads((ckpt / "config.json").read_text())
    for kind, file_type in (("q8_0", gguf.LlamaFileType.MOSTLY_Q8_0), ("q4_0", gguf.LlamaFileType.MOSTLY_Q4_0)):
        _, f, _ = _read(out, kind)
        assert f["general.architecture"] == "t5"
        assert f["t5.block_count"] == 2 and f["t5.decoder_block_count"] == 1
        assert f["t5.embedding_length"] == config["d_model"] and f["t5.feed_forward_length"] == config["d_ff"]
        assert f["t5.attention.head_count"] == config["num_heads"]
        assert f["t5.attention.key_length"] == f["t5.attention.value_length"] == config["d_kv"]
        assert f["t5.attention.relative_buckets_count"] == config["relative_attention_num_buckets"]
        assert f["t5.attention.layer_norm_rms_epsilon"] == pytest.approx(config["layer_norm_epsilon"])
        assert f["t5.decoder_start_token_id"] == 0
        assert f["general.file_type"] == file_type
    for side in ("config.json", "tokenizer.json"):
        assert (out / side).read_bytes() == (ckpt / side).read_bytes()


def test_tensor_names_shapes_and_values(flan):
    ckpt, out = flan
    hf = _hf_weights(ckpt)
    # The gguf package's own map of Hugging Face T5 names, an oracle independent of ours.
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5, 2)
    expected = {}
    for hf_name, array in hf.items():
        if hf_name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            continue
        expected[name_map.get_name(hf_name.removesuffix(".weight")) + ".weight"] = array
    assert "dec.blk.1.attn_q.weight" not in expected and "enc.blk.1.attn_q.weight" in expected
    for kind, block_type, tolerance in (("q8_0", T.Q8_0, 0.01), ("q4_0", T.Q4_0, 0.2)):
        _, _, tensors = _read(out, kind)
        assert set(tensors) == set(expected), set(tensors) ^ set(expected)
        for name, array in expected.items():
            t = tensors[name]
            # ggml lists dimensions innermost first: Hugging Face's (out, in) is {in, out}.
            assert tuple(int(d) for d in t.shape) == tuple(reversed(array.shape)), name
            if array.ndim == 1 or "rel_b" in name:
                want = T.F32
            elif name in ("token_embd.weight", "output.weight"):
                want = T.Q8_0
            else:
                want = block_type
            assert t.tensor_type == want, (name, t.tensor_type)
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(array.shape)
            scale = np.abs(array).max()
            error = np.abs(got - array).max() / scale
            assert error < (tolerance if t.tensor_type == block_type else 0.01), (name, error)
    _, _, tensors = _read(out, "q8_0")
    assert "enc.blk.0.ffn_gate.weight" in tensors and "enc.blk.0.attn_rel_b.weight" in tensors
    assert "enc.blk.1.attn_rel_b.weight" not in tensors  # block 0's bias serves every block


def test_tokenizer_fields(flan):
    ckpt, out = flan
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    pieces = [p for p, _ in tok["model"]["vocab"]]
    _, f, _ = _read(out, "q8_0")
    assert f["tokenizer.ggml.model"] == "t5"
    assert f["tokenizer.ggml.tokens"] == pieces
    assert np.allclose(f["tokenizer.ggml.scores"], [s for _, s in tok["model"]["vocab"]])
    types = f["tokenizer.ggml.token_type"]
    assert types[0] == types[1] == gguf.TokenType.CONTROL  # <pad>, </s>
    assert types[2] == gguf.TokenType.UNKNOWN
    assert types[pieces.index("<0x41>")] == gguf.TokenType.BYTE
    words = [i for i, p in enumerate(pieces) if i > 2 and not p.startswith("<0x")]
    assert words and all(types[i] == gguf.TokenType.NORMAL for i in words)
    assert (f["tokenizer.ggml.eos_token_id"], f["tokenizer.ggml.padding_token_id"],
            f["tokenizer.ggml.unknown_token_id"]) == (1, 0, 2)
    assert f["tokenizer.ggml.add_eos_token"] is True and f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.ggml.add_space_prefix"] is True
    assert "tokenizer.ggml.precompiled_charsmap" not in f  # NFKC, not a sentencepiece charsmap


def test_tied_relu_t5(v1):
    ckpt, out = v1
    hf = _hf_weights(ckpt)
    _, f, tensors = _read(out, "q8_0")
    assert "enc.blk.0.ffn_gate.weight" not in tensors and "dec.blk.0.ffn_up.weight" in tensors
    # The tied lm_head is written out with Hugging Face's d_model**-0.5 scale.
    d_model = f["t5.embedding_length"]
    output = gguf.quants.dequantize(tensors["output.weight"].data, T.Q8_0).reshape(hf["shared.weight"].shape)
    assert np.allclose(output, hf["shared.weight"] * d_model ** -0.5, atol=np.abs(output).max() / 100)
    # The vocab is padded past the tokenizer's 300 pieces.
    assert len(f["tokenizer.ggml.tokens"]) == 320 and f["tokenizer.ggml.tokens"][-1] == "[PAD319]"
    assert f["tokenizer.ggml.token_type"][-1] == gguf.TokenType.UNUSED


@pytest.mark.parametrize("change, message", [
    (dict(feed_forward_proj="gated-silu"), "feed_forward_proj"),
    (dict(relative_attention_max_distance=64), "max_distance"),
])
def test_refuses_what_llama_cpp_computes_differently(change, message):
    config = {"model_type": "t5", "feed_forward_proj": "gated-gelu", "relative_attention_max_distance": 128, **change}
    with pytest.raises(convert_gguf.ConversionError, match=message):
        convert_gguf.check_supported(config)


def test_flan_style_tokenizer_json():
    """Added tokens past the Unigram pieces (<extra_id_*>) and sentencepiece's charsmap are carried over."""
    tok = {"model": {"type": "Unigram", "unk_id": 2, "vocab": [["<pad>", 0.0], ["</s>", 0.0], ["<unk>", 0.0],
                                                              ["▁a", -1.5]]},
           "added_tokens": [{"id": 0, "content": "<pad>", "special": True}, {"id": 1, "content": "</s>", "special": True},
                            {"id": 2, "content": "<unk>", "special": True},
                            {"id": 4, "content": "<extra_id_0>", "special": True}],
           "normalizer": {"type": "Sequence", "normalizers": [
               {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(b"\x04\x00\x00\x00abcd").decode()},
               {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]},
           "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}}
    pieces, scores, types = convert_gguf.vocab_fields(tok, 6)
    assert pieces == ["<pad>", "</s>", "<unk>", "▁a", "<extra_id_0>", "[PAD5]"]
    assert types == [3, 3, 2, 1, 3, 5] and scores[3] == -1.5
    assert convert_gguf.precompiled_charsmap(tok) == b"\x04\x00\x00\x00abcd"
    assert convert_gguf._removes_extra_whitespace(tok) and convert_gguf._adds_space_prefix(tok)


# ------------------------------------------------------------------------------------------
# llama.cpp itself (llama-cpp-python, installed by `make bench-deps`)


def _torch_first_logits(ckpt, ids):
    model = T5ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([[0]]))
    return out.logits[0, -1].numpy()


def _log_softmax(x):
    x = x.astype(np.float64) - x.max()
    return x - np.log(np.exp(x).sum())


@pytest.mark.parametrize("layout", ["flan", "v1"])
def test_llama_cpp_runs_the_files(layout, request):
    pytest.importorskip("llama_cpp")
    from qr_train.gguf_loop import GgufT5

    ckpt, out = request.getfixturevalue(layout)
    # (max log-prob error in units of the log-probs' spread, least correlation) per type
    for kind, tolerance, least_corr in (("q8_0", 0.1, 0.999), ("q4_0", 0.6, 0.98)):
        model = GgufT5(out / f"model-{kind}.gguf")
        for q in QUERIES:
            ids = model.tokenizer.encode(q).ids
            got, want = _log_softmax(model._start(ids)), _log_softmax(_torch_first_logits(ckpt, ids))
            # Log-probs, not only the argmax: a tied lm_head left unscaled would multiply the spread by 8 here.
            assert 0.9 < got.std() / want.std() < 1.1, (kind, q, got.std(), want.std())
            assert np.abs(got - want).max() < tolerance * want.std(), (kind, q, np.abs(got - want).max())
            assert np.corrcoef(got, want)[0, 1] > least_corr
            assert len(model.generate_ids(ids, max_new_tokens=8, ignore_eos=True)) == 8
        model.close()
