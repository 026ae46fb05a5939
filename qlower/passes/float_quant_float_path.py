"""The exact float path (SPEC 3.6) for FloatQuant: any minifloat, rounding mode and scale.

    t    = Div(x, s)
    i    = ReduceSum(Cast(GreaterOrEqual(Unsqueeze(Abs(t), -1), [2^(lo+1) .. 2^hi])), -1)
    step = Gather([2^(lo-m) .. 2^(hi-m)], i)          the minifloat's spacing at t
    q    = Mul(rnd(Div(t, step)), step)
    q    = Clip(q, -limit, limit)                     [saturation]
         | Where(q > limit, inf | NaN, Where(q < -limit, -inf | NaN, Clip(q)))   [no saturation]
    y    = Mul(Mul(q, Add(Sub(t, t), 1)), s)           a non-finite t gives NaN, as in QONNX

with ``lo = 1 - bias`` (the subnormal binade shares the smallest normal step) and ``hi``
the binade of ``limit`` (or ``lo`` when that is lower). ``semantics.float_quant_grid``
takes the step from ``frexp``; here the binade is counted by exact comparisons with
powers of two, so the step is the same float32 power of two. Dividing and multiplying by
a power of two round exactly as ``ldexp`` does, and the rounding ops are the ones the
integer float path uses, so the result is bit-identical. Values beyond ``2^(hi+1)`` use
the top step: they round to at least ``2^(hi+1) > limit`` either way, so the clamp or
the overflow value is the same. Formats whose steps float32 cannot hold (bias beyond
about +-125) go to ``float_quant_format_float_path``.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from ..analysis import Minifloat, Quantizer
from .base import Emitter, LoweringContext, QuantizerPass
from .float_ops import emit_rounding, operand

F32 = np.float32
FLOAT32_EXPONENTS = (-149, 127)  # smallest subnormal and largest power of two in float32


def binades(mf: Minifloat) -> tuple[int, int]:
    """``(lo, hi)``: the exponents of the smallest normal binade and of the largest that matters."""
    lo = 1 - mf.bias
    _, exponent = math.frexp(float(mf.limit))
    return lo, max(lo, min(exponent - 1, FLOAT32_EXPONENTS[1]))


def _emit_step(em: Emitter, t: gs.Tensor, mf: Minifloat) -> gs.Tensor:
    lo, hi = binades(mf)
    steps = np.ldexp(F32(1), np.arange(lo, hi + 1) - mf.mantissa_bits).astype(F32)
    if hi == lo:
        return em.constant("step", np.asarray(steps[0]))
    thresholds = np.ldexp(F32(1), np.arange(lo + 1, hi + 1)).astype(F32)
    magnitude = em.node("Unsqueeze", [em.node("Abs", [t]), em.constant("last_axis", np.array([-1], np.int64))])
    above = em.node("GreaterOrEqual", [magnitude, em.constant("binade_starts", thresholds)], dtype=np.bool_)
    count = em.node("Cast", [above], {"to": TensorProto.INT64}, dtype=np.int64)
    index = em.node("ReduceSum", [count, em.constant("last_axis_sum", np.array([-1], np.int64))], {"keepdims": 0}, dtype=np.int64)
    return em.node("Gather", [em.constant("steps", steps), index])


def emit_overflow(em: Emitter, q: gs.Tensor, clipped: gs.Tensor, limit: gs.Tensor, negative_limit: gs.Tensor, has_inf: bool) -> gs.Tensor:
    """Without saturation, values rounded past the limit become +-inf (``has_inf``) or NaN."""
    above = em.node("Greater", [q, limit], dtype=np.bool_)
    below = em.node("Less", [q, negative_limit], dtype=np.bool_)
    if has_inf:
        low = em.node("Where", [below, em.constant("minus_inf", np.array(-np.inf, F32)), clipped])
        return em.node("Where", [above, em.constant("plus_inf", np.array(np.inf, F32)), low])
    either = em.node("Or", [above, below], dtype=np.bool_)
    return em.node("Where", [either, em.constant("overflow_nan", np.array(np.nan, F32)), clipped])


class FloatQuantFloatPath(QuantizerPass):
    name = "float_quant_float_path"
    matches = "FloatQuant on a run-time input or with a run-time scale (any constant format whose steps float32 holds, rounding mode, saturation)"
    emits = "Div -> binade count (Abs, Unsqueeze, GreaterOrEqual, Cast, ReduceSum) -> Gather(step) -> Div -> rounding ops -> Mul -> Clip -> [Where] -> Mul(t - t + 1) -> Mul"
    uses_float_path = True
    takes_runtime_parameters = True

    def applies_to(self, q: Quantizer) -> bool:
        return q.op == "FloatQuant" and q.minifloat is not None and q.minifloat.is_constant and (bool(q.runtime) or not q.is_constant_input)

    def check(self, q: Quantizer, ctx: LoweringContext) -> str | None:
        assert q.minifloat is not None
        lo, hi = binades(q.minifloat)
        smallest, largest = lo - q.minifloat.mantissa_bits, hi
        if smallest < FLOAT32_EXPONENTS[0] or largest > FLOAT32_EXPONENTS[1]:
            return f"its steps run from 2^{smallest} to 2^{largest}, outside what float32 holds"
        return None

    def rewrite(self, q: Quantizer, ctx: LoweringContext) -> str:
        mf = q.minifloat
        assert mf is not None
        em = Emitter(ctx, q)
        scale = operand(em, "scale", q.node.inputs[1] if q.scale is None else q.scale)
        t = em.node("Div", [q.x, scale])
        step = _emit_step(em, t, mf)
        q_value = em.node("Mul", [emit_rounding(em, em.node("Div", [t, step]), q.rounding_mode), step])
        limit = np.asarray(mf.limit, F32)
        low, high = em.constant("clip_min", -limit), em.constant("clip_max", limit)
        clipped = em.node("Clip", [q_value, low, high])
        if not mf.saturation:
            clipped = emit_overflow(em, q_value, clipped, high, low, mf.has_inf)
        # t - t + 1 is 1 for a finite t and NaN otherwise; multiplying by it keeps -0 (ONNX
        # Runtime's Where returns +0 when it selects a -0 from its first branch).
        one_or_nan = em.node("Add", [em.node("Sub", [t, t]), em.constant("one", np.array(1, F32))])
        em.node("Mul", [em.node("Mul", [clipped, one_or_nan]), scale], final=True)
        runtime = "; run-time scale" if q.runtime else ""
        return f"float ops: minifloat {mf.describe()}, {q.rounding_mode} rounding{runtime}"
