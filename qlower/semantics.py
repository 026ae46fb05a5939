"""The QONNX arithmetic (SPEC section 1), in float32, in the order the spec fixes.

This module is the single source of numeric truth: the reference executor and the
compile-time folding of constant quantizers both call it, so they cannot drift apart.
Every function takes and returns float32 numpy arrays and broadcasts with numpy rules.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

F32 = np.float32

# Elements per slice where a large constant (a weight) is quantized a slice at a time: every
# function here is elementwise, and makes several temporaries the size of its input.
SLICE_ELEMENTS = 1 << 22

ROUNDING_MODES = ("ROUND", "HALF_EVEN", "CEIL", "FLOOR", "UP", "DOWN", "HALF_UP", "HALF_DOWN")


def normalize_rounding_mode(mode: str | bytes) -> str:
    """Upper-case a rounding mode name and reject unknown ones (raises ValueError)."""
    text = mode.decode() if isinstance(mode, bytes) else mode
    upper = text.upper()
    if upper not in ROUNDING_MODES:
        raise ValueError(f"unknown rounding_mode {text!r} (expected one of {', '.join(ROUNDING_MODES)})")
    return upper


def _round_half_away(t: np.ndarray, ties_away: bool) -> np.ndarray:
    # floor(|t|) and |t| - floor(|t|) are both exact in float32 (Sterbenz), so the tie test
    # is exact; the textbook floor(|t| + 0.5) is not (0.49999997 + 0.5 rounds to 1.0).
    magnitude = np.abs(t)
    whole = np.floor(magnitude)
    with np.errstate(invalid="ignore"):  # inf - inf is NaN, and inf rounds to inf anyway
        fraction = magnitude - whole
    bump = (fraction >= F32(0.5)) if ties_away else (fraction > F32(0.5))
    return np.copysign(whole + bump.astype(F32), t).astype(F32)


_ROUNDERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "ROUND": np.rint,
    "HALF_EVEN": np.rint,
    "CEIL": np.ceil,
    "FLOOR": np.floor,
    "UP": lambda t: np.copysign(np.ceil(np.abs(t)), t),
    "DOWN": np.trunc,
    "HALF_UP": lambda t: _round_half_away(t, ties_away=True),
    "HALF_DOWN": lambda t: _round_half_away(t, ties_away=False),
}


def round_with_mode(t: np.ndarray, mode: str) -> np.ndarray:
    """Round float32 values to integers (kept as float32) with a QONNX rounding mode."""
    return _ROUNDERS[normalize_rounding_mode(mode)](np.asarray(t, dtype=F32)).astype(F32)


def int_range(signed: bool, narrow: bool, bit_width: int) -> tuple[int, int]:
    """The integer range ``(q_min, q_max)`` of a quantizer, as exact Python ints."""
    if signed:
        q_min = -(2 ** (bit_width - 1)) + (1 if narrow else 0)
        return q_min, 2 ** (bit_width - 1) - 1
    return 0, 2**bit_width - 1 - (1 if narrow else 0)


def float_range(signed: bool, narrow: bool, bit_width: float) -> tuple[np.float32, np.float32]:
    """The clamp bounds ``(q_min, q_max)`` as QONNX computes them: the SPEC table in float32.

    For an integer ``bit_width`` these are ``int_range`` rounded once to float32 (exact up
    to 24 bits). A non-integer width is legal QONNX input and gets non-integer bounds
    (2.5 signed bits clamp to about [-2.83, 1.83]); truncating the width would be wrong.
    """
    half = F32(2) ** (F32(bit_width) - F32(1))
    if signed:
        return F32(-half + F32(1 if narrow else 0)), F32(half - F32(1))
    return F32(0), F32(F32(2) ** F32(bit_width) - F32(2 if narrow else 1))


def _f32(value: np.ndarray | float) -> np.ndarray:
    return np.asarray(value, dtype=F32)


def integer_quantizer(
    scale: np.ndarray,
    zero_point: np.ndarray,
    bit_width: float,
    signed: bool,
    narrow: bool,
    rounding_mode: str = "ROUND",
) -> Callable[[np.ndarray], np.ndarray]:
    """Steps 1-3 of Quant with the parameters fixed: ``x -> q`` (float32), the integer grid
    value before dequantization. The parameters are converted and the clamp bounds and the
    rounding function found once, here; the reference runs each quantizer once per batch."""
    scale, zero_point = _f32(scale), _f32(zero_point)
    if signed and bit_width == 1:

        def sign(x: np.ndarray) -> np.ndarray:
            t = _f32(x) / scale + zero_point
            return np.where(t >= 0, F32(1), F32(-1)).astype(F32)

        return sign
    q_min, q_max = float_range(signed, narrow, bit_width)
    rounder = _ROUNDERS[normalize_rounding_mode(rounding_mode)]

    def grid(x: np.ndarray) -> np.ndarray:
        t = _f32(x) / scale + zero_point
        return rounder(np.asarray(np.clip(t, q_min, q_max), dtype=F32)).astype(F32)

    return grid


def quantizer(
    scale: np.ndarray,
    zero_point: np.ndarray,
    bit_width: float,
    signed: bool,
    narrow: bool,
    rounding_mode: str = "ROUND",
) -> Callable[[np.ndarray], np.ndarray]:
    """QONNX ``Quant`` with the parameters fixed: ``x -> (q - zero_point) * scale``, ``q``
    from :func:`integer_quantizer`. :func:`quant` is this, made and applied at once."""
    integer = integer_quantizer(scale, zero_point, bit_width, signed, narrow, rounding_mode)
    scale, zero_point = _f32(scale), _f32(zero_point)

    def dequantized(x: np.ndarray) -> np.ndarray:
        return ((integer(x) - zero_point) * scale).astype(F32)

    return dequantized


def quant_integer(
    x: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    bit_width: float,
    signed: bool,
    narrow: bool,
    rounding_mode: str = "ROUND",
) -> np.ndarray:
    """Steps 1-3 of Quant: the integer grid value ``q`` (as float32) before dequantization."""
    return integer_quantizer(scale, zero_point, bit_width, signed, narrow, rounding_mode)(x)


def quant(
    x: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    bit_width: float,
    signed: bool,
    narrow: bool,
    rounding_mode: str = "ROUND",
) -> np.ndarray:
    """QONNX ``Quant``: ``(q - zero_point) * scale`` with ``q`` from :func:`quant_integer`."""
    return quantizer(scale, zero_point, bit_width, signed, narrow, rounding_mode)(x)


def bipolar_integer(x: np.ndarray) -> np.ndarray:
    """The ``{-1, +1}`` grid value of BipolarQuant; zero maps to +1."""
    return np.where(_f32(x) >= 0, F32(1), F32(-1)).astype(F32)


def bipolar_quant(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """QONNX ``BipolarQuant``: ``sign(x) * scale`` with ``sign(0) = +1``."""
    return (bipolar_integer(x) * _f32(scale)).astype(F32)


def trunc_power_of_two(scale: np.ndarray, out_scale: np.ndarray) -> np.ndarray:
    """Trunc v2's ratio ``out_scale / scale`` snapped to a power of two."""
    return np.exp2(np.round(np.log2(_f32(out_scale) / _f32(scale)))).astype(F32)


