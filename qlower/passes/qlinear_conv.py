"""Fold a quantized Conv unit, with the constant affine ops after it, into QLinearConv.

    DQ(x; sx, zx), DQ(w; sw, zw) [, bias] -> Conv -> [BatchNormalization | Mul | Add | Sub | Div]*
      -> [Relu] -> Q(sy, zy)
      ==>  QLinearConv(x, 1, zx, k*w, M', 0, 1, zy, B) -> [Clip(max(lo, zy), hi)]

QLinearConv accumulates ``sum (x - zx) * k*w + B`` exactly in int32 and requantizes with
``1 * M' / 1 == M'`` per channel; ``(k, B, M')`` come from the exact per-channel search of
:mod:`qlower.requant` through :mod:`.unit_requant`, so every reachable accumulator rounds
as the real-valued unit does (the float reference can differ only at its own float
ties). Weights per tensor or per output channel (axis 0), any group count and spatial
rank. ConvTranspose has no integer ONNX operator and is reported, left as QCDQ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .base import LoweringContext
from .integer_paths import ExactUnit, output_target, IntegerPath, integer_path, match_exact_unit, record_taps, start_rewrite, unit_note
from .integer_units import (
    F32,
    ComputeUnitPass,
    IntegerWeight,
    Refused,
    constant_float,
    detach,
    integer_weight,
)
from .unit_requant import Affine


@dataclass
class ConvUnit:
    """A Conv that fits QLinearConv, with everything its rewrite needs."""

    conv: gs.Node
    exact: ExactUnit


def _input_scale(conv: gs.Node, x: IntegerPath, weight: IntegerWeight) -> np.ndarray:
    """The input scale each output channel sees. Per-channel input scales fit only a depthwise
    conv (each output channel reads one input channel), where they join the weight scale."""
    if x.axis is None:
        return x.scale
    groups, channels, rank = int(conv.attrs.get("group", 1)), weight.values.shape[0], weight.values.ndim
    if x.axis % rank != 1 or x.scale.size != groups or weight.values.shape[1] != 1 or channels % groups:
        raise Refused("the input has per-channel scales; only a depthwise conv (one input channel per group) takes them")
    return x.scale[np.arange(channels) // (channels // groups)]


def match_conv(ctx: LoweringContext, conv: gs.Node) -> ConvUnit:
    """Every check, before anything changes; Refused names the first that fails."""
    if conv.op == "ConvTranspose":
        raise Refused("ONNX has no integer ConvTranspose (no QLinearConvTranspose); the unit stays QCDQ")
    x = integer_path(conv.inputs[0])
    weight = integer_weight(conv.inputs[1])
    if weight.axis not in (None, 0):
        raise Refused(f"the weight scale varies along axis {weight.axis}; QLinearConv takes per-output-channel scales (axis 0) only")
    channels = weight.values.shape[0]
    offset = np.zeros(channels)
    if len(conv.inputs) > 2 and conv.inputs[2].name:
        bias = constant_float(conv.inputs[2])
        if bias is None:
            raise Refused("the bias is computed at run time, not a constant")
        offset = np.broadcast_to(bias.astype(np.float64).reshape(-1), (channels,)).copy()
    rank = weight.values.ndim
    start = Affine(np.ones(channels), offset, [])
    exact = match_exact_unit(ctx.graph, conv.outputs[0], x, _input_scale(conv, x, weight), weight, 0, start,
                             rank, 1 - rank, ctx.x86_without_vnni)
    return ConvUnit(conv, exact)


class QLinearConvPass(ComputeUnitPass[ConvUnit]):
    name = "qlinear_conv"
    matches = ("DQ(x u8), DQ(8-bit weight) [, bias] -> Conv -> [BatchNormalization|Mul|Add|Sub|Div by constants] "
               "-> [Relu] -> Q(u8) -> [Clip]; ConvTranspose (reported)")
    emits = "QLinearConv(x, 1, zx, k*w, M', 0, 1, zy, B) -> [integer Clip], exact per-channel requantization"

    compute_ops = ("Conv", "ConvTranspose")

    def match(self, ctx: LoweringContext, node: gs.Node) -> ConvUnit:
        return match_conv(ctx, node)

    def rewrite_unit(self, ctx: LoweringContext, unit: ConvUnit) -> tuple[str, str | None]:
        name = unit.conv.name
        exact, weights = unit.exact, unit.exact.weights
        started = start_rewrite(ctx.graph, name, exact)
        em, x, out = started.em, started.x, started.out
        attrs = dict(unit.conv.attrs)
        detach(unit.conv, *exact.output.affine.nodes, exact.output.relu, *out.nodes)
        target, range_note = output_target(em, exact)
        record_taps(ctx, out.output, x)
        one = np.asarray(1.0, F32)
        inputs: list[gs.Tensor] = [
            x.values,
            em.constant("x_scale", one),
            em.constant("x_zero_point", x.zero_point),
            em.constant("w_quantized", weights.values),
            em.constant("w_scale", weights.multiplier),
            em.constant("w_zero_point", weights.zero_point),
            em.constant("y_scale", one),
            em.constant("y_zero_point", out.zero_point),
            em.constant("bias_int32", weights.bias),
        ]
        em.write("QLinearConv", inputs, target, attrs, name=name)
        became = f"QLinearConv (uint8 x, {weights.values.dtype} weights, uint8 y, int32 bias)"
        return "; ".join(part for part in (became, unit_note(exact), started.path_note, range_note) if part), weights.note
