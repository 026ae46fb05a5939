"""Fold a quantized MatMul or Gemm unit into QLinearMatMul (or MatMulInteger with a bias).

    DQ(x; sx, zx), DQ(w; sw, zw) -> MatMul | Gemm -> [Relu] -> Q(sy, zy)
      ==>  QLinearMatMul(x, sx, zx, w, sw, zw, sy, zy) -> [Clip(max(lo, zy), hi)]
    ... with a bias b (Gemm's C, or an Add of a constant after MatMul):
      ==>  Q(Cast(MatMulInteger(x, w, zx, zw) + b_int32) * float32(sx*sw), sy, zy) -> [Clip]

QLinearMatMul has no bias input. The bias is added to the exact int32 accumulator
(``b_int32 = b / (sx*sw)``, accepted only where that is exact) and requantized once,
like QLinearConv does; requantizing twice (QLinearMatMul -> DQ -> Add -> Q) would round
twice and saturate the pre-bias sum, and a ones-column trick would need the batch size.
Gemm's transB is folded into the stored weight, transA becomes an integer Transpose;
alpha or beta other than 1 is refused. Per-column weights (axis 1 of [K, N]) are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .integer_paths import IntegerPath, integer_path, match_unit_output, start_rewrite
from .integer_units import (
    ComputeUnitPass,
    F32,
    UINT8,
    IntegerWeight,
    OutputQuantizer,
    Refused,
    accumulator_bias,
    constant_float,
    describe_weight,
    detach,
    integer_weight,
    only_consumer,
    requantized_output,
)


@dataclass
class MatMulUnit:
    """A MatMul or Gemm that fits an integer MatMul, with everything its rewrite needs."""

    node: gs.Node
    x: IntegerPath
    weight: IntegerWeight  # [K, N], per-column scales on axis 1
    accumulator_scale: np.ndarray  # float32(sx * sw): 0-d or [N]
    bias: np.ndarray | None  # int32 at accumulator_scale
    bias_add: gs.Node | None  # the Add that carried a MatMul's bias
    relu: gs.Node | None
    out: OutputQuantizer

    @property
    def transpose_x(self) -> bool:
        return bool(self.node.attrs.get("transA", 0))


def _gemm_weight(gemm: gs.Node) -> IntegerWeight:
    if float(gemm.attrs.get("alpha", 1.0)) != 1.0:
        raise Refused(f"Gemm alpha is {gemm.attrs['alpha']:g}; only alpha 1 folds into an integer MatMul")
    has_bias = len(gemm.inputs) > 2 and gemm.inputs[2].name
    if has_bias and float(gemm.attrs.get("beta", 1.0)) != 1.0:
        raise Refused(f"Gemm beta is {gemm.attrs['beta']:g}; only beta 1 adds the bias unscaled")
    weight = integer_weight(gemm.inputs[1])
    if weight.values.ndim != 2:
        raise Refused(f"the Gemm weight has rank {weight.values.ndim}, not 2")
    if gemm.attrs.get("transB", 0):
        if weight.axis not in (None, 0):
            raise Refused("the weight scale varies along the input axis (axis 1 of Gemm's transposed B), not per output column")
        return weight.transposed([1, 0])
    return weight


def match_matmul(graph: gs.Graph, node: gs.Node) -> MatMulUnit:
    """Every check, before anything changes; Refused names the first that fails."""
    x = integer_path(node.inputs[0])
    if node.op == "Gemm":
        weight = _gemm_weight(node)
    else:
        weight = integer_weight(node.inputs[1])
        if weight.values.ndim != 2:
            raise Refused(f"the weight has rank {weight.values.ndim}; only a 2-D [K, N] weight folds")
    if weight.axis not in (None, 1):
        raise Refused(f"the weight scale varies along axis {weight.axis} of [K, N]; integer MatMul takes per-column scales (axis 1) only")
    accumulator_scale = (F32(x.scale) * weight.scale).astype(F32)
    result, bias, bias_add = node.outputs[0], None, None
    if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
        bias = accumulator_bias(node.inputs[2], accumulator_scale)
    elif node.op == "MatMul":
        add = only_consumer(graph, result)
        other = None if add is None or add.op != "Add" else add.inputs[1] if add.inputs[0] is result else add.inputs[0]
        if other is not None and constant_float(other) is not None:
            bias, bias_add, result = accumulator_bias(other, accumulator_scale), add, add.outputs[0]
    relu, out = match_unit_output(graph, result, x, weight, 1, bias, accumulator_scale)
    return MatMulUnit(node, x, weight, accumulator_scale, bias, bias_add, relu, out)


class QLinearMatMulPass(ComputeUnitPass[MatMulUnit]):
    name = "qlinear_matmul"
    matches = "DQ(x u8), DQ(int8/uint8 weight) -> MatMul [-> Add(bias)] | Gemm -> [Relu] -> Q(u8) -> [Clip]"
    emits = "QLinearMatMul -> [integer Clip]; with a bias MatMulInteger -> Add(int32) -> Cast -> Mul -> QuantizeLinear -> [Clip]"

    compute_ops = ("MatMul", "Gemm")

    def match(self, graph: gs.Graph, node: gs.Node) -> MatMulUnit:
        return match_matmul(graph, node)

    def rewrite_unit(self, graph: gs.Graph, unit: MatMulUnit) -> tuple[str, str | None]:
        name = unit.node.name
        started = start_rewrite(graph, name, unit.x, unit.weight, unit.out)
        em, x, weight, out = started.em, started.x, started.weight, started.out
        detach(unit.node, unit.bias_add, unit.relu, *out.nodes)
        target, range_note = requantized_output(em, out, relu=unit.relu is not None)
        x_values = x.values
        if unit.transpose_x:
            x_values = em.node("Transpose", [x_values], {"perm": [1, 0]}, UINT8)
        x_zero_point = em.constant("x_zero_point", x.zero_point)
        w = em.constant("w_quantized", weight.values)
        w_zero_point = em.constant("w_zero_point", weight.zero_point)
        y_scale, y_zero_point = em.constant("y_scale", out.scale), em.constant("y_zero_point", out.zero_point)
        if unit.bias is None:
            inputs = [x_values, em.constant("x_scale", x.scale), x_zero_point, w, em.constant("w_scale", weight.scale),
                      w_zero_point, y_scale, y_zero_point]
            em.write("QLinearMatMul", inputs, target, name=name)
            became = f"QLinearMatMul (uint8 x, {describe_weight(weight)}, uint8 y)"
        else:
            accumulator = em.node("MatMulInteger", [x_values, w, x_zero_point, w_zero_point], dtype=np.int32)
            accumulator = em.node("Add", [accumulator, em.constant("bias_int32", unit.bias)], dtype=np.int32)
            real = em.node("Cast", [accumulator], {"to": onnx.TensorProto.FLOAT})
            real = em.node("Mul", [real, em.constant("accumulator_scale", unit.accumulator_scale)])
            em.write("QuantizeLinear", [real, y_scale, y_zero_point], target, name=f"{name}/requantize")
            became = (f"MatMulInteger (uint8 x, {describe_weight(weight)}) + int32 bias -> Cast -> Mul(sx*sw) "
                      "-> QuantizeLinear(uint8)")
        if unit.transpose_x:
            became = "integer Transpose (transA) -> " + became
        return "; ".join(part for part in (became, started.path_note, range_note) if part), started.weight_note
