"""Exact requantization: integers and a float32 multiplier that make ONNX Runtime round
every reachable accumulator the way the real-valued unit rounds it.

**What the unit means.** Per output channel ``c`` a quantized compute unit (Conv, MatMul,
Gemm, with a folded bias and constant affine after it) maps its exact integer accumulator
``acc = sum (x - zx) * w`` to the integer output (relative to the output zero point)

    T(acc) = clip(round_half_even(M * acc + C), low, high)

with ``M = s_x * s_w[c] * a[c] / s_y`` (``a`` the folded affine multiplier) and ``C`` the
real offset (bias and affine offset) in output steps. ``T`` is evaluated in float64 from
the model's float32 parameters: the real-valued unit up to float64 rounding, which only
matters for values within ~1e-13 of a rounding tie.

**What ONNX Runtime computes.** QLinearConv with ``x_scale = y_scale = 1`` uses the
multiplier ``1 * w_scale[c] / 1 == w_scale[c]`` exactly (qlinearconv.cc: ``X_scale *
W_scale[i] / Y_scale`` in float32); MLAS then requantizes ``float32(acc' + B) * M'`` in
float32, rounds half to even, adds the zero point and saturates. MatMulInteger -> Add ->
Cast -> Mul -> QuantizeLinear(scale 1) computes the same expression op by op. With the
weights multiplied by an integer ``k`` (``acc' = k * acc``) the emitted unit computes

    F(acc) = clip(rint(float32(float32(k * acc + B) * M')), low, high)

where ``k * acc + B`` is exact int32 arithmetic, and ``low``/``high`` are the output
container's saturation or the Clip emitted after the operator. :func:`ort_output` is
exactly this; tests check it against ONNX Runtime's kernels.

**The contract.** :func:`choose_channel` returns ``(k, B, M')`` with ``k * w`` inside the
weight container, ``k * acc + B`` inside int32 for every reachable ``acc``, and
``F(acc) == T(acc)`` for every integer ``acc`` in ``[acc_low, acc_high]`` whenever its
``missed`` count is 0. Where no choice within the containers is exact, it returns the one
that misses the fewest checked accumulators (reported per unit by the passes).

**Why checking O(2^bits) points suffices.** ``T`` and ``F`` are monotone in ``acc`` in the
same direction (sign of ``M`` = sign of ``M'``, ``k > 0``): an int32 affine map with
positive slope, int->float32 conversion (round to nearest), multiplication by ``M'``, and
rounding and clipping are all monotone. The checked set holds both ends of the range and,
for every output value ``n`` in ``[low, high)``, both integers around the place where ``T``
steps past ``n`` (found exactly on ``T`` itself, not estimated). Take any ``acc`` and its
nearest checked neighbours ``p <= acc <= q``. ``T`` does not step between ``p`` and ``q``
(both sides of every step are checked points, so a step inside would put a checked point
inside), so ``T(p) == T(acc) == T(q)``; ``F(p) == T(p)`` and ``F(q) == T(q)`` by the check,
and ``F`` is monotone, so ``F(acc)`` lies between equal values: ``F(acc) == T(acc)``.

**Zero and negative multipliers.** ``M == 0`` (a zero BatchNorm gamma), or any channel
whose ``T`` is constant over its accumulator range: the channel's integer weights become 0
(``k = 0``), ``B = T`` and ``M' = 1``, exact. ``M < 0``: ``M'`` is
negative; ONNX Runtime's QLinearConv accepts a negative per-channel weight scale and its
requantization is the same formula (tests run it), so the integer weights are not flipped
(flipping cannot hold -128 in int8).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

F32 = np.float32
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def reference_output(acc: np.ndarray, multiplier: float, offset: float, low: int, high: int) -> np.ndarray:
    """``T``: the real-valued unit's rounding, in float64 (half to even), clipped."""
    return np.clip(np.rint(float(multiplier) * np.asarray(acc, np.float64) + float(offset)), low, high).astype(np.int64)


