"""Lower a ROUND activation Quant to QuantizeLinear -> [Clip] -> DequantizeLinear.

    zero point 0:   Q(x, s, 0, axis) -> [Clip(q_min, q_max)] -> DQ(s, 0, axis)
    zero point zp:  Div(x, s) -> Add(zp) -> Q(1, 0) -> [Clip] -> DQ(s, zp, axis)

QONNX rounds ``x/s + zp`` while QuantizeLinear rounds ``x/s`` and then adds ``zp``; the
two disagree at ties with odd zero points and wherever ``x/s + zp`` rounds in float32,
so a non-zero zero point is added in float first, exactly as QONNX does, and the
QuantizeLinear only rounds (its scale of 1 divides exactly). Up to 8 bits the container
is int8/uint8 with an integer Clip when the range is narrower; 9 to 16 bits use
int16/uint16 at opset 21+, clipped in float before QuantizeLinear because ONNX Runtime
has no 16-bit integer Clip (clamping ``x/s + zp`` to integer bounds in float is exactly
QONNX's clamp).

Profile policy (``qlower.profiles``), both exact:

* ``signed_activation_shift`` 128: a signed <= 8-bit range goes in uint8 with every zero
  point and Clip bound shifted by 128. ``saturate_u8(round(t) + 128) ==
  saturate_i8(round(t)) + 128`` for every t, and DequantizeLinear subtracts the shifted
  zero point, so the values are bit-identical (ONNX Runtime fuses only uint8 chains).
* ``fold_relu_into_clip``: ``Relu -> Quant`` with a per-tensor zero point, the Relu's only
  consumer being this quantizer, becomes the quantizer with its integer Clip raised to
  ``max(q_min, zp)``: ``round(max(x, 0)/s + zp) == max(round(x/s + zp), zp)`` because
  rounding is monotone and leaves the integer zp unchanged.
"""

from __future__ import annotations

import numpy as np

import onnx_graphsurgeon as gs

from ..analysis import Quantizer, per_axis_layout
from .base import Emitter, LoweringContext, QuantizerPass, broadcast_pair, scalar_or_vector
from .float_ops import emit_clip, emit_scaled

INT16_OPSET = 21


def _container(q: Quantizer, signed_shift: int) -> tuple[type, int]:
    """The Q/DQ integer type and the shift added to zero points and Clip bounds in it."""
    assert q.bit_width is not None
    if q.bit_width <= 8:
        if q.signed and signed_shift:
            return np.uint8, signed_shift
        return (np.int8 if q.signed else np.uint8), 0
    return (np.int16 if q.signed else np.uint16), 0


def _foldable_relu(q: Quantizer, ctx: LoweringContext) -> gs.Node | None:
    """The Relu feeding ``q`` that its integer Clip can absorb, if the profile folds Relus."""
    if not ctx.profile.fold_relu_into_clip or q.zero_point.size != 1 or not q.zero_point_in_range or not q.x.inputs:
        return None
    relu = q.x.inputs[0]
    if relu.op != "Relu" or len(q.x.outputs) != 1 or q.x in ctx.graph.outputs:
        return None
    return relu


