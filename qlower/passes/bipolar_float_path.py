"""The exact float path (SPEC 3.6) for BipolarQuant whose scale is computed at run time.

    y = Mul(Where(x >= 0, +1, -1), s)

This is ``semantics.bipolar_quant`` op for op: the sign select on constants, then the
float32 product with the scale tensor. Multiplying by +-1 is exact, so every value of the
run-time scale (signed zeros, NaN, infinities, any broadcastable shape) gives exactly what
QONNX gives; selecting ``s`` or ``Neg(s)`` instead would lose the sign of a ``-0`` scale in
ONNX Runtime's Where. A NaN input takes the -1 branch, as ``NaN >= 0`` is false in both.
"""

from __future__ import annotations

import numpy as np

from ..analysis import Quantizer
from .base import Emitter, LoweringContext, QuantizerPass

F32 = np.float32


class BipolarFloatPath(QuantizerPass):
    name = "bipolar_float_path"
    matches = "BipolarQuant with a scale computed at run time (input run-time or constant)"
    emits = "GreaterOrEqual(x, 0) -> Where(+1, -1) -> Mul(scale)"
    uses_float_path = True
    takes_runtime_parameters = True

    def applies_to(self, q: Quantizer) -> bool:
        return q.op == "BipolarQuant" and bool(q.runtime)

    def rewrite(self, q: Quantizer, ctx: LoweringContext) -> str:
        em = Emitter(ctx, q)
        non_negative = em.node("GreaterOrEqual", [q.x, em.constant("zero", np.zeros((), F32))], dtype=np.bool_)
        sign = em.node("Where", [non_negative, em.constant("plus_one", np.ones((), F32)), em.constant("minus_one", -np.ones((), F32))])
        em.node("Mul", [sign, q.node.inputs[1]], final=True)
        return "float ops: sign select times the run-time scale"
