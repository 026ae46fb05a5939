"""Synthetic QONNX models for the compile-speed benchmark (issue 9).

``shared_chain(nodes)``: chains of ``Quant(activation) -> MatMul(Quant(weight 16x16)) -> Relu``
blocks, four nodes each, whose quantizers all read one scale, one zero-point and one
bit-width initializer, as hand-built, QKeras/hls4ml and FINN-transformed models often do.
Every quantizer is a consumer of the same three tensors, which is what made per-node
detaching quadratic.

``large_weights(bytes)``: a short chain of wide MatMuls whose float weights add up to
``bytes``, saved with external data (onnx's convention: a data file beside the model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

QONNX = "qonnx.custom_op.general"
WIDTH = 16
NODES_PER_BLOCK = 4


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], width: int, last: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "synthetic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info(last, TensorProto.FLOAT, [1, width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QONNX, 1)])
    model.ir_version = 8
    return model


def _quant(source: str, output: str, name: str, narrow: int) -> onnx.NodeProto:
    return helper.make_node("Quant", [source, "scale", "zero_point", "bit_width"], [output], name=name,
                            domain=QONNX, signed=1, narrow=narrow, rounding_mode="ROUND")


def _shared_parameters() -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array(np.array(0.0625, np.float32), "scale"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero_point"),
        numpy_helper.from_array(np.array(8.0, np.float32), "bit_width"),
    ]


def shared_chain(nodes: int, seed: int = 0) -> onnx.ModelProto:
    """About ``nodes`` nodes (rounded down to whole blocks of four) sharing one set of
    quantizer parameters. Weights are small so activations stay on the 8-bit grid."""
    rng = np.random.default_rng(seed)
    blocks = max(1, nodes // NODES_PER_BLOCK)
    graph_nodes: list[onnx.NodeProto] = []
    inits = _shared_parameters()
    current = "x"
    for i in range(blocks):
        inits.append(numpy_helper.from_array((rng.standard_normal((WIDTH, WIDTH)) * 0.25).astype(np.float32), f"w{i}"))
        graph_nodes.append(_quant(current, f"a{i}", f"act_quant_{i}", narrow=0))
        graph_nodes.append(_quant(f"w{i}", f"wq{i}", f"weight_quant_{i}", narrow=1))
        graph_nodes.append(helper.make_node("MatMul", [f"a{i}", f"wq{i}"], [f"m{i}"], name=f"matmul_{i}"))
        current = f"r{i}"
        graph_nodes.append(helper.make_node("Relu", [f"m{i}"], [current], name=f"relu_{i}"))
    return _model(graph_nodes, inits, WIDTH, current)


def large_weights(total_bytes: int, width: int = 8192, seed: int = 0) -> onnx.ModelProto:
    """Blocks of ``Quant(act) -> MatMul(Quant(weight width x width))`` with float32 weights
    adding up to at least ``total_bytes``. Values are drawn per block, so no two weights
    are equal and nothing can be deduplicated away."""
    rng = np.random.default_rng(seed)
    per_weight = width * width * 4
    blocks = max(1, -(-total_bytes // per_weight))
    graph_nodes: list[onnx.NodeProto] = []
    inits = _shared_parameters()
    current = "x"
    for i in range(blocks):
        weight = rng.integers(-8, 8, size=(width, width), dtype=np.int8).astype(np.float32) * np.float32(0.0625 / width)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        del weight
        graph_nodes.append(_quant(current, f"a{i}", f"act_quant_{i}", narrow=0))
        graph_nodes.append(_quant(f"w{i}", f"wq{i}", f"weight_quant_{i}", narrow=1))
        current = f"m{i}"
        graph_nodes.append(helper.make_node("MatMul", [f"a{i}", f"wq{i}"], [current], name=f"matmul_{i}"))
    return _model(graph_nodes, inits, width, current)


def save(model: onnx.ModelProto, path: Path, external: bool = False) -> None:
    """Save ``model``; with ``external`` every initializer of 1 KB or more goes to ``<name>.data``."""
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def large_float_weights(total_bytes: int, width: int = 8192, seed: int = 0) -> onnx.ModelProto:
    """One small quantized unit (``Quant(act) -> MatMul(Quant(weight 16x16))``) followed by
    wide float MatMuls whose unquantized weights add up to at least ``total_bytes``: they
    stay float when lowered, so the lowered model is as large as the original."""
    rng = np.random.default_rng(seed)
    blocks = max(1, -(-total_bytes // (width * width * 4)))
    inits = _shared_parameters()
    inits.append(numpy_helper.from_array((rng.standard_normal((WIDTH, width)) * 0.25).astype(np.float32), "wq_float"))
    graph_nodes = [
        _quant("x", "a", "act_quant", narrow=0),
        _quant("wq_float", "wq", "weight_quant", narrow=1),
        helper.make_node("MatMul", ["a", "wq"], ["m"], name="matmul_quantized"),
    ]
    current = "m"
    for i in range(blocks):
        weight = rng.integers(-8, 8, size=(width, width), dtype=np.int8).astype(np.float32) * np.float32(1 / width)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        del weight
        graph_nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"f{i}"], name=f"matmul_float_{i}"))
        current = f"f{i}"
    model = _model(graph_nodes, inits, width, current)
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH]))
    return model