class ActivationQCDQ(QuantizerPass):
    name = "activation_qcdq"
    matches = "Quant on a run-time input, ROUND/HALF_EVEN, 2..8 bits (16 at opset 21+), integer zero point"
    emits = "[Div, Add, Clip] -> QuantizeLinear -> [Clip] -> DequantizeLinear"

    def applies_to(self, q: Quantizer) -> bool:
        return q.op == "Quant" and not q.is_constant_input and not q.is_bipolar

    def check(self, q: Quantizer, ctx: LoweringContext) -> str | None:
        assert q.bit_width is not None and q.zero_point is not None
        if not q.has_integer_width:
            return f"{q.bit_width:g} bits give non-integer clamp bounds, which no integer container holds"
        if q.rounding_mode not in ("ROUND", "HALF_EVEN"):
            return f"rounding mode {q.rounding_mode} is not QuantizeLinear's round-half-to-even"
        if q.bit_width > 16:
            return f"{q.bit_width:g} bits exceed the widest ONNX integer activation container (16 bits)"
        if q.bit_width > 8 and ctx.opset < INT16_OPSET:
            return f"{q.bit_width:g}-bit activations need int16 Q/DQ, which needs opset {INT16_OPSET} (output opset is {ctx.opset})"
        if np.any(q.zero_point != np.round(q.zero_point)):
            return "zero point is not an integer"
        container, shift = _container(q, ctx.profile.signed_activation_shift)
        info, stored = np.iinfo(container), q.zero_point + shift
        if np.any(stored < info.min) or np.any(stored > info.max):
            return f"zero point {float(q.zero_point[(stored < info.min) | (stored > info.max)].ravel()[0]):g} does not fit the {info.dtype} container"
        if q.input_rank is not None and max(q.scale.ndim, q.zero_point.ndim) > q.input_rank:
            return "scale or zero point has more dimensions than the input, so the output rank grows"
        fits, _ = per_axis_layout([q.scale, q.zero_point], q.input_rank)
        if not fits:
            return f"scale {q.scale.shape} / zero point {q.zero_point.shape} vary along more than one axis"
        return None

    def rewrite(self, q: Quantizer, ctx: LoweringContext) -> str:
        container, shift = _container(q, ctx.profile.signed_activation_shift)
        info = np.iinfo(container)
        q_min, q_max = q.int_range
        x = q.x
        em = Emitter(ctx, q)
        parts = []
        relu = _foldable_relu(q, ctx) if container in (np.int8, np.uint8) else None
        if relu is not None:
            x = relu.inputs[0]
            relu.outputs.clear()  # the Relu is dropped; its max(x, 0) is now the Clip's floor
            q_min = max(q_min, int(np.round(q.zero_point.reshape(()))))
            parts.append("Relu folded")
        low, high = q_min + shift, q_max + shift
        narrower = (low, high) != (int(info.min), int(info.max))
        _, axis = per_axis_layout([q.scale, q.zero_point], q.input_rank)
        scale, zero_point = broadcast_pair(q.scale, q.zero_point)
        axis_attrs = {} if axis is None else {"axis": axis}
        shift_zero_point = em.constant("zero_point", scalar_or_vector(np.full(scale.shape, shift), axis, container))
        if q.zero_point_is_zero and container in (np.int8, np.uint8):
            q_inputs = [x, em.constant("scale", scalar_or_vector(scale, axis, np.float32)), shift_zero_point]
            q_attrs = axis_attrs
        else:
            t = emit_scaled(em, x, q.scale, q.zero_point)
            parts.append("Div" + ("" if q.zero_point_is_zero else " -> Add(zp)"))
            if container in (np.int16, np.uint16) and narrower:
                t = emit_clip(em, t, q_min, q_max)
                parts.append(f"Clip[{q_min},{q_max}] (float)")
            q_inputs = [t, em.constant("unit_scale", np.array(1.0, np.float32)), em.constant("zero_zero_point" if not shift else "shifted_zero_point", np.array(shift, container))]
            q_attrs = {}
        quantized = em.node("QuantizeLinear", q_inputs, q_attrs, dtype=container)
        parts.append(f"QuantizeLinear({info.dtype}" + (f", +{shift})" if shift else ")"))
        if narrower and container in (np.int8, np.uint8):
            quantized = emit_clip(em, quantized, low, high, container)
            parts.append(f"Clip[{low},{high}]")
        em.node(
            "DequantizeLinear",
            [quantized, em.constant("dq_scale", scalar_or_vector(scale, axis, np.float32)),
             em.constant("dq_zero_point", scalar_or_vector(np.round(zero_point) + shift, axis, container))],
            axis_attrs,
            final=True,
        )
        parts.append("DequantizeLinear" + ("" if axis is None else f"(axis={axis})"))
        return " -> ".join(parts)
