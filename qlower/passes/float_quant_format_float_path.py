"""The exact float path (SPEC 3.6) for FloatQuant whose format is computed at run time.

The exponent bit width ``e``, mantissa bit width ``m``, exponent bias ``b`` or ``max_val``
(any of them) are tensors, so every constant ``float_quant_float_path`` derives is computed
in the graph instead, from exact operations only::

    t     = Div(x, s)
    E     = #{2^-148 .. 2^127 <= |t|} - 149          floor(log2|t|) (frexp's exponent - 1), by
                                                     a binary search of exact comparisons
    S     = Max(E, 1 - b) - m                         the step's exponent, exact small integers
    step  = Gather([2^-149 .. 2^127], Clip(S, -149, 127) + 149)
    q     = Mul(rnd(Div(t, step)), step)
    limit = Min(Gather(maxima, row(2^e - b - 1) * 25 + Clip(m, 0, 24)), max_val)
    q     = Clip(q, -limit, limit) | the overflow Where (no saturation), as the constant path
    y     = Mul(Mul(q, Add(Sub(t, t), one)), s)       NaN for a non-finite t (and see below)

``maxima`` holds ``float32(semantics.minifloat_max)`` for every top exponent
``M = 2^e - 1 - b`` from -151 (0 below) to 128 (inf above) and ``m`` from 0 to 24 (from 24
on, float32 rounds the maximum to ``2^(M+1)`` either way). ``2^e - b`` is exact when it is
small and stays beyond the table's ends when it is not (one monotone rounding), and ``2^e``
is read from a table too, so no transcendental op is involved.

Exact wherever ``m <= 127`` and ``1 - b - m <= 127`` (the largest step at most 2^127):
where ``S`` falls below -149, ``t`` is already a multiple of its step, QONNX returns ``t``
and so does the clamped step 2^-149 (``t * 2^149`` stays finite since ``m <= 127``).
Outside that domain numpy's ``ldexp`` overflows or underflows where float32 steps cannot
follow, and the output is NaN (``one`` is NaN) rather than a different number; a NaN
``max_val`` gives NaN everywhere, as in QONNX. A constant format outside the domain is
refused by name. ``float_quant_float_path`` keeps the cheaper constant tables for constant
formats whose steps float32 holds; formats it cannot take (bias beyond about +-125) come
here too.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from .. import semantics
from ..analysis import Quantizer
from .base import Emitter, LoweringContext, QuantizerPass
from .float_ops import emit_count_at_or_below, emit_rounding, operand
from .float_quant_float_path import emit_overflow

F32 = np.float32
STEP_EXPONENTS = (-149, 127)  # float32's smallest subnormal and largest power of two
TOP_EXPONENTS = (-151, 128)  # the maxima table's rows; beyond them the maximum is 0 or inf
MANTISSA_COLUMNS = 25  # mantissa widths 0..24; wider ones round to the same float32 maximum
LARGEST_MANTISSA = 127  # the exact domain: m <= 127 and 1 - b - m <= 127
LARGEST_STEP = 127


@functools.lru_cache(maxsize=1)
def maxima_table() -> np.ndarray:
    """``float32(minifloat_max)`` by top exponent ``M`` (rows) and mantissa width (columns), flattened."""
    low, high = TOP_EXPONENTS
    rows = []
    with np.errstate(over="ignore"):  # (2 - 2^-m) * 2^128 is inf in float32, as QONNX gets it
        for top in range(low, high + 1):
            # minifloat_max(e=1, m, bias=1-M) has top exponent 2^1 - 1 - (1 - M) = M
            rows.append([F32(semantics.minifloat_max(1, mantissa, 1 - top)) for mantissa in range(MANTISSA_COLUMNS)])
    return np.array(rows, F32).reshape(-1)


def _scalar(em: Emitter, q: Quantizer, index: int, value: float | None, suffix: str) -> gs.Tensor:
    """A format parameter as a 0-d float32 tensor: the constant, or the run-time tensor reshaped."""
    if value is not None:
        return em.constant(suffix, np.array(value, F32))
    return em.node("Reshape", [q.node.inputs[index], em.constant(f"{suffix}_scalar_shape", np.zeros((0,), np.int64))])


def _index(em: Emitter, value: gs.Tensor) -> gs.Tensor:
    return em.node("Cast", [value], {"to": TensorProto.INT64}, dtype=np.int64)


def _clip(em: Emitter, value: gs.Tensor, low: float, high: float, suffix: str) -> gs.Tensor:
    return em.node("Clip", [value, em.constant(f"{suffix}_min", np.array(low, F32)), em.constant(f"{suffix}_max", np.array(high, F32))])


def _plus(em: Emitter, value: gs.Tensor, amount: float, suffix: str) -> gs.Tensor:
    return em.node("Add", [value, em.constant(suffix, np.array(amount, F32))])


def out_of_domain(mantissa: int, bias: int) -> str | None:
    """Why a format is outside the exact domain (its largest step beyond float32), or None."""
    if mantissa > LARGEST_MANTISSA:
        return f"mantissa width {mantissa} > {LARGEST_MANTISSA}: QONNX's scaled values overflow float32"
    if 1 - bias - mantissa > LARGEST_STEP:
        return f"its smallest step is 2^{1 - bias - mantissa}, beyond float32's 2^{LARGEST_STEP}"
    return None


class FloatQuantFormatFloatPath(QuantizerPass):
    name = "float_quant_format_float_path"
    matches = "FloatQuant with a run-time exponent / mantissa / bias / max_val, or a constant format whose steps float32 cannot hold"
    emits = ("Div -> binade search (Abs, 9 x Gather/GreaterOrEqual/Where) -> Max/Sub -> Gather(step) -> Div -> rounding ops -> Mul -> "
             "Gather(max) -> Min -> Clip -> [Where] -> Mul(t - t + 1) -> Mul")
    uses_float_path = True
    takes_runtime_parameters = True

    def applies_to(self, q: Quantizer) -> bool:
        return q.op == "FloatQuant" and q.minifloat is not None and (bool(q.runtime) or not q.is_constant_input)

    def check(self, q: Quantizer, ctx: LoweringContext) -> str | None:
        mf = q.minifloat
        assert mf is not None
        if mf.mantissa_bits is None or mf.bias is None:
            return None
        return out_of_domain(mf.mantissa_bits, mf.bias)

    def rewrite(self, q: Quantizer, ctx: LoweringContext) -> str:
        mf = q.minifloat
        assert mf is not None
        em = Emitter(ctx, q)
        scale = operand(em, "scale", q.node.inputs[1] if q.scale is None else q.scale)
        exponent_bits = _scalar(em, q, 2, mf.exponent_bits, "exponent_bits")
        mantissa = _scalar(em, q, 3, mf.mantissa_bits, "mantissa_bits")
        bias = _scalar(em, q, 4, mf.bias, "bias")
        max_val = _scalar(em, q, 5, mf.max_val, "max_val")
        t = em.node("Div", [q.x, scale])
        step = self._emit_step(em, t, mantissa, bias)
        q_value = em.node("Mul", [emit_rounding(em, em.node("Div", [t, step]), q.rounding_mode), step])
        limit = self._emit_limit(em, exponent_bits, mantissa, bias, max_val)
        negative_limit = em.node("Neg", [limit])
        clipped = em.node("Clip", [q_value, negative_limit, limit])
        if not mf.saturation:
            clipped = emit_overflow(em, q_value, clipped, limit, negative_limit, mf.has_inf)
        # t - t + one is 1 for a finite t, NaN otherwise; ``one`` is NaN outside the exact domain.
        one_or_nan = em.node("Add", [em.node("Sub", [t, t]), self._emit_one(em, q, mantissa, bias, max_val)])
        em.node("Mul", [em.node("Mul", [clipped, one_or_nan]), scale], final=True)
        runtime = f"; run-time {', '.join(q.runtime)}" if q.runtime else ""
        return f"float ops: minifloat {mf.describe()}, step and maximum from exact tables, {q.rounding_mode} rounding{runtime}"

    @staticmethod
    def _emit_step(em: Emitter, t: gs.Tensor, mantissa: gs.Tensor, bias: gs.Tensor) -> gs.Tensor:
        low, high = STEP_EXPONENTS
        binade_starts = np.ldexp(F32(1), np.arange(low + 1, high + 1)).astype(F32)
        count = emit_count_at_or_below(em, em.node("Abs", [t]), binade_starts, "binade")
        exponent = _plus(em, em.node("Cast", [count], {"to": TensorProto.FLOAT}), float(low), "binade_offset")
        smallest = em.node("Sub", [em.constant("one_minus", np.array(1, F32)), bias])
        step_exponent = em.node("Sub", [em.node("Max", [exponent, smallest]), mantissa])
        index = _index(em, _plus(em, _clip(em, step_exponent, low, high, "step_exponent"), float(-low), "step_offset"))
        steps = np.ldexp(F32(1), np.arange(low, high + 1)).astype(F32)
        return em.node("Gather", [em.constant("steps", steps), index])

    @staticmethod
    def _emit_limit(em: Emitter, exponent_bits: gs.Tensor, mantissa: gs.Tensor, bias: gs.Tensor, max_val: gs.Tensor) -> gs.Tensor:
        with np.errstate(over="ignore"):
            powers = np.ldexp(F32(1), np.arange(0, 129)).astype(F32)  # 2^128 is inf
        power = em.node("Gather", [em.constant("exponent_powers", powers), _index(em, _clip(em, exponent_bits, 0, 128, "exponent_bits"))])
        top = _plus(em, em.node("Sub", [power, bias]), -1.0, "top_minus_one")  # 2^e - b - 1
        low, high = TOP_EXPONENTS
        row = _plus(em, _clip(em, top, low, high, "top"), float(-low), "top_offset")
        column = _clip(em, mantissa, 0, MANTISSA_COLUMNS - 1, "mantissa_column")
        flat = em.node("Add", [em.node("Mul", [row, em.constant("columns", np.array(MANTISSA_COLUMNS, F32))]), column])
        format_max = em.node("Gather", [em.constant("maxima", maxima_table()), _index(em, flat)])
        return em.node("Min", [format_max, max_val])

    @staticmethod
    def _emit_one(em: Emitter, q: Quantizer, mantissa: gs.Tensor, bias: gs.Tensor, max_val: gs.Tensor) -> gs.Tensor:
        mf = q.minifloat
        assert mf is not None
        conditions = []
        if mf.mantissa_bits is None or mf.bias is None:
            wide = em.node("Greater", [mantissa, em.constant("largest_mantissa", np.array(LARGEST_MANTISSA, F32))], dtype=np.bool_)
            smallest_step = em.node("Sub", [em.node("Sub", [em.constant("one_minus_b", np.array(1, F32)), bias]), mantissa])
            huge = em.node("Greater", [smallest_step, em.constant("largest_step", np.array(LARGEST_STEP, F32))], dtype=np.bool_)
            conditions.append(em.node("Or", [wide, huge], dtype=np.bool_))
        if mf.max_val is None:
            conditions.append(em.node("IsNaN", [max_val], dtype=np.bool_))
        one = em.constant("one", np.array(1, F32))
        if not conditions:
            return one
        outside = conditions[0] if len(conditions) == 1 else em.node("Or", conditions, dtype=np.bool_)
        return em.node("Where", [outside, em.constant("outside_nan", np.array(np.nan, F32)), one])
