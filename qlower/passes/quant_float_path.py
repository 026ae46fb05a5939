"""The exact float path (SPEC 3.6) for activation Quants no integer container can express.

    y = (rnd(Clip(x/s + zp, q_min, q_max)) - zp) * s

Used for rounding modes other than round-half-even, activations wider than the output
opset's integer containers, non-integer zero points and scales that vary along several
axes. Each op is the float32 step QONNX performs, in the same order, so it is exact.
"""

from __future__ import annotations

from ..analysis import Quantizer
from .base import Emitter, LoweringContext, QuantizerPass
from .float_ops import emit_clip, emit_dequantize, emit_rounding, emit_scaled


class QuantFloatPath(QuantizerPass):
    name = "quant_float_path"
    matches = "Quant on a run-time input (any bits, rounding mode, zero point, scale layout)"
    emits = "Div -> [Add] -> Clip -> rounding ops -> [Sub] -> Mul"
    uses_float_path = True

    def applies_to(self, q: Quantizer) -> bool:
        return q.op == "Quant" and not q.is_constant_input and not q.is_bipolar

    def rewrite(self, q: Quantizer, ctx: LoweringContext) -> str:
        em = Emitter(ctx, q)
        q_min, q_max = q.int_range
        t = emit_clip(em, emit_scaled(em, q.x, q.scale, q.zero_point), q_min, q_max)
        emit_dequantize(em, emit_rounding(em, t, q.rounding_mode), q.scale, q.zero_point)
        return f"float ops: range [{q_min},{q_max}], {q.rounding_mode} rounding"
