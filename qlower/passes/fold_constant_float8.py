"""Fold a FloatQuant on a constant into a float8 initializer + DequantizeLinear (opset 19+).

    FloatQuant(W, s, ...)  ->  DequantizeLinear(q_f8, s, 0_f8, axis)
    with q = semantics.float_quant_grid(W, s, ...) computed now, stored as float8.

Any minifloat format and rounding mode folds, as long as every folded value ``q`` is a
FLOAT8E4M3FN (tried first: finer) or FLOAT8E5M2 value; ``q * s`` is then exactly what
DequantizeLinear computes, and the check compares the two before the fold is accepted.
Otherwise ``fold_constant_float`` stores the float32 values.
"""

from __future__ import annotations

import numpy as np

from .. import semantics
from ..analysis import FLOAT8_OPSET, Quantizer, per_axis_layout
from ..float8 import Float8Type, storing_type
from .base import Emitter, LoweringContext, QuantizerPass, scalar_or_vector

F32 = np.float32


def _grid(q: Quantizer) -> np.ndarray:
    mf = q.minifloat
    assert mf is not None and q.scale is not None
    values = np.asarray(q.x.values, dtype=F32)
    with np.errstate(all="ignore"):
        return semantics.float_quant_grid(
            values, q.scale, mf.exponent_bits, mf.mantissa_bits, mf.bias, mf.max_val,
            has_inf=mf.has_inf, has_nan=mf.has_nan, saturation=mf.saturation, rounding_mode=q.rounding_mode,
        )


def _layout(q: Quantizer, grid: np.ndarray) -> tuple[Float8Type | None, int | None, str | None]:
    assert q.scale is not None
    if q.scale.ndim > grid.ndim:
        return None, None, "scale has more dimensions than the weight"
    fits, axis = per_axis_layout([q.scale], grid.ndim)
    if not fits:
        return None, None, f"scale {q.scale.shape} varies along more than one axis"
    kind = storing_type(grid)
    if kind is None:
        return None, None, "the folded minifloat values are neither all FLOAT8E4M3FN nor all FLOAT8E5M2 values"
    return kind, axis, None


class FoldConstantFloat8(QuantizerPass):
    name = "fold_constant_float8"
    matches = "FloatQuant on a constant input, constant scale, values representable in an ONNX float8 type"
    emits = "float8 initializer -> DequantizeLinear(scale, 0, axis)"

    def applies_to(self, q: Quantizer) -> bool:
        return q.op == "FloatQuant" and q.is_constant_input

    def check(self, q: Quantizer, ctx: LoweringContext) -> str | None:
        if ctx.opset < FLOAT8_OPSET:
            return f"float8 DequantizeLinear needs opset {FLOAT8_OPSET} (output opset is {ctx.opset})"
        grid = _grid(q)
        kind, _, reason = _layout(q, grid)
        if kind is None:
            return reason
        assert q.scale is not None
        with np.errstate(all="ignore"):
            dequantized = (grid.astype(kind.numpy).astype(F32) * q.scale).astype(F32)
            reference = (grid * q.scale).astype(F32)
        if not np.array_equal(dequantized, reference, equal_nan=True):
            return f"the {kind.name} values do not dequantize to the folded values"
        return None

    def rewrite(self, q: Quantizer, ctx: LoweringContext) -> str:
        assert q.scale is not None
        grid = _grid(q)
        kind, axis, _ = _layout(q, grid)
        assert kind is not None
        em = Emitter(ctx, q)
        values = em.constant("quantized", grid.astype(kind.numpy))
        scale = em.constant("scale", scalar_or_vector(np.broadcast_to(q.scale, q.scale.shape), axis, F32))
        zero_point = em.constant("zero_point", np.zeros(() if axis is None else (q.scale.size,), kind.numpy))
        attrs = {} if axis is None else {"axis": axis}
        em.node("DequantizeLinear", [values, scale, zero_point], attrs, final=True)
        return f"{kind.name} initializer -> DequantizeLinear" + ("" if axis is None else f"(axis={axis})")