def trunc_v2(
    x: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    out_scale: np.ndarray,
    out_bit_width: float,
    signed: bool,
    narrow: bool,
    rounding_mode: str,
) -> np.ndarray:
    """QONNX ``Trunc`` with six inputs (Brevitas 0.12+), SPEC 1.3."""
    t = np.rint(_f32(x) / _f32(scale) + _f32(zero_point)).astype(F32)
    k = trunc_power_of_two(scale, out_scale)
    t = t / k
    q_min, q_max = float_range(signed, narrow, out_bit_width)
    t = round_with_mode(np.clip(t, q_min, q_max), rounding_mode)
    return ((t - _f32(zero_point) / k) * _f32(out_scale)).astype(F32)


def trunc_v1(
    x: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    in_bit_width: float,
    out_bit_width: float,
    rounding_mode: str,
) -> np.ndarray:
    """QONNX ``Trunc`` with five inputs (older exporters), SPEC 1.3: no clamp, input scale kept."""
    t = np.rint(_f32(x) / _f32(scale) + _f32(zero_point)).astype(F32)
    shift = np.exp2(_f32(in_bit_width) - _f32(out_bit_width)).astype(F32)
    t = round_with_mode(t / shift, rounding_mode)
    return ((t - _f32(zero_point)) * _f32(scale)).astype(F32)


