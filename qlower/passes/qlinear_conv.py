"""Fold a quantized Conv unit into QLinearConv.

    DQ(x; sx, zx), DQ(w; sw, zw) [, DQ(b; sx*sw)] -> Conv -> [Relu] -> Q(sy, zy)
      ==>  QLinearConv(x, sx, zx, w, sw, zw, sy, zy [, b]) -> [Clip(max(lo, zy), hi)]

QLinearConv accumulates ``sum (x - zx)(w - zw) + b`` exactly in int32 and requantizes
once with ``sx*sw/sy``; the float reference rounds the float Conv's result, so the two
can differ by one step where that result lies within float error of a rounding tie.
Weights per tensor or per output channel (axis 0), any group count and spatial rank.
ConvTranspose has no integer ONNX operator and is reported, left as QCDQ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .integer_paths import IntegerPath, integer_path, match_unit_output, start_rewrite
from .integer_units import (
    ComputeUnitPass,
    F32,
    IntegerWeight,
    OutputQuantizer,
    Refused,
    accumulator_bias,
    describe_weight,
    detach,
    integer_weight,
    requantized_output,
)


@dataclass
class ConvUnit:
    """A Conv that fits QLinearConv, with everything its rewrite needs."""

    conv: gs.Node
    x: IntegerPath
    weight: IntegerWeight
    bias: np.ndarray | None  # int32 [O] at scale float32(sx * sw)
    relu: gs.Node | None
    out: OutputQuantizer


def match_conv(graph: gs.Graph, conv: gs.Node) -> ConvUnit:
    """Every check, before anything changes; Refused names the first that fails."""
    if conv.op == "ConvTranspose":
        raise Refused("ONNX has no integer ConvTranspose (no QLinearConvTranspose); the unit stays QCDQ")
    x = integer_path(conv.inputs[0])
    weight = integer_weight(conv.inputs[1])
    if weight.axis not in (None, 0):
        raise Refused(f"the weight scale varies along axis {weight.axis}; QLinearConv takes per-output-channel scales (axis 0) only")
    accumulator_scale = (F32(x.scale) * weight.scale).astype(F32)
    bias = None
    if len(conv.inputs) > 2 and conv.inputs[2].name:
        bias = np.broadcast_to(accumulator_bias(conv.inputs[2], accumulator_scale), (weight.values.shape[0],)).astype(np.int32)
    relu, out = match_unit_output(graph, conv.outputs[0], x, weight, 0, bias, accumulator_scale)
    return ConvUnit(conv, x, weight, bias, relu, out)


class QLinearConvPass(ComputeUnitPass[ConvUnit]):
    name = "qlinear_conv"
    matches = "DQ(x u8), DQ(int8/uint8 weight) [, int32 bias] -> Conv -> [Relu] -> Q(u8) -> [Clip]; ConvTranspose (reported)"
    emits = "QLinearConv(x, sx, zx, w, sw, zw, sy, zy [, bias]) -> [integer Clip]"

    compute_ops = ("Conv", "ConvTranspose")

    def match(self, graph: gs.Graph, node: gs.Node) -> ConvUnit:
        return match_conv(graph, node)

    def rewrite_unit(self, graph: gs.Graph, unit: ConvUnit) -> tuple[str, str | None]:
        name = unit.conv.name
        started = start_rewrite(graph, name, unit.x, unit.weight, unit.out)
        em, x, weight, out = started.em, started.x, started.weight, started.out
        attrs = dict(unit.conv.attrs)
        detach(unit.conv, unit.relu, *out.nodes)
        target, range_note = requantized_output(em, out, relu=unit.relu is not None)
        inputs: list[gs.Tensor] = [
            x.values,
            em.constant("x_scale", x.scale),
            em.constant("x_zero_point", x.zero_point),
            em.constant("w_quantized", weight.values),
            em.constant("w_scale", weight.scale),
            em.constant("w_zero_point", weight.zero_point),
            em.constant("y_scale", out.scale),
            em.constant("y_zero_point", out.zero_point),
        ]
        if unit.bias is not None:
            inputs.append(em.constant("bias_int32", unit.bias))
        em.write("QLinearConv", inputs, target, attrs, name=name)
        became = f"QLinearConv (uint8 x, {describe_weight(weight)}, uint8 y" + (", int32 bias)" if unit.bias is not None else ")")
        return "; ".join(part for part in (became, started.path_note, range_note) if part), started.weight_note
