"""Tiny hand-built QONNX models for unit tests (imported by test modules as ``helpers``).

``make_quant_model()`` gives ``y = Quant(x, scale, zero_point, bit_width)`` with every
parameter an initializer; ``make_qonnx_model`` does the same for any QONNX op.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

QONNX_DOMAIN = "qonnx.custom_op.general"


def make_qonnx_model(
    op_type: str,
    params: Sequence[np.ndarray | float],
    attrs: dict[str, object] | None = None,
    *,
    shape: Sequence[int | str] = (1, 8),
    domain: str = QONNX_DOMAIN,
    opset: int = 13,
) -> onnx.ModelProto:
    """``y = op_type(x, *params)``: float32 input ``x`` of ``shape``, params as float32 initializers.

    ``params`` are the node's inputs after ``x`` in order (Quant: scale, zero point, bit
    width; Trunc: five or four more; ...), named ``p1``, ``p2``, ... . A string in
    ``shape`` is a symbolic dim.
    """
    names = [f"p{i}" for i in range(1, len(params) + 1)]
    initializers = [numpy_helper.from_array(np.asarray(value, dtype=np.float32), name) for name, value in zip(names, params)]
    node = helper.make_node(op_type, ["x", *names], ["y"], name=f"{op_type}_0", domain=domain, **(attrs or {}))
    graph = helper.make_graph(
        [node],
        f"one_{op_type}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(domain, 1)])
    model.ir_version = 8
    return model


def make_quant_model(
    shape: Sequence[int | str] = (1, 8),
    *,
    scale: np.ndarray | float = 0.5,
    zero_point: np.ndarray | float = 0.0,
    bit_width: float = 8.0,
    signed: int = 1,
    narrow: int = 0,
    rounding_mode: str = "ROUND",
    domain: str = QONNX_DOMAIN,
    opset: int = 13,
) -> onnx.ModelProto:
    """``y = Quant(x, scale, zero_point, bit_width)`` with the given attributes.

    ``scale`` and ``zero_point`` may be arrays (per-channel, broadcast against ``shape``).
    """
    attrs = {"signed": signed, "narrow": narrow, "rounding_mode": rounding_mode}
    return make_qonnx_model("Quant", [scale, zero_point, bit_width], attrs, shape=shape, domain=domain, opset=opset)


def make_conv_chain_model(
    layers: int = 7,
    *,
    channels: int = 8,
    size: int = 8,
    bits: int = 4,
    signed: int = 1,
    relu: bool = True,
    seed: int = 0,
) -> onnx.ModelProto:
    """A Brevitas-style deployment net: ``layers`` x (Quant act -> Conv(Quant w, Quant bias) -> [Relu]) -> Quant.

    Activations are per-tensor ``bits``-bit (``signed``), weights per-output-channel
    ``bits``-bit signed narrow, biases int32 on the ``s_x * s_w`` grid, as Brevitas's
    QuantConv2d with a QuantReLU/QuantIdentity between layers exports them.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def const(name: str, value: np.ndarray | float) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def quant(name: str, x: str, scale: str, bit_width: float, signed_: int, narrow: int) -> str:
        nodes.append(helper.make_node(
            "Quant", [x, scale, const(f"{name}_zp", 0.0), const(f"{name}_bw", bit_width)], [f"{name}_out"],
            name=name, domain=QONNX_DOMAIN, signed=signed_, narrow=narrow, rounding_mode="ROUND",
        ))
        return f"{name}_out"

    act_scale = np.float32(2.0 ** -3)
    x = quant("act_0", "x", const("act_0_scale", act_scale), bits, signed, 0)
    for layer in range(layers):
        w_float = rng.normal(0, 0.3, (channels, channels, 3, 3)).astype(np.float32)
        w_scale = (np.abs(w_float).reshape(channels, -1).max(axis=1) / (2 ** (bits - 1) - 1)).astype(np.float32).reshape(-1, 1, 1, 1)
        w = quant(f"w_{layer}", const(f"w_{layer}_float", w_float), const(f"w_{layer}_scale", w_scale), bits, 1, 1)
        b_scale = (act_scale * w_scale.reshape(-1)).astype(np.float32)
        b = quant(f"b_{layer}", const(f"b_{layer}_float", rng.normal(0, 0.1, channels)), const(f"b_{layer}_scale", b_scale), 32, 1, 0)
        y = f"conv_{layer}_out"
        nodes.append(helper.make_node("Conv", [x, w, b], [y], name=f"conv_{layer}", pads=[1, 1, 1, 1]))
        if relu:
            nodes.append(helper.make_node("Relu", [y], [f"relu_{layer}_out"], name=f"relu_{layer}"))
            y = f"relu_{layer}_out"
        act_scale = np.float32(rng.uniform(0.05, 0.2))
        x = quant(f"act_{layer + 1}", y, const(f"act_{layer + 1}_scale", act_scale), bits, signed, 0)
    nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    shape = [1, channels, size, size]
    graph = helper.make_graph(
        nodes, "conv_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QONNX_DOMAIN, 1)])
    model.ir_version = 8
    return model


def make_signed_4bit_conv_net(layers: int = 3, channels: int = 8, seed: int = 0) -> onnx.ModelProto:
    """A small signed 4-bit conv net: ``Quant_in -> (Conv(Quant_w{i}) -> Quant_a{i}) x layers -> GAP``.

    Activation steps are not powers of two and weights are per-channel, as in Brevitas's
    signed 4-bit deployment nets; node names are ``Conv_{i}`` and ``Quant_a{i}``.
    """
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []

    def const(name: str, value: object) -> str:
        initializers.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def quant(name: str, source: str, scale: object) -> str:
        params = [const(f"{name}_s", scale), const(f"{name}_z", 0.0), const(f"{name}_b", 4.0)]
        nodes.append(
            helper.make_node("Quant", [source, *params], [f"{name}_out"], name=name, domain=QONNX_DOMAIN, signed=1, narrow=0, rounding_mode="ROUND")
        )
        return f"{name}_out"

    tensor, inputs = quant("Quant_in", "x", 0.0371), 3
    for i in range(layers):
        scale = rng.uniform(0.02, 0.06, (channels, 1, 1, 1)).astype(np.float32)
        weight = rng.integers(-8, 8, (channels, inputs, 3, 3)).astype(np.float32) * scale
        nodes.append(helper.make_node("Conv", [tensor, quant(f"Quant_w{i}", const(f"w{i}", weight), scale)], [f"conv{i}"], name=f"Conv_{i}", pads=[1, 1, 1, 1]))
        tensor, inputs = quant(f"Quant_a{i}", f"conv{i}", 0.0523 * (i + 1)), channels
    nodes.append(helper.make_node("GlobalAveragePool", [tensor], ["pooled"], name="Pool"))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["y"], name="Flatten"))
    graph = helper.make_graph(
        nodes,
        "signed_4bit_conv_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QONNX_DOMAIN, 1)])
    model.ir_version = 8
    return model


def run_disable_all(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The first output of ``model`` in ONNX Runtime at ORT_DISABLE_ALL (the exact level)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