def minifloat_max(exponent_bitwidth: int, mantissa_bitwidth: int, exponent_bias: int) -> float:
    """Largest value of a minifloat format whose top exponent encodes finite numbers."""
    max_exponent = 2**exponent_bitwidth - 1 - exponent_bias
    if max_exponent > 128:  # beyond every float32 (and Python float) range: no upper limit
        return float("inf")
    return (2.0 - 2.0**-mantissa_bitwidth) * 2.0**max_exponent


def float_quant_grid(
    x: np.ndarray,
    scale: np.ndarray,
    exponent_bitwidth: int,
    mantissa_bitwidth: int,
    exponent_bias: int,
    max_val: np.ndarray | float,
    *,
    has_inf: bool = False,
    has_nan: bool = False,
    saturation: bool = True,
    rounding_mode: str = "ROUND",
) -> np.ndarray:
    """The minifloat value ``q`` of QONNX ``FloatQuant`` (SPEC 1.4), before it is multiplied by ``scale``.

    Follows qonnx's ``float_quant`` step by step in float32: the step of ``t = x/scale`` is
    ``2^(max(floor(log2|t|), 1 - bias) - mantissa)`` (subnormals included), ``t`` is rounded
    to that step and clamped to ``+-min(minifloat_max, max_val)`` (:func:`float_quant` then
    multiplies it back by ``scale``). Where
    qonnx finds ``floor(log2|t|)`` with a float32 ``log2`` (which lands in the next binade
    for ``t`` within an ulp below a power of two, visible with FLOOR/CEIL), this takes the
    exact exponent from ``frexp``. Without saturation, values rounded past the maximum
    become +-inf (``has_inf``) or NaN (``has_nan``). A non-finite ``t`` gives NaN, as in
    qonnx and Brevitas (``inf / inf``). ``has_subnormal`` does not change the result in
    qonnx either, so it is not a parameter here.
    """
    t = _f32(x) / _f32(scale)
    finite = np.isfinite(t)
    safe = np.where(finite, t, F32(0))
    _, exponent = np.frexp(safe)  # safe = f * 2**exponent with 0.5 <= |f| < 1
    step_exponent = np.maximum(exponent - 1, 1 - exponent_bias) - mantissa_bitwidth
    # Scaling by a power of two is exact, so ldexp replaces qonnx's division and product.
    rounded = round_with_mode(np.ldexp(safe, -step_exponent), rounding_mode)
    q = np.ldexp(rounded, step_exponent).astype(F32)
    limit = np.minimum(F32(minifloat_max(exponent_bitwidth, mantissa_bitwidth, exponent_bias)), _f32(max_val))
    above, below = q > limit, q < -limit
    q = np.clip(q, -limit, limit)
    if not saturation:
        if has_inf:
            q = np.where(above, F32(np.inf), np.where(below, F32(-np.inf), q))
        elif has_nan:
            q = np.where(above | below, F32(np.nan), q)
        else:
            raise ValueError("FloatQuant with saturation=0 needs has_inf or has_nan to say what overflow becomes")
    return np.where(finite, q, F32(np.nan)).astype(F32)


def float_quant(
    x: np.ndarray,
    scale: np.ndarray,
    exponent_bitwidth: int,
    mantissa_bitwidth: int,
    exponent_bias: int,
    max_val: np.ndarray | float,
    *,
    has_inf: bool = False,
    has_nan: bool = False,
    saturation: bool = True,
    rounding_mode: str = "ROUND",
) -> np.ndarray:
    """QONNX ``FloatQuant`` (SPEC 1.4): :func:`float_quant_grid` of ``x/scale``, times ``scale``."""
    q = float_quant_grid(
        x, scale, exponent_bitwidth, mantissa_bitwidth, exponent_bias, max_val,
        has_inf=has_inf, has_nan=has_nan, saturation=saturation, rounding_mode=rounding_mode,
    )
    return (q * _f32(scale)).astype(F32)
