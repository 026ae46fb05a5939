"""The QONNX arithmetic (SPEC section 1), in float32, in the order the spec fixes.

This module is the single source of numeric truth: the reference executor and the
compile-time folding of constant quantizers both call it, so they cannot drift apart.
Every function takes and returns float32 numpy arrays and broadcasts with numpy rules.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

F32 = np.float32

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


def _f32(value: np.ndarray | float) -> np.ndarray:
    return np.asarray(value, dtype=F32)


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
    t = _f32(x) / _f32(scale) + _f32(zero_point)
    if signed and bit_width == 1:
        return np.where(t >= 0, F32(1), F32(-1)).astype(F32)
    q_min, q_max = int_range(signed, narrow, int(bit_width))
    clamped = np.clip(t, F32(q_min), F32(q_max))
    return round_with_mode(clamped, rounding_mode)


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
    q = quant_integer(x, scale, zero_point, bit_width, signed, narrow, rounding_mode)
    return ((q - _f32(zero_point)) * _f32(scale)).astype(F32)


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
    q_min, q_max = int_range(signed, narrow, int(out_bit_width))
    t = round_with_mode(np.clip(t, F32(q_min), F32(q_max)), rounding_mode)
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
