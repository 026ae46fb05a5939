"""The exact float path (SPEC 3.6) for Quants no integer container can express.

    y = (rnd(Clip(x/s + zp, q_min, q_max)) - zp) * s           (signed 1-bit: sign(t) instead)

Used for rounding modes other than round-half-even, activations wider than the output
opset's integer containers, non-integer zero points or bit widths, zero points no
container holds, scales that vary along several axes, and scale, zero point or bit width
computed at run time. Each op is the float32 step QONNX performs, in the same order, so it
is exact. A run-time bit width ``b`` gets its bounds in the graph exactly as
``semantics.float_range`` computes them: ``h = Pow(2, b - 1)``, signed ``[-h (+1 if
narrow), h - 1]``, unsigned ``[0, Pow(2, b) - (2 if narrow else 1)]``, and for a signed
quantizer ``Where(b == 1, sign(t), rounded)`` keeps QONNX's 1-bit special case.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..analysis import Quantizer
from .base import Emitter, LoweringContext, QuantizerPass
from .float_ops import Operand, emit_clip, emit_dequantize, emit_rounding, emit_scaled

F32 = np.float32


def _parameter(q: Quantizer, index: int, value: np.ndarray | None) -> Operand:
    """The constant the analysis resolved, or the run-time tensor when it is None."""
    return q.node.inputs[index] if value is None else value


def _emit_sign(em: Emitter, t: gs.Tensor) -> gs.Tensor:
    """QONNX's signed 1-bit case: +1 where ``t >= 0`` else -1."""
    non_negative = em.node("GreaterOrEqual", [t, em.constant("sign_zero", np.array(0, F32))], dtype=np.bool_)
    return em.node("Where", [non_negative, em.constant("plus_one", np.array(1, F32)), em.constant("minus_one", np.array(-1, F32))])


def emit_runtime_bounds(em: Emitter, bits: gs.Tensor, signed: bool, narrow: bool) -> tuple[gs.Tensor, gs.Tensor]:
    """``semantics.float_range`` in the graph, for a bit width known only at run time."""
    two = em.constant("two", np.array(2, F32))
    if signed:
        half = em.node("Pow", [two, em.node("Sub", [bits, em.constant("one", np.array(1, F32))])])
        low = em.node("Neg", [half])
        if narrow:
            low = em.node("Add", [low, em.constant("narrow", np.array(1, F32))])
        return low, em.node("Sub", [half, em.constant("one_below", np.array(1, F32))])
    top = em.node("Sub", [em.node("Pow", [two, bits]), em.constant("top_offset", np.array(2 if narrow else 1, F32))])
    return em.constant("zero_bound", np.array(0, F32)), top


class QuantFloatPath(QuantizerPass):
    name = "quant_float_path"
    matches = "Quant on a run-time input, or with a run-time scale / zero point / bit width (any bits, rounding, zero point, layout)"
    emits = "Div -> [Add] -> Clip -> rounding ops -> [Sub] -> Mul (bounds from Pow/Sub for a run-time bit width)"
    uses_float_path = True
    takes_runtime_parameters = True

    def applies_to(self, q: Quantizer) -> bool:
        return q.op == "Quant" and (bool(q.runtime) or (not q.is_constant_input and not q.is_bipolar))

    def rewrite(self, q: Quantizer, ctx: LoweringContext) -> str:
        em = Emitter(ctx, q)
        scale, zero_point = _parameter(q, 1, q.scale), _parameter(q, 2, q.zero_point)
        t = emit_scaled(em, q.x, scale, zero_point)
        runtime = f"; run-time {', '.join(q.runtime)}" if q.runtime else ""
        if q.bit_width is not None and q.is_bipolar:
            emit_dequantize(em, _emit_sign(em, t), scale, zero_point)
            return f"float ops: sign (signed 1-bit){runtime}"
        if q.bit_width is not None:
            q_min, q_max = q.clamp_bounds
            rounded = emit_rounding(em, emit_clip(em, t, q_min, q_max), q.rounding_mode)
            emit_dequantize(em, rounded, scale, zero_point)
            return f"float ops: range [{q_min:g},{q_max:g}], {q.rounding_mode} rounding{runtime}"
        bits = em.node("Reshape", [q.node.inputs[3], em.constant("scalar_shape", np.zeros((0,), np.int64))])
        low, high = emit_runtime_bounds(em, bits, q.signed, q.narrow)
        rounded = emit_rounding(em, em.node("Clip", [t, low, high]), q.rounding_mode)
        if q.signed:
            one_bit = em.node("Equal", [bits, em.constant("one_bit", np.array(1, F32))], dtype=np.bool_)
            rounded = em.node("Where", [one_bit, _emit_sign(em, t), rounded])
        emit_dequantize(em, rounded, scale, zero_point)
        return f"float ops: range from the run-time bit width, {q.rounding_mode} rounding{runtime}"
