"""Export + quantize parity on a tiny random T5: Optimum layout, real int8, fp32 == PyTorch."""
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from transformers import T5ForConditionalGeneration

from qr_train.export import ONNX_FILES, export_fp32, quantize_dir
from qr_train.onnx_loop import OnnxT5
from qr_train.random_model import write_random_checkpoint

QUERIES = [
    "Who was born first, Charles Alton Ellis or Al Gore?",
    "Which plate is the densest among the Philippine Sea Plate and Pacific Plate?",
    "What are the population figures for Te Anau and Woodend, Victoria?",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    ckpt = write_random_checkpoint("tiny", root / "ckpt", vocab_size=300, seed=1, texts=QUERIES * 30)
    fp32 = export_fp32(ckpt, root / "fp32")
    int8 = quantize_dir(fp32, root / "int8")
    return ckpt, fp32, int8


def test_optimum_layout(exported):
    _, _, int8 = exported
    for name in ONNX_FILES + ("config.json", "generation_config.json", "tokenizer.json"):
        assert (int8 / name).exists(), name
    assert not (int8 / "decoder_model_merged.onnx").exists()
    model = OnnxT5(int8)
    past_inputs = {i.name for i in model.decoder_past.get_inputs()}
    assert {"input_ids", "encoder_attention_mask", "past_key_values.0.encoder.key", "past_key_values.1.decoder.value"} <= past_inputs
    assert "encoder_hidden_states" not in past_inputs
    assert all(not n.startswith("present.") or ".decoder." in n for n in model.past_outputs)


@pytest.mark.parametrize("name", ONNX_FILES)
def test_int8_files_really_are_quantized(exported, name):
    _, _, int8 = exported
    ops = {n.op_type for n in onnx.load(str(int8 / name)).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops, sorted(ops)


def test_fp32_onnx_greedy_matches_pytorch(exported):
    ckpt, fp32, _ = exported
    torch_model = T5ForConditionalGeneration.from_pretrained(ckpt).eval()
    onnx_model = OnnxT5(fp32)
    for q in QUERIES:
        ids = onnx_model.tokenizer.encode(q).ids
        with torch.no_grad():
            ref = torch_model.generate(torch.tensor([ids]), max_new_tokens=12, num_beams=1, do_sample=False)[0].tolist()
        ref = [t for t in ref[1:] if t != 1][:12]  # drop the start token and EOS
        got = onnx_model.generate_ids(ids, max_new_tokens=12)
        assert got == ref[: len(got)] and len(got) >= min(len(ref), 1), (q, got, ref)


def test_int8_first_step_logits_track_fp32(exported):
    _, fp32, int8 = exported
    a, b = OnnxT5(fp32), OnnxT5(int8)
    for q in QUERIES:
        ids = np.asarray([a.tokenizer.encode(q).ids], dtype=np.int64)
        mask = np.ones_like(ids)
        logits = []
        for m in (a, b):
            hidden = m.encoder.run(None, {"input_ids": ids, "attention_mask": mask})[0]
            out = m.decoder.run(["logits"], {"input_ids": np.zeros((1, 1), np.int64), "encoder_attention_mask": mask,
                                             "encoder_hidden_states": hidden})[0]
            logits.append(out[0, -1])
        corr = np.corrcoef(logits[0], logits[1])[0, 1]
        assert corr > 0.99, corr
