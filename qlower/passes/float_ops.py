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

# A quantizer parameter: a constant known now, or a tensor computed at run time.
Operand = np.ndarray | gs.Tensor


def operand(em: Emitter, suffix: str, value: Operand) -> gs.Tensor:
    """The parameter as a graph tensor: a new float32 constant, or the run-time tensor itself."""
    return value if isinstance(value, gs.Tensor) else em.constant(suffix, np.asarray(value).astype(F32))


def _is_zero(value: Operand) -> bool:
    return not isinstance(value, gs.Tensor) and not np.any(value)


def emit_scaled(em: Emitter, x: gs.Tensor, scale: Operand, zero_point: Operand) -> gs.Tensor:
    """``x / scale + zero_point`` (the Add is left out when the zero point is a constant zero)."""
    t = em.node("Div", [x, operand(em, "scale", scale)])
    if not _is_zero(zero_point):
        t = em.node("Add", [t, operand(em, "zero_point", zero_point)])
    return t


def emit_clip(em: Emitter, t: gs.Tensor, low: float, high: float, dtype: type = F32) -> gs.Tensor:
    """Clip with 0-d bounds of ``t``'s ``dtype``: float32 (its rounding of the bounds matches
    ``np.clip``) or an integer container (the range marker of a Q/Clip/DQ chain)."""
    bounds = [em.constant("clip_min", np.array(low, dtype)), em.constant("clip_max", np.array(high, dtype))]
    return em.node("Clip", [t, *bounds], dtype=dtype)


def _emit_signed(em: Emitter, t: gs.Tensor, magnitude: gs.Tensor) -> gs.Tensor:
    """``copysign(magnitude, t)`` for ``magnitude >= 0``, keeping the sign of zeros as numpy does.

    ``Sign(t) * magnitude`` would turn ``-0`` into ``+0``, and ONNX Runtime's Where returns
    ``+0`` when it selects a ``-0`` from its first branch, so zeros come from the second
    branch as ``t * 0`` (which is ``copysign(0, t)`` for a finite ``t``).
    """
    negative = em.node("Less", [t, em.constant("round_zero", np.array(0, F32))], dtype=np.bool_)
    signed = em.node("Where", [negative, em.node("Neg", [magnitude]), magnitude])
    non_zero = em.node("Greater", [magnitude, em.constant("zero_magnitude", np.array(0, F32))], dtype=np.bool_)
    return em.node("Where", [non_zero, signed, em.node("Mul", [t, em.constant("signed_zero", np.array(0, F32))])])


def _emit_half_away(em: Emitter, t: gs.Tensor, ties_away: bool) -> gs.Tensor:
    # Same exact construction as semantics._round_half_away: split |t| into whole and
    # fraction (both exact), bump the whole part when the fraction reaches one half.
    magnitude = em.node("Abs", [t])
    whole = em.node("Floor", [magnitude])
    fraction = em.node("Sub", [magnitude, whole])
    compare = "GreaterOrEqual" if ties_away else "Greater"
    reaches_half = em.node(compare, [fraction, em.constant("half", np.array(0.5, F32))], dtype=np.bool_)
    bump = em.node("Cast", [reaches_half], {"to": 1})
    return _emit_signed(em, t, em.node("Add", [whole, bump]))


def _emit_away_or_toward_zero(em: Emitter, t: gs.Tensor, away: bool) -> gs.Tensor:
    # UP is Floor below zero and Ceil elsewhere; DOWN is Floor above zero and Ceil elsewhere.
    # Floor and Ceil keep the sign of zero, and every zero result sits in Where's second
    # branch (see _emit_signed).
    if away:
        negative = em.node("Less", [t, em.constant("round_zero", np.array(0, F32))], dtype=np.bool_)
        return em.node("Where", [negative, em.node("Floor", [t]), em.node("Ceil", [t])])
    positive = em.node("Greater", [t, em.constant("round_zero", np.array(0, F32))], dtype=np.bool_)
    return em.node("Where", [positive, em.node("Floor", [t]), em.node("Ceil", [t])])


def emit_rounding(em: Emitter, t: gs.Tensor, mode: str) -> gs.Tensor:
    """Round ``t`` to integers with a QONNX rounding mode, using standard ops only."""
    if mode in ("ROUND", "HALF_EVEN"):
        return em.node("Round", [t])
    if mode == "FLOOR":
        return em.node("Floor", [t])
    if mode == "CEIL":
        return em.node("Ceil", [t])
    if mode == "UP":
        return _emit_away_or_toward_zero(em, t, away=True)
    if mode == "DOWN":
        return _emit_away_or_toward_zero(em, t, away=False)
    if mode == "HALF_UP":
        return _emit_half_away(em, t, ties_away=True)
    if mode == "HALF_DOWN":
        return _emit_half_away(em, t, ties_away=False)
    raise ValueError(f"unknown rounding mode {mode}")


def emit_dequantize(em: Emitter, q: gs.Tensor, scale: Operand, zero_point: Operand) -> gs.Tensor:
    """``(q - zero_point) * scale`` as the quantizer's final output."""
    if not _is_zero(zero_point):
        q = em.node("Sub", [q, operand(em, "zero_point_out", zero_point)])
    return em.node("Mul", [q, operand(em, "scale_out", scale)], final=True)


def emit_count_at_or_below(em: Emitter, value: gs.Tensor, thresholds: np.ndarray, label: str) -> gs.Tensor:
    """How many of the ascending float32 ``thresholds`` are ``<= value``, per element (int64).

    A binary search in the graph: each step Gathers one threshold per element and keeps the
    larger candidate where ``value`` reaches it (``label`` names its constants). Every step is an exact comparison, and the
    memory per element stays constant whatever the table's length (comparing against the
    whole table at once would need one bool per threshold and element). NaN reaches nothing
    and counts 0. Thresholds are padded with NaN, which no value reaches, up to a power of two.
    """
    levels = max(1, int(len(thresholds)).bit_length())
    padded = np.full(2**levels, np.nan, F32)
    padded[1 : len(thresholds) + 1] = thresholds  # candidate c tests thresholds[c - 1]
    table = em.constant(f"{label}_thresholds", padded)
    count: gs.Tensor = em.constant(f"{label}_start", np.zeros((), np.int64))
    for level in reversed(range(levels)):
        step = em.constant(f"{label}_step_{level}", np.array(2**level, np.int64))
        candidate = em.node("Add", [count, step], dtype=np.int64)
        reached = em.node("GreaterOrEqual", [value, em.node("Gather", [table, candidate])], dtype=np.bool_)
        count = em.node("Where", [reached, candidate, count], dtype=np.int64)
    return count
