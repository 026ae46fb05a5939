"""Lower Trunc (v1 and v2) to standard float ops in QONNX's exact order.

    v2: t = Round(x/s + zp) / k, k = 2^round(log2(s_out/s));  y = (rnd(Clip(t)) - zp/k) * s_out
    v1: t = Round(x/s + zp) / 2^(b_in - b_out);               y = (rnd(t) - zp) * s

Every step is a float32 op that QONNX performs too. Constant parameters give compile-time
constants (``k``, ``zp/k``, the shift) computed by ``qlower.semantics``, so the result is
identical. Parameters computed at run time (any of the scales, zero point and bit widths)
are read as tensors: ``k`` and the v1 shift come from ``trunc_power_of_two`` (exact tables
of numpy's own results; a non-whole v1 width difference alone uses ``Pow``, see there),
``zp/k`` is a ``Div`` in the graph, and a run-time output width gets its clamp bounds as
``quant_float_path`` computes them. With ``k`` computed at run time the ``Sub(zp/k)`` stays
even for a zero zero point, since ``0/k`` is NaN where ``k`` is 0.
Brevitas's own QCDQ export of TruncAvgPool2d differs by one LSB at ties; this does not.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .. import semantics
from ..analysis import Quantizer
from .base import Emitter, LoweringContext, QuantizerPass
from .float_ops import Operand, emit_clip, emit_dequantize, emit_rounding, emit_scaled, operand
from .quant_float_path import emit_runtime_bounds
from .trunc_power_of_two import emit_ratio_power_of_two, emit_shift

F32 = np.float32


def _parameter(q: Quantizer, index: int, value: np.ndarray | float | None) -> Operand:
    """The constant the analysis resolved, or the run-time tensor when it is None."""
    return q.node.inputs[index] if value is None else np.asarray(value, F32)


def _scalar(em: Emitter, tensor: gs.Tensor, suffix: str) -> gs.Tensor:
    return em.node("Reshape", [tensor, em.constant(f"{suffix}_scalar_shape", np.zeros((0,), np.int64))])


class TruncToFloatOps(QuantizerPass):
    name = "trunc_float_ops"
    matches = "Trunc v1 (5 inputs) | Trunc v2 (6 inputs) on a run-time input, or with run-time scales / zero point / bit widths"
    emits = "Div -> [Add] -> Round -> Div(k) -> [Clip] -> rounding ops -> [Sub] -> Mul (run-time k, shift and bounds from exact tables)"
    uses_float_path = True
    takes_runtime_parameters = True

    def applies_to(self, q: Quantizer) -> bool:
        return q.op == "Trunc" and (not q.is_constant_input or bool(q.runtime))

    def rewrite(self, q: Quantizer, ctx: LoweringContext) -> str:
        em = Emitter(ctx, q)
        scale, zero_point = _parameter(q, 1, q.scale), _parameter(q, 2, q.zero_point)
        t = em.node("Round", [emit_scaled(em, q.x, scale, zero_point)])
        runtime = f"; run-time {', '.join(q.runtime)}" if q.runtime else ""
        if q.trunc_version == 2:
            return self._rewrite_v2(q, em, t, scale, zero_point) + runtime
        in_bits, out_bits = _parameter(q, 3, q.in_bit_width), _parameter(q, 4, q.bit_width)
        if isinstance(in_bits, gs.Tensor) or isinstance(out_bits, gs.Tensor):
            difference = em.node("Sub", [operand(em, "in_bits", in_bits), operand(em, "out_bits", out_bits)])
            shift: gs.Tensor = emit_shift(em, _scalar(em, difference, "shift"))
            text = "shift from the run-time bit widths"
        else:
            shift = em.constant("trunc_shift", np.exp2(F32(in_bits) - F32(out_bits)).astype(F32))
            text = f"shift 2^{float(in_bits) - float(out_bits):g}"
        t = em.node("Div", [t, shift])
        emit_dequantize(em, emit_rounding(em, t, q.rounding_mode), scale, zero_point)
        return f"Trunc v1 as float ops ({text}, {q.rounding_mode}){runtime}"

    def _rewrite_v2(self, q: Quantizer, em: Emitter, t: gs.Tensor, scale: Operand, zero_point: Operand) -> str:
        out_scale = _parameter(q, 4, q.out_scale)
        if isinstance(scale, gs.Tensor) or isinstance(out_scale, gs.Tensor):
            k: gs.Tensor = emit_ratio_power_of_two(em, em.node("Div", [operand(em, "out_scale_ratio", out_scale), operand(em, "scale_ratio", scale)]))
            zero_point_over_k: Operand = em.node("Div", [operand(em, "zero_point_k", zero_point), k])
            text = "k from the run-time scales"
        else:
            k_value = semantics.trunc_power_of_two(scale, out_scale)
            k = em.constant("trunc_scale", k_value)
            if isinstance(zero_point, gs.Tensor):
                zero_point_over_k = em.node("Div", [zero_point, k])
            else:
                with np.errstate(all="ignore"):  # a k of 0 or inf gives QONNX's NaN or 0 here too
                    zero_point_over_k = (zero_point / k_value).astype(F32)
            text = f"k={k_value.ravel()[0]:g}"
        t = em.node("Div", [t, k])
        if q.bit_width is None:
            low, high = emit_runtime_bounds(em, _scalar(em, q.node.inputs[5], "out_bits"), q.signed, q.narrow)
            t = em.node("Clip", [t, low, high])
            text += ", range from the run-time bit width"
        else:
            q_min, q_max = q.clamp_bounds
            t = emit_clip(em, t, q_min, q_max)
            text += f", range [{q_min:g},{q_max:g}]"
        t = emit_rounding(em, t, q.rounding_mode)
        if isinstance(zero_point_over_k, gs.Tensor):
            t = em.node("Sub", [t, zero_point_over_k])
            em.node("Mul", [t, operand(em, "scale_out", out_scale)], final=True)
        else:
            emit_dequantize(em, t, out_scale, zero_point_over_k)
        return f"Trunc v2 as float ops ({text}, {q.rounding_mode})"
