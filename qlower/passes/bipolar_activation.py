"""Lower BipolarQuant and signed 1-bit Quant on run-time inputs to a sign select.

    BipolarQuant(x, s)        ->  Where(x >= 0, s, -s)
    Quant(x, s, zp, 1, signed) ->  Where(x/s + zp >= 0, (1 - zp)*s, (-1 - zp)*s)

The select is exact: the branch values are computed now with QONNX's own float32 formula.
For the 1-bit Quant the sign test is on ``x/s + zp`` as QONNX computes it, because ``x/s``
can underflow to zero where ``x`` is a tiny negative number.

For ``--to qop`` (one scale, an integer zero point) the select picks integers instead, so
the compute unit after it reads an integer tensor:

    ==>  Where(test >= 0, uint8 129, uint8 127) -> DequantizeLinear(s, 128 + zp)

The grid value ``q`` in {-1, +1} is stored as ``128 + q`` (uint8 with zero point 128 is
what ONNX Runtime's u8s8 QLinearConv/MatMulInteger kernels take) and DequantizeLinear
gives ``float32((128 + q) - (128 + zp)) * s = float32(q - zp) * s``, bit for bit
QONNX's ``(q - zp) * s`` (``q - zp`` is a small integer, exact in float32).
"""

from __future__ import annotations

import numpy as np

from .. import semantics
from ..analysis import Quantizer
from .base import Emitter, LoweringContext, QuantizerPass
from .float_ops import emit_scaled

F32 = np.float32
# The uint8 code of the grid value 0; 128 +- 1 are the codes of -1 and +1.
CENTRE = 128


def integer_zero_point(q: Quantizer) -> int | None:
    """The zero point as the integer the uint8 form needs, or None when it has none."""
    if q.scale is None or np.asarray(q.scale).size != 1:
        return None
    if q.op == "BipolarQuant":
        return 0
    zero_point = np.asarray(q.zero_point, np.float64).reshape(-1)
    if zero_point.size != 1 or zero_point[0] != np.rint(zero_point[0]):
        return None
    shifted = CENTRE + int(zero_point[0])
    return int(zero_point[0]) if 0 <= shifted <= 255 else None


class BipolarActivation(QuantizerPass):
    name = "bipolar_activation"
    matches = "BipolarQuant | signed 1-bit Quant on a run-time input"
    emits = "[Div, Add] -> GreaterOrEqual -> Where(+s, -s); qop: Where(uint8 129, 127) -> DequantizeLinear(s, 128 + zp)"

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
        zero_point = integer_zero_point(q) if ctx.target == "qop" else None
        if zero_point is None:
            em.node("Where", [condition, em.constant("high", high), em.constant("low", low)], final=True)
            return " -> ".join(parts + ["Where"])
        # Names of their own: emit_scaled already wrote constants named "scale" and "zero_point".
        codes = em.node("Where", [condition, em.constant("code_high", np.asarray(CENTRE + 1, np.uint8)),
                                  em.constant("code_low", np.asarray(CENTRE - 1, np.uint8))], dtype=np.uint8)
        scale = np.asarray(q.scale, F32).reshape(())
        em.node("DequantizeLinear", [codes, em.constant("code_scale", scale),
                                     em.constant("code_zero_point", np.asarray(CENTRE + zero_point, np.uint8))], final=True)
        return " -> ".join(parts + [f"Where(uint8 129, 127) -> DequantizeLinear(s, {CENTRE + zero_point})"])
