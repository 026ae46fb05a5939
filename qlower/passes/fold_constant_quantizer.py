"""Fold a Quant or BipolarQuant on a constant into an integer initializer + DequantizeLinear.

    Quant(W, s, zp, b)  ->  [Clip(q_min, q_max)] -> DequantizeLinear(q, s, zp, axis)
    with q = quant_integer(W, s, zp, b) computed now, with the exact QONNX semantics.

Weights of up to 8 bits use an int8/uint8 container (with Brevitas's range-marking Clip
when the range is narrower than the container); wider weights and every bias use int32
(bias with no Clip, as Brevitas exports it). Any rounding mode folds, since the rounding
happens here. The emitted DequantizeLinear is checked against the reference values
before it is accepted, so a container or layout that would change a value is refused.

Profile policy: ``weight_range_clip`` False drops the range Clip (exact: the stored
integers are already in range); ``wide_weights_as_float`` leaves weights over 8 bits to
``fold_constant_float`` (ONNX Runtime fuses an int32 weight DQ into QLinearMatMul and then
fails at session creation).
"""

from __future__ import annotations

import numpy as np

from .. import semantics
from ..analysis import Quantizer, per_axis_layout
from ..ir import release_pages
from .base import INT32_MAX, INT32_MIN, Emitter, LoweringContext, QuantizerPass, broadcast_pair, scalar_or_vector
from .float_ops import emit_clip


def _container(q: Quantizer) -> type:
    if q.role == "bias" or (q.bit_width is not None and q.bit_width > 8):
        return np.int32
    return np.int8 if (q.signed or q.is_bipolar) else np.uint8


def _grid(q: Quantizer) -> np.ndarray:
    values = np.asarray(q.x.values, dtype=np.float32)
    if q.op == "BipolarQuant":
        grid = semantics.bipolar_integer(values)
    else:
        grid = semantics.quant_integer(values, q.scale, q.zero_point, q.bit_width, q.signed, q.narrow, q.rounding_mode)
    release_pages(values)  # a weight memory-mapped from external data is not read again
    return grid


def _reference(q: Quantizer, grid: np.ndarray) -> np.ndarray:
    """The quantizer's output from its grid values: ``semantics.quant`` / ``bipolar_quant``
    step for step, without computing the grid (the costly part on large weights) again."""
    if q.op == "BipolarQuant":
        return (grid * np.asarray(q.scale, np.float32)).astype(np.float32)
    return ((grid - np.asarray(q.zero_point, np.float32)) * np.asarray(q.scale, np.float32)).astype(np.float32)


def _needs_clip(q: Quantizer, container: type, ctx: LoweringContext) -> bool:
    if container is np.int32 or q.is_bipolar or not ctx.profile.weight_range_clip or not q.has_integer_width:
        return False  # (a non-integer width has no integer range for the Clip to mark)
    info = np.iinfo(container)
    return q.int_range != (int(info.min), int(info.max))


class FoldConstantQuantizer(QuantizerPass):
    name = "fold_constant_quantizer"
    matches = "Quant | BipolarQuant on a constant input, constant parameters"
    emits = "integer initializer -> [Clip] -> DequantizeLinear(scale, zero_point, axis)"

    def __init__(self) -> None:
        # The grid and the integers to store (clipped, or the grid itself) that ``check``
        # computed for the quantizer ``rewrite`` is about to lower (run_pass calls rewrite
        # right after a check that returns None): computed once per weight.
        self._checked: tuple[Quantizer, np.ndarray, np.ndarray] | None = None

    def applies_to(self, q: Quantizer) -> bool:
        return q.op in ("Quant", "BipolarQuant") and q.is_constant_input

    def check(self, q: Quantizer, ctx: LoweringContext) -> str | None:
        if ctx.profile.wide_weights_as_float and q.role == "weight" and q.bit_width is not None and q.bit_width > 8:
            return f"profile {ctx.profile.name} stores weights over 8 bits as float constants"
        if np.any(q.zero_point != np.round(q.zero_point)):
            return "zero point is not an integer, so it cannot be stored in an integer container"
        fits, _ = per_axis_layout([q.scale, q.zero_point], q.input_rank)
        if not fits:
            return f"scale {q.scale.shape} / zero point {q.zero_point.shape} vary along more than one axis"
        grid = _grid(q)
        container = _container(q)
        info = np.iinfo(container)
        zp_int = np.round(q.zero_point).astype(np.int64)
        if np.any(zp_int < info.min) or np.any(zp_int > info.max):
            return f"zero point does not fit the {info.dtype} container"
        # The grid holds integers (it is rounded). Inside an 8-bit container they are stored
        # as they are, and they and the integer zero point are exact in float32, so
        # DequantizeLinear's float32(q - zp) * s and Quant's (q - zp) * s are one float32
        # product of the same numbers: equal, no need to compute both. (NaN fails the test.)
        if container is not np.int32 and info.min <= np.min(grid, initial=info.min) and np.max(grid, initial=info.max) <= info.max:
            self._checked = (q, grid, grid)
            return None
        # A 32-bit range clamps at float32(2**31 - 1) == 2**31, one past int32; storing
        # the clamped value is only exact if dequantization still gives the same float.
        stored = np.clip(grid.astype(np.float64), info.min, info.max).astype(np.int64)
        difference = stored - zp_int
        # ONNX Runtime's DequantizeLinear subtracts the zero point in int32, which wraps
        # around (q = -2^31 with zp = 3 dequantizes to a positive value).
        if np.any(difference < INT32_MIN) or np.any(difference > INT32_MAX):
            return "q - zero point overflows int32, the type DequantizeLinear subtracts in"
        dequantized = difference.astype(np.float32) * q.scale
        if not np.array_equal(dequantized, _reference(q, grid)):
            return f"the {info.dtype} container cannot reproduce every folded value exactly"
        self._checked = (q, grid, stored)
        return None

    def rewrite(self, q: Quantizer, ctx: LoweringContext) -> str:
        container = _container(q)
        info = np.iinfo(container)
        em = Emitter(ctx, q)
        checked, self._checked = self._checked, None
        if checked is not None and checked[0] is q:
            grid, stored = checked[1], checked[2].astype(container)  # integers inside the container: exact
        else:
            grid = _grid(q)
            stored = np.clip(grid.astype(np.float64), info.min, info.max).astype(container)
        _, axis = per_axis_layout([q.scale, q.zero_point], grid.ndim)  # grid: broadcast against scale and zero point
        scale, zero_point = broadcast_pair(q.scale, q.zero_point)
        values = em.constant("quantized", stored)
        dq_scale = em.constant("scale", scalar_or_vector(scale, axis, np.float32))
        dq_zero_point = em.constant("zero_point", scalar_or_vector(np.round(zero_point), axis, container))
        attrs = {} if axis is None else {"axis": axis}
        parts = [f"{info.dtype} initializer"]
        if _needs_clip(q, container, ctx):
            q_min, q_max = q.int_range
            values = emit_clip(em, values, q_min, q_max, container)
            parts.append(f"Clip[{q_min},{q_max}]")
        em.node("DequantizeLinear", [values, dq_scale, dq_zero_point], attrs, final=True)
        parts.append("DequantizeLinear" + ("" if axis is None else f"(axis={axis})"))
        return " -> ".join(parts)
