"""Writes the ONNX fixtures of server/tests/onnx_int8.rs (ONNX Runtime's int8 products).

`.venv/bin/python server/tests/data/make_int8_fixtures.py` (`onnx` comes with `make venv`).

saturating_matmul.onnx: products that CPUs without VNNI saturate. Constant int8 weights of 127
(64 x 16), one copy per node:
  * MatMulInteger(A, B) with A uint8 (1 x 64): for A = 255 the exact sum is 255 * 127 * 64 =
    2072640, but AVX2's `vpmaddubsw` adds each pair of products into int16 with saturation, so
    ONNX Runtime returns 32767 * 32 = 1048544 unless asked for exact products;
  * DynamicQuantizeMatMul(X, B, 1.0), the fused op of our quantized encoders: for X = 1.0 the
    activations quantize to 255 (scale 1/255, zero point 0), so the exact answer is 127 * 64 =
    8128, and the saturated one about 4112.

shared_int8_weights.onnx: one int8 weight read by two MatMulInteger nodes. ONNX Runtime 1.31
refuses to load such a graph when exact products are asked for on a CPU without VNNI ("Attempt
to replace the existing tensor"), so the server must still open it.
"""
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

K, N = 64, 16
OPSETS = [helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)]


def weights(name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.full((K, N), 127, dtype=np.int8), name)


def model(name: str, nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(n, t, [1, K]) for n, t in inputs],
        [helper.make_tensor_value_info(n, t, [1, N]) for n, t in outputs],
        initializers,
    )
    m = helper.make_model(graph, opset_imports=OPSETS)
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def saturating() -> onnx.ModelProto:
    scale = numpy_helper.from_array(np.array(1.0, dtype=np.float32), "B_scale")
    nodes = [
        helper.make_node("MatMulInteger", ["A", "B_int"], ["Y_int"]),
        helper.make_node("DynamicQuantizeMatMul", ["X", "B_fused", "B_scale"], ["Y_float"], domain="com.microsoft"),
    ]
    return model("saturating_matmul", nodes, [("A", TensorProto.UINT8), ("X", TensorProto.FLOAT)],
                 [("Y_int", TensorProto.INT32), ("Y_float", TensorProto.FLOAT)],
                 [weights("B_int"), weights("B_fused"), scale])


def shared() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMulInteger", ["A", "B"], ["Y_1"]),
        helper.make_node("MatMulInteger", ["A", "B"], ["Y_2"]),
    ]
    return model("shared_int8_weights", nodes, [("A", TensorProto.UINT8)],
                 [("Y_1", TensorProto.INT32), ("Y_2", TensorProto.INT32)], [weights("B")])


if __name__ == "__main__":
    here = Path(__file__).parent
    for name, build in (("saturating_matmul.onnx", saturating), ("shared_int8_weights.onnx", shared)):
        onnx.save(build(), here / name)
        print(here / name)
