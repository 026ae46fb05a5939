"""Quantize a graph input with a saturating FloatQuant by looking its level up among exact thresholds.

    FloatQuant(x, s, e, m, bias, max)   (x a graph input, s a constant that is not a power of two)
      ->  j = the number of thresholds T[1..n-1] <= x      (binary search: Gather, GreaterOrEqual, Where)
          y = levels[j]; -0 where x is negative and y is 0; NaN where x/s is not finite

Only under a profile with ``exact_input_quantizers`` (openvino), for a saturating FloatQuant
with a constant per-tensor scale that is not a power of two and at most 4096 levels. The
float path divides by the scale, and OpenVINO's CPU plugin turns that Divide into a
multiply by the reciprocal: a graph input lying on a rounding tie of the minifloat grid
then lands one float8 step off (measured on three of the four Brevitas FP8 fixtures).

FloatQuant is a monotone step function of ``x`` (for every rounding mode) whose values are
the minifloat grid times the scale, so it is decided by comparisons with the smallest
float32 reaching each level, found by bisection over float32 with the reference itself
(``semantics.float_quant``) and checked against it level by level. Every runtime compares
floats exactly; the search takes ``ceil(log2(levels))`` steps of four elementwise ops on
the input. The zero level keeps the sign of ``x`` (``x * 0``, as the reference rounds a
negative ``t`` to ``-0``), and where ``x/s`` is not finite (NaN, infinities, or ``|x|``
beyond the largest float32 whose quotient is finite) the result is NaN, as in QONNX:
bit-identical for every input.
"""

from __future__ import annotations

import math

import numpy as np

from .. import semantics
from ..analysis import Minifloat, Quantizer
from .base import Emitter, LoweringContext, QuantizerPass
from .input_quantizer_thresholds import is_power_of_two, smallest_reaching

F32 = np.float32
MAX_LEVELS = 4096


def _levels(mf: Minifloat, scale: np.float32) -> np.ndarray:
    """Every value FloatQuant gives a finite quotient: the grid up to the clamp bound, times ``scale``, ascending."""
    lo = 1 - mf.bias
    limit = float(mf.limit)
    top = max(lo, math.frexp(limit)[1] - 1)
    magnitudes = [np.arange(0, 2 ** (mf.mantissa_bits + 1), dtype=np.float64) * 2.0 ** (lo - mf.mantissa_bits)]
    for binade in range(lo + 1, top + 1):
        magnitudes.append(np.arange(2**mf.mantissa_bits, 2 ** (mf.mantissa_bits + 1), dtype=np.float64) * 2.0 ** (binade - mf.mantissa_bits))
    grid = np.unique(np.concatenate(magnitudes + [np.array([limit])]))
    grid = grid[grid <= limit].astype(F32)
    signed = np.unique(np.concatenate([-grid, grid]))
    return (signed * scale).astype(F32)


