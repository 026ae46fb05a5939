"""Tiny hand-built QONNX models for unit tests (imported by test modules as ``helpers``).

``make_quant_model()`` gives ``y = Quant(x, scale, zero_point, bit_width)`` with every
parameter an initializer; ``make_qonnx_model`` does the same for any QONNX op.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
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
