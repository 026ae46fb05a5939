"""Lower BipolarQuant and signed 1-bit Quant on run-time inputs to a sign select.

    BipolarQuant(x, s)        ->  Where(x >= 0, s, -s)
    Quant(x, s, zp, 1, signed) ->  Where(x/s + zp >= 0, (1 - zp)*s, (-1 - zp)*s)

No integer container holds a {-1, +1} grid usefully at run time, and the select is exact:
the branch values are computed now with QONNX's own float32 formula. For the 1-bit Quant
the sign test is on ``x/s + zp`` as QONNX computes it, because ``x/s`` can underflow to
zero where ``x`` is a tiny negative number.
"""

from __future__ import annotations

import numpy as np

from .. import semantics
from ..analysis import Quantizer
from .base import Emitter, LoweringContext, QuantizerPass
from .float_ops import emit_scaled

F32 = np.float32


class BipolarActivation(QuantizerPass):
    name = "bipolar_activation"
    matches = "BipolarQuant | signed 1-bit Quant on a run-time input"
    emits = "[Div, Add] -> GreaterOrEqual -> Where(+s, -s)"

    def applies_to(self, q: Quantizer) -> bool:
        return q.is_bipolar and not q.is_constant_input

    def rewrite(self, q: Quantizer, ctx: LoweringContext) -> str:
        em = Emitter(ctx, q)
        ones = np.ones((), F32)
        if q.op == "BipolarQuant":
            test_input = q.x
            high = semantics.bipolar_quant(ones, q.scale)
            low = semantics.bipolar_quant(-ones, q.scale)
            parts = ["GreaterOrEqual(x, 0)"]
        else:
            test_input = emit_scaled(em, q.x, q.scale, q.zero_point)
            high = ((ones - q.zero_point) * q.scale).astype(F32)
            low = ((-ones - q.zero_point) * q.scale).astype(F32)
            parts = ["Div" + ("" if q.zero_point_is_zero else " -> Add(zp)"), "GreaterOrEqual(t, 0)"]
        condition = em.node("GreaterOrEqual", [test_input, em.constant("zero", np.zeros((), F32))], dtype=np.bool_)
        em.node("Where", [condition, em.constant("high", high), em.constant("low", low)], final=True)
        parts.append("Where")
        return " -> ".join(parts)