class FloatQuantInputLookup(QuantizerPass):
    name = "float_quant_input_lookup"
    matches = (
        "FloatQuant on a graph input, saturating, constant per-tensor scale that is not a power of two, "
        f"<= {MAX_LEVELS} levels (profile exact_input_quantizers)"
    )
    emits = "binary search over exact thresholds (Gather, GreaterOrEqual, Where) -> Gather(levels) -> signed zero -> NaN where x/s is not finite"
    uses_float_path = True

    def applies_to(self, q: Quantizer) -> bool:
        return q.op == "FloatQuant" and not q.is_constant_input

    def check(self, q: Quantizer, ctx: LoweringContext) -> str | None:
        if not ctx.profile.exact_input_quantizers:
            return f"profile {ctx.profile.name} divides as the runtime does"
        if q.x not in ctx.graph.inputs or q.x.dtype != np.float32:
            return "its input is not a float32 graph input"
        mf = q.minifloat
        assert mf is not None
        if q.scale is None or q.scale.size != 1 or is_power_of_two(q.scale) or not float(q.scale.reshape(())) > 0:
            return "its scale is not one positive constant that a reciprocal multiply would round"
        if not mf.saturation:
            return "it does not saturate (its overflow values are not one monotone step function)"
        if _levels(mf, F32(1)).size > MAX_LEVELS:
            return f"it has more than {MAX_LEVELS} levels"
        return None

    def rewrite(self, q: Quantizer, ctx: LoweringContext) -> str:
        mf = q.minifloat
        assert mf is not None and q.scale is not None
        scale = F32(q.scale.reshape(()))

        def reference(x: np.ndarray) -> np.ndarray:
            with np.errstate(over="ignore", invalid="ignore"):
                return semantics.float_quant(
                    x, scale, mf.exponent_bits, mf.mantissa_bits, mf.bias, mf.max_val,
                    has_inf=mf.has_inf, has_nan=mf.has_nan, saturation=mf.saturation, rounding_mode=q.rounding_mode,
                )

        with np.errstate(over="ignore"):
            finite_up_to = smallest_reaching(lambda x: ~np.isfinite(x / scale), np.array([True]), start=0.0)[0]
        largest = np.nextafter(finite_up_to, F32(0))  # the largest |x| whose quotient is finite
        levels = _levels(mf, scale)
        bounded = lambda x: reference(np.clip(x, -largest, largest))  # noqa: E731  (monotone, finite)
        limits = smallest_reaching(bounded, levels[1:])
        if not np.array_equal(bounded(limits), levels[1:]):
            raise AssertionError(f"{q.name}: a FloatQuant level is not reached where the bisection found it")
        steps = max(1, math.ceil(math.log2(levels.size)))
        # Past the last level: +inf thresholds (no NaN: OpenVINO's GreaterOrEqual is true for
        # NaN, measured) and the top level again.
        padded = np.full(2**steps, np.inf, F32)
        padded[1 : levels.size] = limits
        values = np.concatenate([levels, np.full(2**steps - levels.size, levels[-1], F32)])

        em = Emitter(ctx, q)
        table = em.constant("thresholds", padded)
        half = 2 ** (steps - 1)
        index = em.node("Where", [
            em.node("GreaterOrEqual", [q.x, em.constant("first_threshold", np.array(padded[half], F32))], dtype=np.bool_),
            em.constant("first_index", np.array(half, np.int64)), em.constant("zero_index", np.array(0, np.int64)),
        ], dtype=np.int64)
        for bit in reversed(range(steps - 1)):
            candidate = em.node("Add", [index, em.constant(f"bit_{bit}", np.array(2**bit, np.int64))], dtype=np.int64)
            reached = em.node("GreaterOrEqual", [q.x, em.node("Gather", [table, candidate])], dtype=np.bool_)
            index = em.node("Where", [reached, candidate, index], dtype=np.int64)
        value = em.node("Gather", [em.constant("levels", values), index])
        # Zeros come from Where's second branch: ONNX Runtime's Where returns +0 when it
        # selects a -0 from its first (see float_ops._emit_signed).
        is_zero = em.node("Equal", [value, em.constant("zero", np.array(0, F32))], dtype=np.bool_)
        signed_zero = em.node("Mul", [q.x, em.constant("signed_zero", np.array(0, F32))])
        value = em.node("Where", [em.node("Not", [is_zero], dtype=np.bool_), value, signed_zero])
        # NaN fails LessOrEqual everywhere, ONNX Runtime and OpenVINO alike.
        finite = em.node("LessOrEqual", [em.node("Abs", [q.x]), em.constant("largest_finite", np.array(largest, F32))], dtype=np.bool_)
        not_finite = em.node("Not", [finite], dtype=np.bool_)
        em.node("Where", [not_finite, em.constant("not_finite", np.array(np.nan, F32)), value], final=True)
        return f"threshold lookup: minifloat {mf.describe()}, {q.rounding_mode} rounding, {levels.size} levels, {steps} search steps"
