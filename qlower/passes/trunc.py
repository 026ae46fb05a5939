"""Lower Trunc (v1 and v2) to standard float ops in QONNX's exact order.

    v2: t = Round(x/s + zp) / k, k = 2^round(log2(s_out/s));  y = (rnd(Clip(t)) - zp/k) * s_out
    v1: t = Round(x/s + zp) / 2^(b_in - b_out);               y = (rnd(t) - zp) * s

Every step is a float32 op that QONNX performs too, with the compile-time constants
(``k``, ``zp/k``, the shift) computed by ``qlower.semantics``, so the result is identical.
Brevitas's own QCDQ export of TruncAvgPool2d differs by one LSB at ties; this does not.
"""

from __future__ import annotations

import numpy as np

from .. import semantics
from ..analysis import Quantizer
from .base import Emitter, LoweringContext, QuantizerPass
from .float_ops import emit_clip, emit_dequantize, emit_rounding, emit_scaled

F32 = np.float32


class TruncToFloatOps(QuantizerPass):
    name = "trunc_float_ops"
    matches = "Trunc v1 (5 inputs) | Trunc v2 (6 inputs) on a run-time input"
    emits = "Div -> [Add] -> Round -> Div(k) -> [Clip] -> rounding ops -> [Sub] -> Mul"
    uses_float_path = True

    def applies_to(self, q: Quantizer) -> bool:
        return q.op == "Trunc" and not q.is_constant_input

    def rewrite(self, q: Quantizer, ctx: LoweringContext) -> str:
        em = Emitter(ctx, q)
        t = em.node("Round", [emit_scaled(em, q.x, q.scale, q.zero_point)])
        if q.trunc_version == 2:
            assert q.out_scale is not None
            k = semantics.trunc_power_of_two(q.scale, q.out_scale)
            t = em.node("Div", [t, em.constant("trunc_scale", k)])
            q_min, q_max = q.clamp_bounds
            t = emit_rounding(em, emit_clip(em, t, q_min, q_max), q.rounding_mode)
            emit_dequantize(em, t, q.out_scale, (q.zero_point / k).astype(F32))
            return f"Trunc v2 as float ops (k={k.ravel()[0]:g}, range [{q_min:g},{q_max:g}], {q.rounding_mode})"
        assert q.in_bit_width is not None and q.bit_width is not None
        shift = np.exp2(F32(q.in_bit_width) - F32(q.bit_width)).astype(F32)
        t = em.node("Div", [t, em.constant("trunc_shift", np.asarray(shift, F32))])
        emit_dequantize(em, emit_rounding(em, t, q.rounding_mode), q.scale, q.zero_point)
        return f"Trunc v1 as float ops (shift 2^{q.in_bit_width - q.bit_width:g}, {q.rounding_mode})"
