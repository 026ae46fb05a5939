"""Lower a FloatQuant whose format is an ONNX float8 type to float8 Q/DQ (opset 19+).

    FloatQuant(x, s, e, m, bias, max)  ->  QuantizeLinear(x, s, 0_f8, axis, saturate=1)
                                           -> DequantizeLinear(s, 0_f8, axis)

Only where ``qlower.float8.quantize_linear_type`` finds the format is exactly FLOAT8E4M3FN
or FLOAT8E5M2 (saturating, round to nearest even) and the scale is a constant laid out
per tensor or along one axis. Exact wherever ``x/scale`` is finite; an infinite
``x/scale`` gives NaN in QONNX and +-max here (see ``qlower.float8``). Everything else
takes ``float_quant_float_path``, and so does every FloatQuant under a profile without
``float8_activations`` (openvino: its CPU plugin converts to float8 through a 16-bit
float, rounding twice). The qop target keeps these Q/DQ pairs: ONNX Runtime's
CPU QLinearConv/QLinearMatMul take integers only.
"""

from __future__ import annotations

import numpy as np

from ..analysis import FLOAT8_OPSET, Quantizer, per_axis_layout
from ..float8 import quantize_linear_type
from .base import Emitter, LoweringContext, QuantizerPass, scalar_or_vector


class Float8Activation(QuantizerPass):
    name = "float8_activation"
    matches = "FloatQuant on a run-time input whose format is FLOAT8E4M3FN or FLOAT8E5M2, saturating, ROUND, constant scale"
    emits = "QuantizeLinear(float8, saturate=1) -> DequantizeLinear"

    def applies_to(self, q: Quantizer) -> bool:
        return q.op == "FloatQuant" and not q.is_constant_input

    def check(self, q: Quantizer, ctx: LoweringContext) -> str | None:
        assert q.minifloat is not None and q.scale is not None
        if not ctx.profile.float8_activations:
            return f"profile {ctx.profile.name} keeps float8 QuantizeLinear out ({ctx.profile.float8_why})"
        if quantize_linear_type(q.minifloat, q.rounding_mode) is None:
            return f"format {q.minifloat.describe()}, {q.rounding_mode} rounding is not a saturating ONNX float8 type"
        if ctx.opset < FLOAT8_OPSET:
            return f"float8 QuantizeLinear needs opset {FLOAT8_OPSET} (output opset is {ctx.opset})"
        if q.input_rank is not None and q.scale.ndim > q.input_rank:
            return "scale has more dimensions than the input, so the output rank grows"
        fits, _ = per_axis_layout([q.scale], q.input_rank)
        if not fits:
            return f"scale {q.scale.shape} varies along more than one axis"
        return None

    def rewrite(self, q: Quantizer, ctx: LoweringContext) -> str:
        assert q.minifloat is not None and q.scale is not None
        kind = quantize_linear_type(q.minifloat, q.rounding_mode)
        assert kind is not None
        _, axis = per_axis_layout([q.scale], q.input_rank)
        axis_attrs = {} if axis is None else {"axis": axis}
        em = Emitter(ctx, q)
        scale = em.constant("scale", scalar_or_vector(q.scale, axis, np.float32))
        zero_point = em.constant("zero_point", np.zeros(() if axis is None else (q.scale.size,), kind.numpy))
        quantized = em.node("QuantizeLinear", [q.x, scale, zero_point], {**axis_attrs, "saturate": 1}, dtype=kind.numpy)
        em.node("DequantizeLinear", [quantized, scale, zero_point], axis_attrs, final=True)
        where = "" if axis is None else f"(axis={axis})"
        return f"QuantizeLinear({kind.name}){where} -> DequantizeLinear{where}"
