"""Fold a quantized MatMul or Gemm unit, with the constant affine ops after it, into
MatMulInteger and one exact requantization.

    DQ(x; sx, zx), DQ(w; sw, zw) -> MatMul | Gemm -> [Add b | BatchNormalization | Mul | Add | Sub | Div]*
      -> [Relu] -> Q(sy, zy)
      ==>  QuantizeLinear(Cast(MatMulInteger(x, k*w, zx, 0) + B) * M', 1, zy) -> [Clip]

QLinearMatMul has no bias input, and the exact per-channel requantization of
:mod:`qlower.requant` needs one (the int32 ``B``); MatMulInteger -> Add(int32) -> Cast ->
Mul(float32 M') -> QuantizeLinear(scale 1) is ORT's MLAS requantization written op by op
(``float32(acc + B) * M'``, round half to even, saturate; the test suite runs both against
the module's model), so every reachable accumulator rounds as the real-valued unit does.
No Reshape is emitted, so no batch size is baked in. Gemm's transB is folded into the
stored weight, transA becomes an integer Transpose, alpha and beta are affine (folded).
Per-column weights (axis 1 of [K, N]) are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .base import LoweringContext
from .integer_paths import ExactUnit, output_target, integer_path, match_exact_unit, record_taps, start_rewrite, unit_note
from .integer_units import (
    F32,
    UINT8,
    ComputeUnitPass,
    IntegerWeight,
    Refused,
    constant_float,
    detach,
    integer_weight,
)
from .unit_requant import Affine, channel_vector


@dataclass
class MatMulUnit:
    """A MatMul or Gemm that fits an integer MatMul, with everything its rewrite needs."""

    node: gs.Node
    exact: ExactUnit

    @property
    def transpose_x(self) -> bool:
        return bool(self.node.attrs.get("transA", 0))


def _gemm_weight(gemm: gs.Node) -> IntegerWeight:
    weight = integer_weight(gemm.inputs[1])
    if weight.values.ndim != 2:
        raise Refused(f"the Gemm weight has rank {weight.values.ndim}, not 2")
    if gemm.attrs.get("transB", 0):
        if weight.axis not in (None, 0):
            raise Refused("the weight scale varies along the input axis (axis 1 of Gemm's transposed B), not per output column")
        return weight.transposed([1, 0])
    return weight


def _gemm_affine(gemm: gs.Node, channels: int) -> Affine:
    """Gemm's ``alpha * A B + beta * C`` as the affine start of the unit."""
    alpha = float(F32(gemm.attrs.get("alpha", 1.0)))
    offset = np.zeros(channels)
    if len(gemm.inputs) > 2 and gemm.inputs[2].name:
        bias = constant_float(gemm.inputs[2])
        vector = None if bias is None else channel_vector(bias, channels, 2, -1)
        if vector is None:
            raise Refused("Gemm's C is not a constant per output column (or scalar)")
        offset = float(F32(gemm.attrs.get("beta", 1.0))) * vector
    return Affine(np.full(channels, alpha), offset, [])


def match_matmul(ctx: LoweringContext, node: gs.Node) -> MatMulUnit:
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
    if x.axis is not None:
        raise Refused("the input has per-channel scales; an integer MatMul sums over them with one input scale")
    channels = weight.values.shape[1]
    if node.op == "Gemm":
        start, out_rank = _gemm_affine(node, channels), 2
    else:
        shape = node.inputs[0].shape
        start, out_rank = Affine(np.ones(channels), np.zeros(channels), []), (max(len(shape), 2) if shape is not None else None)
    exact = match_exact_unit(ctx.graph, node.outputs[0], x, x.scale, weight, 1, start, out_rank, -1, ctx.x86_without_vnni)
    return MatMulUnit(node, exact)


class QLinearMatMulPass(ComputeUnitPass[MatMulUnit]):
    name = "qlinear_matmul"
    matches = ("DQ(x u8), DQ(8-bit weight) -> MatMul | Gemm -> [Add|BatchNormalization|Mul|Sub|Div by constants] "
               "-> [Relu] -> Q(u8) -> [Clip]")
    emits = "MatMulInteger -> Add(int32 B) -> Cast -> Mul(M') -> QuantizeLinear(1, zy) -> [Clip], exact per-channel requantization"

    compute_ops = ("MatMul", "Gemm")

    def match(self, ctx: LoweringContext, node: gs.Node) -> MatMulUnit:
        return match_matmul(ctx, node)

    def rewrite_unit(self, ctx: LoweringContext, unit: MatMulUnit) -> tuple[str, str | None]:
        name = unit.node.name
        exact, weights = unit.exact, unit.exact.weights
        started = start_rewrite(ctx.graph, name, exact)
        em, x, out = started.em, started.x, started.out
        detach(unit.node, *exact.output.affine.nodes, exact.output.relu, *out.nodes)
        target, range_note = output_target(em, exact)
        record_taps(ctx, out.output, x)
        x_values = x.values
        if unit.transpose_x:
            x_values = em.node("Transpose", [x_values], {"perm": [1, 0]}, UINT8)
        accumulator = em.node("MatMulInteger", [x_values, em.constant("w_quantized", weights.values),
                                                em.constant("x_zero_point", x.zero_point),
                                                em.constant("w_zero_point", weights.zero_point)], dtype=np.int32)
        accumulator = em.node("Add", [accumulator, em.constant("bias_int32", weights.bias)], dtype=np.int32)
        real = em.node("Cast", [accumulator], {"to": onnx.TensorProto.FLOAT})
        real = em.node("Mul", [real, em.constant("multiplier", weights.multiplier)])
        em.write("QuantizeLinear", [real, em.constant("y_scale", np.asarray(1.0, F32)), em.constant("y_zero_point", out.zero_point)],
                 target, name=f"{name}/requantize")
        became = (f"MatMulInteger (uint8 x, {weights.values.dtype} weights) + int32 bias -> Cast -> Mul(M') "
                  "-> QuantizeLinear(uint8)")
        if unit.transpose_x:
            became = "integer Transpose (transA) -> " + became
        return "; ".join(part for part in (became, unit_note(exact), started.path_note, range_note) if part), weights.note
