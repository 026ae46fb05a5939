"""Trunc's powers of two computed in the graph when their inputs are known only at run time.

Trunc v2 snaps ``r = out_scale / scale`` to ``k = 2^round(log2(r))`` with numpy's float32
``log2``, ``round`` (half to even) and ``exp2``; no ONNX op computes those bit for bit
(numpy's ``exp2(127)`` is one ulp above 2^127 on an AVX-512 machine, and its ``log2``
differs from ``sqrt(2) * 2^n`` as a rounding boundary by up to hundreds of ulps). But
``k(r)`` is a monotone step function of ``r``: measured over every non-negative float32
(numpy 2.4.6, AVX-512; ``tests/test_runtime_lowerings.py`` keeps the exhaustive check as a
slow test), it has 278 steps, from ``k(0) = 0`` through ``2^-149 .. 2^127`` to ``inf``. So
the step points are found here, at conversion time, by a binary search over float32 bit
patterns that calls ``semantics.trunc_power_of_two`` itself, and each one is checked
against the same function on the ``CHECKED_NEIGHBOURS`` floats either side of it. In the
graph::

    k = Where(r >= 0, Gather(values, #{thresholds <= r}), NaN)

which is exact: comparisons and table reads only. ``r`` NaN or negative has a NaN
``log2``, so ``k`` is NaN; ``r = -0`` has ``log2 = -inf`` and ``k = 0``, as ``+0``.

Trunc v1 divides by ``exp2(in_bits - out_bits)``: for a whole difference the graph reads
the value numpy's ``exp2`` gives from a table (exact), for a non-whole one (non-integer
bit widths, legal QONNX) it uses ``Pow(2, d)``, which differs from numpy's ``exp2`` in
the last bit for about a fifth of arguments (measured on 10^7 random ``d``): that case
alone is not exact.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from .. import semantics
from ..errors import UnsupportedError
from .base import Emitter
from .float_ops import emit_count_at_or_below
from .input_quantizer_thresholds import smallest_reaching

F32 = np.float32
CHECKED_NEIGHBOURS = 256  # floats on each side of every step point compared with the semantics
_LARGEST_EXPONENT = 128  # round(log2(r)) of the largest float32 ratios (exp2 gives inf)
_SMALLEST_EXPONENT = -149  # round(log2(r)) of the smallest positive float32 ratio
_SHIFT_RANGE = (-151, 129)  # whole exponents past which exp2 is 0 or inf whatever the value


def _snap(ratios: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return semantics.trunc_power_of_two(np.ones((), F32), ratios)


def _as_float(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits, np.uint32).view(F32)


@functools.lru_cache(maxsize=1)
def ratio_table() -> tuple[np.ndarray, np.ndarray]:
    """``(thresholds, values)``: ``k(r) = values[#{thresholds <= r}]`` for every ``r >= 0``.

    Raises UnsupportedError if the numpy running here does not give a monotone step
    function around a step point (the lowering would not be exact on this machine).
    """
    with np.errstate(over="ignore"):  # 2^128 is inf in float32, as k is for the largest ratios
        targets = _snap(np.ldexp(F32(1), np.arange(_SMALLEST_EXPONENT, _LARGEST_EXPONENT + 1)).astype(F32))
    # k(+0) = 0 is below every target and k(inf) = inf reaches all
    thresholds = smallest_reaching(_snap, targets, start=0.0)
    values = np.concatenate([_snap(np.zeros(1, F32)), _snap(thresholds)]).astype(F32)
    _check_steps(thresholds.view(np.uint32).astype(np.int64), thresholds, values)
    return thresholds, values


def _check_steps(bits: np.ndarray, thresholds: np.ndarray, values: np.ndarray) -> None:
    offsets = np.arange(-CHECKED_NEIGHBOURS, CHECKED_NEIGHBOURS + 1)
    around = np.clip(bits[:, None] + offsets[None, :], 0, np.float32(np.inf).view(np.uint32)).reshape(-1)
    ratios = _as_float(around)
    expected = _snap(ratios)
    table = values[np.searchsorted(thresholds, ratios, side="right")]
    if not (np.all(np.diff(values) > 0) and np.array_equal(expected.view(np.uint32), table.view(np.uint32))):
        raise UnsupportedError("numpy's float32 log2 on this machine is not a monotone step function near Trunc's rounding points")


def emit_ratio_power_of_two(em: Emitter, ratio: gs.Tensor) -> gs.Tensor:
    """``semantics.trunc_power_of_two`` of a run-time ratio, bit for bit (see the module docstring)."""
    thresholds, values = ratio_table()
    count = emit_count_at_or_below(em, ratio, thresholds, "trunc_ratio")
    snapped = em.node("Gather", [em.constant("trunc_ratio_values", values), count])
    defined = em.node("GreaterOrEqual", [ratio, em.constant("trunc_ratio_zero", np.zeros((), F32))], dtype=np.bool_)
    return em.node("Where", [defined, snapped, em.constant("trunc_ratio_nan", np.array(np.nan, F32))])


def emit_shift(em: Emitter, difference: gs.Tensor) -> gs.Tensor:
    """``exp2(d)`` as numpy computes it for a whole ``d`` (from a table), else ``Pow(2, d)``."""
    low, high = _SHIFT_RANGE
    with np.errstate(all="ignore"):
        table = np.exp2(np.arange(low, high + 1).astype(F32)).astype(F32)
    whole = em.node("Equal", [em.node("Floor", [difference]), difference], dtype=np.bool_)  # false for NaN
    clipped = em.node("Clip", [difference, em.constant("shift_min", np.array(low, F32)), em.constant("shift_max", np.array(high, F32))])
    offset = em.node("Sub", [clipped, em.constant("shift_offset", np.array(low, F32))])
    # A NaN difference would Cast to no valid index; it reads entry 0 and takes Pow's NaN.
    index = em.node("Cast", [em.node("Where", [whole, offset, em.constant("shift_fallback", np.zeros((), F32))])], {"to": TensorProto.INT64}, dtype=np.int64)
    exact = em.node("Gather", [em.constant("shift_values", table), index])
    power = em.node("Pow", [em.constant("shift_two", np.array(2, F32)), difference])
    return em.node("Where", [whole, exact, power])