def ort_output(acc: np.ndarray, k: int, bias: int, multiplier: np.float32, low: int, high: int) -> np.ndarray:
    """``F``: ONNX Runtime's requantization of the k-scaled accumulator plus an int32 bias."""
    total = int(k) * np.asarray(acc, np.int64) + int(bias)
    if np.any(total < INT32_MIN) or np.any(total > INT32_MAX):
        raise OverflowError("k * acc + B leaves int32")
    scaled = total.astype(F32) * F32(multiplier)  # float32 conversion, float32 product
    return np.clip(np.rint(scaled), low, high).astype(np.int64)


def checkpoints(acc_low: int, acc_high: int, multiplier: float, offset: float, low: int, high: int) -> np.ndarray:
    """Both ends of ``[acc_low, acc_high]`` and both sides of every step of ``T`` inside it."""
    ends = np.array([acc_low, acc_high], np.int64)
    if multiplier == 0 or acc_low == acc_high:
        return np.unique(ends)
    # Work where T rises: for M < 0 mirror acc (M * acc == (-M) * (-acc) exactly in float).
    sign = 1 if multiplier > 0 else -1
    slope = abs(float(multiplier))
    lo_mirror, hi_mirror = (acc_low, acc_high) if sign > 0 else (-acc_high, -acc_low)
    levels = np.arange(low, high, dtype=np.int64)  # T steps from <= n to > n
    guess = np.floor((levels + 0.5 - float(offset)) / slope)
    last_at_or_below = np.clip(np.nan_to_num(guess, posinf=hi_mirror, neginf=lo_mirror - 1), lo_mirror - 1, hi_mirror).astype(np.int64)

    def t(points: np.ndarray) -> np.ndarray:
        return reference_output(points, slope, offset, low, high)

    # Correct the float estimate on T itself: the last point with T <= n.
    for _ in range(64):
        too_high = (last_at_or_below >= lo_mirror) & (t(last_at_or_below) > levels)
        too_low = (last_at_or_below < hi_mirror) & (t(last_at_or_below + 1) <= levels)
        if not (too_high.any() or too_low.any()):
            break
        last_at_or_below = last_at_or_below - too_high + too_low
    else:  # pragma: no cover - a float64 estimate is never 64 points off
        raise AssertionError("step search did not converge")
    sides = np.concatenate([last_at_or_below, last_at_or_below + 1])
    sides = sides[(sides >= lo_mirror) & (sides <= hi_mirror)]
    return np.unique(np.concatenate([ends, sign * sides]))


@dataclass(frozen=True)
class ChannelChoice:
    """What one output channel feeds ONNX Runtime: weights times ``k``, bias, multiplier."""

    k: int
    bias: int
    multiplier: np.float32
    missed: int  # checked accumulators where ORT's result differs from T (0: exact)
    checked: int
    worst: int = 0  # the largest difference there, in output steps


