"""Export a T5 checkpoint to ONNX in Optimum's layout, then quantize it to int8.

    python -m qr_train.export CHECKPOINT OUT_DIR [--fp32-dir DIR] [--exclude-nodes-like wo,lm_head]

OUT_DIR gets encoder_model.onnx, decoder_model.onnx, decoder_with_past_model.onnx (int8),
config.json, generation_config.json, tokenizer.json: the layout `optimum-cli export onnx --task
text2text-generation-with-past` writes, so a real Flan-T5 export is a drop-in replacement.
The merged decoder is not written: quantize_dynamic would leave its `If` subgraphs fp32.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

ONNX_FILES = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json")


def export_fp32(checkpoint: Path, out_dir: Path) -> Path:
    """Optimum's exporter, unchanged: the same code path a user runs on a real Flan-T5."""
    from optimum.exporters.onnx import main_export

    out_dir.mkdir(parents=True, exist_ok=True)
    main_export(
        model_name_or_path=str(checkpoint),
        output=out_dir,
        task="text2text-generation-with-past",
        no_post_process=True,  # keep the split decoders; no merged decoder
        do_validation=False,
        device="cpu",
    )
    for name in ONNX_FILES:
        if not (out_dir / name).exists():
            raise RuntimeError(f"export wrote no {name} in {out_dir}")
    tokenizer = checkpoint / "tokenizer.json"
    if tokenizer.exists():  # ours, byte for byte (the exporter re-saves its own copy)
        shutil.copy(tokenizer, out_dir / "tokenizer.json")
    return out_dir


def nodes_matching(model_path: Path, patterns: list[str]) -> list[str]:
    """Names of MatMul nodes whose name contains one of the patterns (e.g. 'DenseReluDense/wo')."""
    if not patterns:
        return []
    graph = onnx.load(str(model_path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "MatMul" and any(p in n.name for p in patterns)]


def quantize_dir(fp32_dir: Path, out_dir: Path, exclude_patterns: list[str] | None = None) -> Path:
    """Dynamic int8 quantization of the weight MatMuls (MatMulConstBOnly) of each ONNX file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ONNX_FILES:
        src = fp32_dir / name
        quantize_dynamic(
            model_input=str(src),
            model_output=str(out_dir / name),
            op_types_to_quantize=["MatMul"],
            weight_type=QuantType.QInt8,
            per_channel=False,
            nodes_to_exclude=nodes_matching(src, exclude_patterns or []),
            extra_options={"MatMulConstBOnly": True},
        )
    for name in SIDE_FILES:
        if (fp32_dir / name).exists() and fp32_dir != out_dir:
            shutil.copy(fp32_dir / name, out_dir / name)
    return out_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="Hugging Face T5 checkpoint directory (with tokenizer.json)")
    p.add_argument("out_dir", type=Path, help="where the int8 model goes")
    p.add_argument("--fp32-dir", type=Path, help="keep the fp32 export here (default: a temporary directory)")
    p.add_argument("--exclude-nodes-like", default="", help="comma-separated MatMul name fragments kept in fp32")
    args = p.parse_args(argv)
    patterns = [x for x in args.exclude_nodes_like.split(",") if x]
    if args.fp32_dir:
        quantize_dir(export_fp32(args.checkpoint, args.fp32_dir), args.out_dir, patterns)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            quantize_dir(export_fp32(args.checkpoint, Path(tmp)), args.out_dir, patterns)
    print(f"int8 model -> {args.out_dir}")


if __name__ == "__main__":
    main()
