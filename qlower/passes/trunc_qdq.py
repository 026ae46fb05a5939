"""Lower a Trunc v2 whose scale ratio snaps to 1 to QuantizeLinear -> [Clip] -> DequantizeLinear.

    k = 2^round(log2(s_out/s)) == 1:
    zero point 0:   Q(x, s, shift) -> [Clip(q_min+shift, q_max+shift)] -> DQ(s_out, shift)
    zero point zp:  Div(x, s) -> Add(zp) -> Q(1, shift) -> [Clip] -> DQ(s_out, zp+shift)

Only under a profile with ``trunc_unit_ratio_as_qdq`` (openvino: its low-precision
transformations recognise a QuantizeLinear after a pool, not float rounding ops). With
k == 1, QONNX's Trunc v2 is ``t = round_half_even(x/s + zp)``, clamped to the output
range (its rounding mode then sees an integer and changes nothing), ``y = (t - zp) *
s_out``: exactly a ROUND Quant with scale s whose dequantization uses s_out, which is
what this emits (the same exactness argument as ``activation_qcdq``). Per-tensor scales
and zero point, up to 8 bits; anything else stays with ``trunc_float_ops``.
"""

from __future__ import annotations

import numpy as np

from .. import semantics
from ..analysis import Quantizer
from .base import Emitter, LoweringContext, QuantizerPass
from .float_ops import emit_clip, emit_scaled

F32 = np.float32


class TruncUnitRatioQDQ(QuantizerPass):
    name = "trunc_unit_ratio_qdq"
    matches = "Trunc v2 on a run-time input, scale ratio snapping to 1, per-tensor, <= 8 bits, integer zero point (profile trunc_unit_ratio_as_qdq)"
    emits = "[Div, Add] -> QuantizeLinear -> [Clip] -> DequantizeLinear(out_scale)"

    def applies_to(self, q: Quantizer) -> bool:
        return q.op == "Trunc" and not q.is_constant_input and q.trunc_version == 2

    def check(self, q: Quantizer, ctx: LoweringContext) -> str | None:
        assert q.out_scale is not None and q.bit_width is not None
        if not ctx.profile.trunc_unit_ratio_as_qdq:
            return f"profile {ctx.profile.name} writes Trunc as float ops"
        if max(q.scale.size, q.zero_point.size, q.out_scale.size) != 1:
            return "scale, zero point or output scale is not per-tensor"
        if float(semantics.trunc_power_of_two(q.scale, q.out_scale).reshape(())) != 1.0:
            return "the scale ratio does not snap to 1"
        if q.bit_width > 8:
            return f"{q.bit_width:g} output bits exceed an 8-bit container"
        if not q.has_integer_width:
            return f"{q.bit_width:g} output bits give non-integer clamp bounds"
        if q.zero_point != np.round(q.zero_point):
            return "zero point is not an integer"
        q_min, q_max = q.int_range
        if not q_min <= float(q.zero_point.reshape(())) <= q_max:
            return "zero point lies outside the output range"
        return None

    def rewrite(self, q: Quantizer, ctx: LoweringContext) -> str:
        assert q.out_scale is not None
        shift = ctx.profile.signed_activation_shift if q.signed else 0
        container = np.uint8 if (shift or not q.signed) else np.int8
        info = np.iinfo(container)
        q_min, q_max = q.int_range
        low, high = q_min + shift, q_max + shift
        zero_point = int(np.round(q.zero_point.reshape(())))
        em = Emitter(ctx, q)
        parts = []
        if zero_point == 0:
            quantized = em.node(
                "QuantizeLinear",
                [q.x, em.constant("scale", q.scale.reshape(()).astype(F32)), em.constant("zero_point", np.array(shift, container))],
                dtype=container,
            )
        else:
            t = emit_scaled(em, q.x, q.scale.reshape(()), q.zero_point.reshape(()))
            parts.append("Div -> Add(zp)")
            quantized = em.node(
                "QuantizeLinear",
                [t, em.constant("unit_scale", np.array(1.0, F32)), em.constant("shifted_zero_point", np.array(shift, container))],
                dtype=container,
            )
        parts.append(f"QuantizeLinear({info.dtype}" + (f", +{shift})" if shift else ")"))
        if (low, high) != (int(info.min), int(info.max)):
            quantized = emit_clip(em, quantized, low, high, container)
            parts.append(f"Clip[{low},{high}]")
        em.node(
            "DequantizeLinear",
            [quantized, em.constant("out_scale", q.out_scale.reshape(()).astype(F32)), em.constant("dq_zero_point", np.array(zero_point + shift, container))],
            final=True,
        )
        parts.append("DequantizeLinear(out_scale)")
        return "Trunc v2 (k=1) as " + " -> ".join(parts)