def _target_bounds(targets: np.ndarray, low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
    """Open intervals ORT's float value must fall in to round (and clip) to each target."""
    below = np.where(targets == low, -np.inf, targets - 0.5)
    above = np.where(targets == high, np.inf, targets + 0.5)
    return below, above


def _slope_interval(points: np.ndarray, below: np.ndarray, above: np.ndarray, k: int, b: int,
                    sign: float) -> tuple[float, float] | None:
    """Slopes ``s`` (= ``M' * k``) with ``s * (p + B/k)`` inside every target interval, in reals."""
    c = points.astype(np.float64) + b / k
    with np.errstate(divide="ignore", invalid="ignore"):
        first, second = below / c, above / c
    lower = np.where(c > 0, first, second)
    upper = np.where(c > 0, second, first)
    on_zero = c == 0
    if np.any(on_zero & ~((below < 0) & (above > 0))):
        return None
    lowest = max(float(np.max(lower[~on_zero], initial=-np.inf)), 0.0 if sign > 0 else -np.inf)
    highest = min(float(np.min(upper[~on_zero], initial=np.inf)), 0.0 if sign < 0 else np.inf)
    return (lowest, highest) if lowest < highest else None


def _candidates(points: np.ndarray, below: np.ndarray, above: np.ndarray, multiplier: float, k: int,
                int32_range: tuple[int, int]) -> list[tuple[int, np.float32]]:
    """(B, M') pairs to try for one ``k``: biases around the real-feasible window at the true
    slope, each with a multiplier from the middle of the slopes that bias allows."""
    scaled = multiplier * points.astype(np.float64)
    d_low, d_high = float(np.max(below - scaled)), float(np.min(above - scaled))
    ends = sorted((k * d_low / multiplier, k * d_high / multiplier))
    finite = [e for e in ends if np.isfinite(e)]
    if not finite:
        finite = [0.0]
    first, last = (ends[0] if np.isfinite(ends[0]) else finite[-1]), (ends[1] if np.isfinite(ends[1]) else finite[0])
    middle = (first + last) / 2
    biases = [np.rint(middle), np.floor(middle), np.ceil(middle), np.floor(first) + 1, np.ceil(last) - 1,
              np.floor(first), np.ceil(last), np.floor(first) - 1, np.ceil(last) + 1]
    sign = 1.0 if multiplier > 0 else -1.0
    found: list[tuple[int, np.float32]] = []
    seen: set[int] = set()
    for value in biases:
        b = int(min(max(value, int32_range[0]), int32_range[1]))
        if b in seen:
            continue
        seen.add(b)
        slopes = _slope_interval(points, below, above, k, b, sign)
        if slopes is None:
            found.append((b, F32(multiplier / k)))
            continue
        lowest, highest = slopes
        s = (lowest + highest) / 2 if np.isfinite(lowest) and np.isfinite(highest) else (
            multiplier if lowest < multiplier < highest else (lowest * 2 if np.isfinite(lowest) else highest / 2))
        nearest = F32(s / k)
        found += [(b, nearest), (b, np.nextafter(nearest, F32(np.inf))), (b, np.nextafter(nearest, F32(-np.inf)))]
    return [(b, m) for b, m in found if m != 0 and np.isfinite(m) and np.sign(m) == sign]


def choose_channel(acc_low: int, acc_high: int, multiplier: float, offset: float, low: int, high: int,
                   k_max: int) -> ChannelChoice:
    """The exact ``(k, B, M')`` for one channel (``missed == 0``), else the least-missing one.

    For each ``k`` from 1 to ``k_max`` (the caller's weight-container limit; it stops where
    ``k * acc`` could leave int32) the candidates are the integer biases around the window
    the true slope allows, each with the middle of the slopes that bias allows (a linear
    program in reals: ``s * (p + B/k)`` inside each target's rounding interval), then
    checked exactly in float32. The first exact choice wins, so ``k`` is the smallest.
    """
    if low > high or acc_low > acc_high:
        raise ValueError("empty output or accumulator range")
    if multiplier == 0:
        constant = int(np.clip(np.rint(offset), low, high))
        return ChannelChoice(0, constant, F32(1.0), 0, 1)
    points = checkpoints(acc_low, acc_high, multiplier, offset, low, high)
    targets = reference_output(points, multiplier, offset, low, high)
    if targets[0] == targets[-1]:  # T is monotone: constant over the whole range (e.g. M ~ 0)
        return ChannelChoice(0, int(targets[0]), F32(1.0), 0, len(points))
    below, above = _target_bounds(targets, low, high)
    biggest = max(abs(acc_low), abs(acc_high))
    best: ChannelChoice | None = None
    for k in range(1, max(k_max, 1) + 1):
        if k * biggest > INT32_MAX:
            break
        int32_range = (INT32_MIN - k * acc_low, INT32_MAX - k * acc_high)
        for b, m in _candidates(points, below, above, multiplier, k, int32_range):
            errors = np.abs(ort_output(points, k, b, m, low, high) - targets)
            missed = int(np.count_nonzero(errors))
            if best is None or missed < best.missed:
                best = ChannelChoice(k, b, m, missed, len(points), int(errors.max()))
                if missed == 0:
                    return best
    if best is None:  # even k = 1 overflows int32: no integer unit can hold this channel
        raise OverflowError("the accumulator range does not fit int32")
    return best


# ---- a whole unit ---------------------------------------------------------------------


def accumulator_range(weights: np.ndarray, x_low: int, x_high: int) -> tuple[np.ndarray, np.ndarray]:
    """Per channel (rows of ``weights`` [C, K], already ``w - zw``) the accumulator bounds
    when every ``x - zx`` lies in ``[x_low, x_high]`` (widened to hold 0, the padding value)."""
    x_low, x_high = min(int(x_low), 0), max(int(x_high), 0)
    w = weights.astype(np.int64)
    positive, negative = np.where(w > 0, w, 0).sum(axis=1), np.where(w < 0, w, 0).sum(axis=1)
    return positive * x_low + negative * x_high, positive * x_high + negative * x_low


@dataclass
class UnitChoice:
    """Per output channel: the multiplied integer weights' factor, int32 bias, float32 multiplier."""

    k: np.ndarray  # int64 [C]
    bias: np.ndarray  # int32 [C]
    multiplier: np.ndarray  # float32 [C]
    missed: np.ndarray  # int64 [C]
    checked: np.ndarray  # int64 [C]
    worst: np.ndarray  # int64 [C]: largest difference at a checked accumulator, in output steps

    def scaled_weights(self, weights: np.ndarray) -> np.ndarray:
        """``k[c] * w[c]`` for weights [C, ...] (``w - zw``), as int64."""
        return weights.astype(np.int64) * self.k.reshape((-1,) + (1,) * (weights.ndim - 1))

    def describe(self) -> str | None:
        """A report line for channels that are not exact, else None."""
        inexact = int(np.count_nonzero(self.missed))
        if not inexact:
            return None
        return (f"requantization not exact on {inexact} of {self.missed.size} channels "
                f"({int(self.missed.sum())} of {int(self.checked.sum())} checked accumulators differ by one step or more)")


def weight_factor_limit(weights: np.ndarray, low: int, high: int) -> int:
    """The largest ``k`` with ``k * w`` inside ``[low, high]`` for every weight of a channel."""
    w = weights.astype(np.int64)
    limits = [high // int(w.max())] if w.max() > 0 else []
    limits += [(-low) // int(-w.min())] if w.min() < 0 else []
    return max(1, min(limits)) if limits else 1


def choose_unit(weights: np.ndarray, x_low: int, x_high: int, multiplier: np.ndarray, offset: np.ndarray,
                low: int, high: int, weight_low: int = -128, weight_high: int = 127) -> UnitChoice:
    """:func:`choose_channel` for each row of ``weights`` [C, K] (``w - zw``, any integer type).

    ``weight_low``/``weight_high`` bound ``k * w`` (int8 by default); a channel whose own
    weights exceed them keeps ``k = 1`` and the caller stores a wider container.
    """
    acc_low, acc_high = accumulator_range(weights, x_low, x_high)
    choices = []
    for c in range(weights.shape[0]):
        k_max = weight_factor_limit(weights[c], weight_low, weight_high)
        if not np.any(weights[c]):  # acc is always 0: any k, the constant comes from B
            k_max = 1
        choices.append(choose_channel(int(acc_low[c]), int(acc_high[c]), float(multiplier[c]), float(offset[c]),
                                      low, high, k_max))
    return UnitChoice(
        np.array([ch.k for ch in choices], np.int64),
        np.array([ch.bias for ch in choices], np.int32),
        np.array([ch.multiplier for ch in choices], F32),
        np.array([ch.missed for ch in choices], np.int64),
        np.array([ch.checked for ch in choices], np.int64),
        np.array([ch.worst for ch in choices], np.int64),
    )
