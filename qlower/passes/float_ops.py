"""Standard-op building blocks that reproduce QONNX float32 steps exactly.

Shared by the passes that must keep QONNX's arithmetic order (Trunc, non-ROUND or wide
activation quantizers, 1-bit sign tests). Each helper emits the same float32 operations,
in the same order, as the matching function in ``qlower.semantics``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Emitter

F32 = np.float32


def emit_scaled(em: Emitter, x: gs.Tensor, scale: np.ndarray, zero_point: np.ndarray) -> gs.Tensor:
    """``x / scale + zero_point`` (the Add is left out when the zero point is all zeros)."""
    t = em.node("Div", [x, em.constant("scale", scale.astype(F32))])
    if np.any(zero_point):
        t = em.node("Add", [t, em.constant("zero_point", zero_point.astype(F32))])
    return t


def emit_clip(em: Emitter, t: gs.Tensor, low: float, high: float) -> gs.Tensor:
    """Float Clip with 0-d bounds; float32 rounding of the bounds matches ``np.clip``."""
    return em.node("Clip", [t, em.constant("clip_min", np.array(low, F32)), em.constant("clip_max", np.array(high, F32))])


def _emit_half_away(em: Emitter, t: gs.Tensor, ties_away: bool) -> gs.Tensor:
    # Same exact construction as semantics._round_half_away: split |t| into whole and
    # fraction (both exact), bump the whole part when the fraction reaches one half.
    magnitude = em.node("Abs", [t])
    whole = em.node("Floor", [magnitude])
    fraction = em.node("Sub", [magnitude, whole])
    compare = "GreaterOrEqual" if ties_away else "Greater"
    reaches_half = em.node(compare, [fraction, em.constant("half", np.array(0.5, F32))], dtype=np.bool_)
    bump = em.node("Cast", [reaches_half], {"to": 1})
    rounded = em.node("Add", [whole, bump])
    return em.node("Mul", [em.node("Sign", [t]), rounded])


def _emit_away_or_toward_zero(em: Emitter, t: gs.Tensor, op: str) -> gs.Tensor:
    magnitude = em.node(op, [em.node("Abs", [t])])
    return em.node("Mul", [em.node("Sign", [t]), magnitude])


def emit_rounding(em: Emitter, t: gs.Tensor, mode: str) -> gs.Tensor:
    """Round ``t`` to integers with a QONNX rounding mode, using standard ops only."""
    if mode in ("ROUND", "HALF_EVEN"):
        return em.node("Round", [t])
    if mode == "FLOOR":
        return em.node("Floor", [t])
    if mode == "CEIL":
        return em.node("Ceil", [t])
    if mode == "UP":
        return _emit_away_or_toward_zero(em, t, "Ceil")
    if mode == "DOWN":
        return _emit_away_or_toward_zero(em, t, "Floor")
    if mode == "HALF_UP":
        return _emit_half_away(em, t, ties_away=True)
    if mode == "HALF_DOWN":
        return _emit_half_away(em, t, ties_away=False)
    raise ValueError(f"unknown rounding mode {mode}")


def emit_dequantize(em: Emitter, q: gs.Tensor, scale: np.ndarray, zero_point: np.ndarray) -> gs.Tensor:
    """``(q - zero_point) * scale`` as the quantizer's final output."""
    if np.any(zero_point):
        q = em.node("Sub", [q, em.constant("zero_point_out", zero_point.astype(F32))])
    return em.node("Mul", [q, em.constant("scale_out", scale.astype(F32))], final=True)
