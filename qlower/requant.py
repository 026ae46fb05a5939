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
_SINGLE_STEPS = 8  # corrections of the float estimate one point at a time before bisecting


def reference_output(acc: np.ndarray, multiplier: float, offset: float, low: int, high: int) -> np.ndarray:
    """``T``: the real-valued unit's rounding, in float64 (half to even), clipped."""
    return _reference(np.asarray(acc), np.float64(multiplier), np.float64(offset), low, high)


def _reference(acc: np.ndarray, multiplier: np.ndarray, offset: np.ndarray, low: int, high: int) -> np.ndarray:
    """``T`` with ``multiplier``/``offset`` broadcast against ``acc`` (one row per channel)."""
    return np.clip(np.rint(multiplier * acc.astype(np.float64) + offset), low, high).astype(np.int64)


def ort_output(acc: np.ndarray, k: int, bias: int, multiplier: np.float32, low: int, high: int) -> np.ndarray:
    """``F``: ONNX Runtime's requantization of the k-scaled accumulator plus an int32 bias."""
    total = int(k) * np.asarray(acc, np.int64) + int(bias)
    if np.any(total < INT32_MIN) or np.any(total > INT32_MAX):
        raise OverflowError("k * acc + B leaves int32")
    scaled = total.astype(F32) * F32(multiplier)  # float32 conversion, float32 product
    return np.clip(np.rint(scaled), low, high).astype(np.int64)


def checkpoints(acc_low: int, acc_high: int, multiplier: float, offset: float, low: int, high: int) -> np.ndarray:
    """Both ends of ``[acc_low, acc_high]`` and both sides of every step of ``T`` inside it."""
    points, first = _checkpoint_rows(np.array([acc_low], np.int64), np.array([acc_high], np.int64),
                                     np.array([multiplier], np.float64), np.array([offset], np.float64), low, high)
    return points[0][first[0]]


def _checkpoint_rows(acc_low: np.ndarray, acc_high: np.ndarray, multiplier: np.ndarray, offset: np.ndarray,
                     low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`checkpoints` of every channel at once: rows of sorted points [C, 2 + 2 (high - low)]
    and a mask of each value's first occurrence (a row's unused places repeat its ``acc_low``,
    which leaves every maximum, minimum and comparison over the row unchanged)."""
    # Channels with a constant T (M == 0, or one accumulator) have only their ends.
    stepping = ((multiplier != 0) & (acc_low != acc_high))[:, None]
    # Work where T rises: for M < 0 mirror acc (M * acc == (-M) * (-acc) exactly in float).
    sign = np.where(multiplier > 0, 1, -1)[:, None]
    slope = np.where(stepping[:, 0], np.abs(multiplier), 1.0)[:, None]
    offset = offset[:, None]
    lo_mirror = np.where(sign > 0, acc_low[:, None], -acc_high[:, None])
    hi_mirror = np.where(sign > 0, acc_high[:, None], -acc_low[:, None])
    levels = np.arange(low, high, dtype=np.int64)  # T steps from <= n to > n
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        guess = np.floor((levels + 0.5 - offset) / slope)
    guess = np.where(np.isnan(guess), 0.0, guess)  # +-inf clip to the ends below
    last_at_or_below = np.clip(guess, lo_mirror - 1, hi_mirror).astype(np.int64)

    # Correct the float estimate on T itself: the last point with T <= n. The estimate is
    # usually within a point or two, so a few single steps settle it.
    for _ in range(_SINGLE_STEPS):
        too_high = stepping & (last_at_or_below >= lo_mirror) & (_reference(last_at_or_below, slope, offset, low, high) > levels)
        too_low = stepping & (last_at_or_below < hi_mirror) & (_reference(last_at_or_below + 1, slope, offset, low, high) <= levels)
        if not (too_high.any() or too_low.any()):
            break
        last_at_or_below = last_at_or_below - too_high + too_low
    else:
        # It can be far off: where M * acc is negligible against the offset (M = 4.2e-40 at
        # offset 0.5), float64 rounding makes T flat over a range the estimate knows nothing
        # of. T rises with acc, so a bisection over the whole range finds the same point.
        last_at_or_below = _last_at_or_below(lo_mirror, hi_mirror, slope, offset, levels, low, high)
    sides = np.concatenate([last_at_or_below, last_at_or_below + 1], axis=1)
    inside = stepping & (sides >= lo_mirror) & (sides <= hi_mirror)
    sides = np.where(inside, sign * sides, acc_low[:, None])
    points = np.sort(np.concatenate([acc_low[:, None], acc_high[:, None], sides], axis=1), axis=1)
    first = np.ones(points.shape, bool)
    first[:, 1:] = points[:, 1:] != points[:, :-1]
    return points, first


def _last_at_or_below(lo_mirror: np.ndarray, hi_mirror: np.ndarray, slope: np.ndarray, offset: np.ndarray,
                      levels: np.ndarray, low: int, high: int) -> np.ndarray:
    """Per row and level ``n``, the last ``a`` in ``[lo - 1, hi]`` with ``a == lo - 1`` or
    ``T(a) <= n`` (``T`` rising in ``a``): a bisection, at most 65 halvings of an int64 range."""
    below = np.broadcast_to(lo_mirror - 1, (lo_mirror.shape[0], levels.shape[0])).copy()  # meets it
    above = np.broadcast_to(hi_mirror + 1, below.shape).copy()  # past the last that can
    while True:
        open_rows = above - below > 1
        if not open_rows.any():
            return below
        middle = below + (above - below) // 2
        meets = _reference(middle, slope, offset, low, high) <= levels
        below = np.where(open_rows & meets, middle, below)
        above = np.where(open_rows & ~meets, middle, above)


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


def _slope_intervals(points: np.ndarray, below: np.ndarray, above: np.ndarray, k: np.ndarray, b: np.ndarray,
                     sign: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row (its points, target intervals, factor ``k``, bias ``b`` and slope sign), the
    slopes ``s`` (= ``M' * k``) with ``s * (p + B/k)`` inside every target interval, in reals:
    ``(lowest, highest, feasible)``."""
    c = points + (b / k)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        first, second = below / c, above / c
    # below < above, so at c > 0 the bound from below is the smaller quotient, at c < 0 the
    # larger (infinite bounds included; no quotient is 0, the bounds are k +- 1/2).
    low_bound, high_bound = np.minimum(first, second), np.maximum(first, second)
    on_zero = c == 0
    if on_zero.any():  # s * 0 needs 0 inside the target interval; the point bounds no slope
        low_bound[on_zero], high_bound[on_zero] = -np.inf, np.inf
        allowed = ~np.any(on_zero & ~((below < 0) & (above > 0)), axis=1)
    else:
        allowed = True
    lowest = np.maximum(low_bound.max(axis=1), np.where(sign > 0, 0.0, -np.inf))
    highest = np.minimum(high_bound.min(axis=1), np.where(sign < 0, 0.0, np.inf))
    return lowest, highest, allowed & (lowest < highest)


def _candidates(search: _Search, rows: np.ndarray, k: np.ndarray, int32_low: np.ndarray, int32_high: np.ndarray,
                biases: int = 9, first_bias: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, M') pairs to try for channel ``rows[i]`` of the block with factor ``k[i]``, in
    order: biases around the real-feasible window at the true slope, each with a multiplier
    from the middle of the slopes that bias allows. Returned as ``(exists, B, M')``
    [A, 3 * (biases - first_bias)] for biases ``first_bias`` to ``biases - 1`` of the nine: a
    pair's candidates are the columns where ``exists`` (a bias repeating an earlier one,
    skipped ones included, or an unusable multiplier does not exist)."""
    multiplier, d_low, d_high = search.true_multiplier[rows], search.window_low[rows], search.window_high[rows]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        one, two = k * d_low / multiplier, k * d_high / multiplier
    ends = np.minimum(one, two), np.maximum(one, two)
    finite = np.isfinite(ends[0]), np.isfinite(ends[1])
    first = np.where(finite[0], ends[0], np.where(finite[1], ends[1], 0.0))
    last = np.where(finite[1], ends[1], np.where(finite[0], ends[0], 0.0))
    middle = (first + last) / 2
    around = np.stack([np.rint(middle), np.floor(middle), np.ceil(middle), np.floor(first) + 1, np.ceil(last) - 1,
                       np.floor(first), np.ceil(last), np.floor(first) - 1, np.ceil(last) + 1], axis=1)
    b = np.minimum(np.maximum(around[:, :biases], int32_low[:, None]), int32_high[:, None]).astype(np.int64)
    earlier = np.tri(biases, k=-1, dtype=bool)  # [j, i]: bias i comes before bias j
    new = ~np.any((b[:, :, None] == b[:, None, :]) & earlier, axis=2)
    b, new = b[:, first_bias:], new[:, first_bias:]
    sign = np.where(multiplier > 0, 1.0, -1.0)
    # Slope intervals for each new bias only (a repeated bias has no candidates).
    lowest, highest = np.zeros(b.shape), np.zeros(b.shape)
    feasible = np.zeros(b.shape, bool)
    row, slot = np.nonzero(new)
    channel = rows[row]
    lowest[row, slot], highest[row, slot], feasible[row, slot] = _slope_intervals(
        search.points_float[channel], search.below[channel], search.above[channel], k[row], b[row, slot], sign[row])
    true_slope = multiplier[:, None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = np.where(np.isfinite(lowest) & np.isfinite(highest), (lowest + highest) / 2,
                     np.where((lowest < true_slope) & (true_slope < highest), true_slope,
                              np.where(np.isfinite(lowest), lowest * 2, highest / 2)))
        nearest = np.where(feasible, s / k[:, None], true_slope / k[:, None]).astype(F32)
    # Per bias: the nearest multiplier, then (where the slopes allow) one float32 step up and down.
    m = np.stack([nearest, np.nextafter(nearest, F32(np.inf)), np.nextafter(nearest, F32(-np.inf))], axis=2)
    exists = np.stack([new, new & feasible, new & feasible], axis=2)
    exists &= (m != 0) & np.isfinite(m) & (np.sign(m) == sign[:, None, None])
    pairs = len(rows)
    return exists.reshape(pairs, -1), np.repeat(b, 3, axis=1), m.reshape(pairs, -1)


def choose_channel(acc_low: int, acc_high: int, multiplier: float, offset: float, low: int, high: int,
                   k_max: int) -> ChannelChoice:
    """The exact ``(k, B, M')`` for one channel (``missed == 0``), else the least-missing one.

    For each ``k`` from 1 to ``k_max`` (the caller's weight-container limit; it stops where
    ``k * acc`` could leave int32) the candidates are the integer biases around the window
    the true slope allows, each with the middle of the slopes that bias allows (a linear
    program in reals: ``s * (p + B/k)`` inside each target's rounding interval), then
    checked exactly in float32. The first exact choice wins, so ``k`` is the smallest; with
    none exact, the first (smallest ``k``, then candidate order) of those missing fewest.
    """
    k, bias, chosen, missed, checked, worst = _choose_rows(
        np.array([acc_low], np.int64), np.array([acc_high], np.int64), np.array([multiplier], np.float64),
        np.array([offset], np.float64), low, high, np.array([k_max], np.int64))
    return ChannelChoice(int(k[0]), int(bias[0]), chosen[0], int(missed[0]), int(checked[0]), int(worst[0]))


# Channels searched together: their checkpoint rows hold at most this many points in all.
_POINTS_PER_BLOCK = 1 << 15
# Candidates times points held by one numpy round of the search (a few MB per temporary):
# a whole block's 27 candidates, or the first bias's 3 candidates for up to 9 factors.
_CANDIDATE_POINTS = 27 * _POINTS_PER_BLOCK
# Factors k tried in one round, at most: rounds try k = 1, 2-3, 4-7, 8-15, ... (each round
# costs numpy call overhead, each factor past a channel's answer costs work; in the real
# exports most channels are exact at k = 1 to 3).
_FACTORS_PER_ROUND = 8
_NO_CANDIDATE = np.iinfo(np.int64).max  # a pair's fewest misses where it has no candidate


def _choose_rows(acc_low: np.ndarray, acc_high: np.ndarray, multiplier: np.ndarray, offset: np.ndarray,
                 low: int, high: int, k_max: np.ndarray) -> tuple[np.ndarray, ...]:
    """:func:`choose_channel` for every channel, in blocks of channels searched at once with
    numpy, several factors ``k`` per round; each channel keeps the same choice as a search of
    that channel alone, one ``k`` at a time. Returns ``(k, B, M', missed, checked, worst)``."""
    if low > high or np.any(acc_low > acc_high):
        raise ValueError("empty output or accumulator range")
    channels = len(acc_low)
    block = max(1, _POINTS_PER_BLOCK // (2 + 2 * (high - low)))
    parts = [_choose_block(acc_low[s:s + block], acc_high[s:s + block], multiplier[s:s + block],
                           offset[s:s + block], low, high, k_max[s:s + block]) for s in range(0, channels, block)]
    k, bias, chosen, missed, checked, worst = (np.concatenate(column) for column in zip(*parts)) if parts else (
        np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, F32), np.zeros(0, np.int64), np.zeros(0, np.int64),
        np.zeros(0, np.int64))
    return k, bias, chosen, missed, checked, worst


@dataclass
class _Search:
    """One block of channels being searched: their checked points and targets, and the best
    choice found for each so far."""

    acc_low: np.ndarray
    acc_high: np.ndarray
    true_multiplier: np.ndarray
    points: np.ndarray  # [C, P] int64, each row's checked accumulators (repeats allowed)
    first: np.ndarray  # [C, P] bool: a value's first place in its row (what is counted)
    targets: np.ndarray  # [C, P] T at the points
    targets_float32: np.ndarray | None  # the same in float32 where that is exact, else None
    points_float: np.ndarray  # the points in float64
    below: np.ndarray  # [C, P] open interval ORT's float value must fall in for its target
    above: np.ndarray
    window_low: np.ndarray  # [C] the offsets d with M * p + d inside every target interval: (low, high)
    window_high: np.ndarray
    low: int
    high: int
    k: np.ndarray
    bias: np.ndarray
    multiplier: np.ndarray
    missed: np.ndarray
    worst: np.ndarray
    found: np.ndarray  # has a choice (the best so far)
    open: np.ndarray  # still searching: no exact choice yet


def _choose_block(acc_low: np.ndarray, acc_high: np.ndarray, multiplier: np.ndarray, offset: np.ndarray,
                  low: int, high: int, k_max: np.ndarray) -> tuple[np.ndarray, ...]:
    channels = len(acc_low)
    bias = np.zeros(channels, np.int64)
    zero = multiplier == 0  # constant output rint(offset): zero weights, B carries it
    bias[zero] = np.clip(np.rint(offset[zero]), low, high).astype(np.int64)
    points, first = _checkpoint_rows(acc_low, acc_high, multiplier, offset, low, high)
    checked = np.where(zero, 1, first.sum(axis=1))
    targets = _reference(points, multiplier[:, None], offset[:, None], low, high)
    # T is monotone: constant over the whole range (e.g. M ~ 0) when equal at both ends.
    constant = ~zero & (targets[:, 0] == targets[:, -1])
    bias[constant] = targets[constant, 0]
    below, above = _target_bounds(targets, low, high)
    points_float = points.astype(np.float64)
    scaled = multiplier[:, None] * points_float
    # Integers exact in float32: ORT's values are compared with the targets there.
    targets_float32 = targets.astype(F32) if max(abs(low), abs(high)) <= 2**24 else None
    search = _Search(acc_low, acc_high, multiplier, points, first, targets, targets_float32, points_float, below, above,
                     (below - scaled).max(axis=1), (above - scaled).min(axis=1), low, high, np.zeros(channels, np.int64),
                     bias, np.ones(channels, F32), np.zeros(channels, np.int64), np.zeros(channels, np.int64),
                     np.zeros(channels, bool), ~zero & ~constant)
    biggest = np.maximum(np.abs(acc_low), np.abs(acc_high))
    limit = np.maximum(k_max, 1)
    start = 1
    while True:
        rows = np.nonzero(search.open & (start <= limit) & (start * biggest <= INT32_MAX))[0]
        if not rows.size:
            break
        # Factors start, start + 1, ... for every open row at once: doubling, as many as the round holds.
        count = max(1, min(_FACTORS_PER_ROUND, start, _CANDIDATE_POINTS // (3 * rows.size * points.shape[1])))
        pair_row = np.repeat(rows, count)
        pair_k = np.tile(np.arange(start, start + count, dtype=np.int64), rows.size)
        usable = (pair_k <= limit[pair_row]) & (pair_k * biggest[pair_row] <= INT32_MAX)
        _search_factors(search, pair_row[usable], pair_k[usable])
        start += count
    if np.any(~zero & ~constant & ~search.found):  # even k = 1 overflows int32: no integer unit can hold this channel
        raise OverflowError("the accumulator range does not fit int32")
    inexact = np.flatnonzero(search.missed)  # an exact choice is off by 0 everywhere
    values = _misses(search, inexact, search.k[inexact], search.bias[inexact], search.multiplier[inexact])[1]
    search.worst[inexact] = np.abs(values.astype(np.int64) - targets[inexact]).max(axis=1, initial=0)
    return search.k, search.bias, search.multiplier, search.missed, checked, search.worst


def _search_factors(search: _Search, pair_row: np.ndarray, pair_k: np.ndarray) -> None:
    """Try the factors ``pair_k`` on the rows ``pair_row`` (pairs grouped by row, ``k``
    rising), keeping per row what trying them one ``k`` at a time, candidates in order,
    keeps: the first exact candidate, else the first of those missing fewest, if it misses
    fewer than the row's best so far (whose ``k`` is smaller). Closes rows now exact.

    That choice is the first pair with the fewest misses, and per pair its first candidate
    with the fewest. Most channels are exact at their first bias's three candidates, so every
    pair tries those first, and only a pair with no exact one at its ``k`` or a smaller one
    tries the other 24 (a pair past the row's first exact ``k`` cannot be chosen)."""
    s = search
    fewest, bias, multiplier = _try_pairs(s, pair_row, pair_k, biases=1, first_bias=0)
    row_starts = np.concatenate([[True], pair_row[1:] != pair_row[:-1]])
    starts, group = np.flatnonzero(row_starts), np.cumsum(row_starts) - 1  # group: each pair's row, from 0
    exact_so_far = np.cumsum(fewest == 0)
    exact_before_row = (exact_so_far - (fewest == 0))[starts]
    open_pairs = np.flatnonzero(exact_so_far - exact_before_row[group] == 0)
    per_round = max(1, _CANDIDATE_POINTS // (24 * s.points.shape[1]))
    for at in range(0, open_pairs.size, per_round):
        pairs = open_pairs[at:at + per_round]
        rest = _try_pairs(s, pair_row[pairs], pair_k[pairs], biases=9, first_bias=1)
        fewer = rest[0] < fewest[pairs]  # a tie keeps the earlier candidate, of the first bias
        for column, found in zip((fewest, bias, multiplier), rest):
            column[pairs[fewer]] = found[fewer]
    row_fewest = np.minimum.reduceat(fewest, starts)
    at_fewest = np.flatnonzero(fewest == row_fewest[group])
    pick = at_fewest[np.unique(group[at_fewest], return_index=True)[1]]  # each row's first pair at its fewest
    rows, fewest = pair_row[pick], fewest[pick]
    better = (fewest != _NO_CANDIDATE) & (~s.found[rows] | (fewest < s.missed[rows]))
    chosen, pick = rows[better], pick[better]
    s.k[chosen], s.bias[chosen], s.multiplier[chosen] = pair_k[pick], bias[pick], multiplier[pick]
    s.missed[chosen] = fewest[better]
    s.found[chosen] = True
    s.open[chosen[fewest[better] == 0]] = False


def _try_pairs(search: _Search, rows: np.ndarray, factors: np.ndarray, biases: int,
               first_bias: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Try each row's factor with the candidates of biases ``first_bias`` to ``biases - 1``
    (rows may repeat, with different factors). Returns per pair the first candidate missing
    fewest: ``(fewest, B, M')``, ``fewest`` being :data:`_NO_CANDIDATE` where the pair has no
    candidate."""
    s = search
    # k * acc + B inside int32 at both ends of the range (where it is lowest and highest):
    # the biases are clipped into this window, which is never empty for a k the search tries
    # (k * max |acc| <= INT32_MAX makes its width k * (acc_high - acc_low) <= 2^32 - 2).
    int32_low, int32_high = INT32_MIN - factors * s.acc_low[rows], INT32_MAX - factors * s.acc_high[rows]
    if np.any(int32_low > int32_high):
        raise OverflowError("k * acc + B leaves int32")
    exists, b, m = _candidates(s, rows, factors, int32_low.astype(np.float64), int32_high.astype(np.float64), biases,
                               first_bias)
    # The pairs' first candidates, then the others of pairs whose first is not exact (most
    # pairs with an exact candidate have it first): a pair keeps its first candidate
    # missing fewest either way.
    misses = np.full(exists.shape, _NO_CANDIDATE)
    first = np.flatnonzero(exists[:, 0])
    misses[first, 0] = _misses(s, rows[first], factors[first], b[first, 0], m[first, 0])[0]
    later = exists.copy()  # only the candidates that exist (a sixth of the columns), one per row of these arrays
    later[:, 0] = False
    later[misses[:, 0] == 0] = False
    row, column = np.nonzero(later)
    misses[row, column] = _misses(s, rows[row], factors[row], b[row, column], m[row, column])[0]
    pick = np.argmin(misses, axis=1)
    every = np.arange(rows.size)
    return misses[every, pick], b[every, pick], m[every, pick]


def _misses(search: _Search, channel: np.ndarray, k: np.ndarray, bias: np.ndarray,
            multiplier: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate (a channel of the block, its ``k``, ``B`` and ``M'``): how many checked
    accumulators ORT's ``F`` gets wrong, and ``F`` at the channel's points (as float)."""
    s = search
    totals = k[:, None] * s.points[channel] + bias[:, None]
    with np.errstate(over="ignore"):
        values = np.clip(np.rint(totals.astype(F32) * multiplier[:, None]), s.low, s.high)  # F before its int64 cast
    if s.targets_float32 is not None:
        wrong = values != s.targets_float32[channel]
    else:
        wrong = values.astype(np.int64) != s.targets[channel]
    return np.count_nonzero(wrong & s.first[channel], axis=1), values


# ---- a whole unit ---------------------------------------------------------------------


def accumulator_range(weights: np.ndarray, x_low: int, x_high: int) -> tuple[np.ndarray, np.ndarray]:
    """Per channel (rows of ``weights`` [C, K], already ``w - zw``) the accumulator bounds
    when every ``x - zx`` lies in ``[x_low, x_high]`` (widened to hold 0, the padding value)."""
    x_low, x_high = min(int(x_low), 0), max(int(x_high), 0)
    w = np.asarray(weights, np.int64)
    total, positive = w.sum(axis=1), np.maximum(w, 0).sum(axis=1)
    negative = total - positive
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
        return np.asarray(weights, np.int64) * self.k.reshape((-1,) + (1,) * (weights.ndim - 1))

    def describe(self) -> str | None:
        """A report line for channels that are not exact, else None."""
        inexact = int(np.count_nonzero(self.missed))
        if not inexact:
            return None
        return (f"requantization not exact on {inexact} of {self.missed.size} channels "
                f"({int(self.missed.sum())} of {int(self.checked.sum())} checked accumulators differ by one step or more)")


def weight_factor_limit(weights: np.ndarray, low: int, high: int) -> int:
    """The largest ``k`` with ``k * w`` inside ``[low, high]`` for every weight of a channel."""
    return int(_weight_factor_limits(np.asarray(weights).reshape(1, -1), low, high)[0])


def _weight_factor_limits(weights: np.ndarray, low: int, high: int) -> np.ndarray:
    """:func:`weight_factor_limit` of each row of ``weights`` [C, K]."""
    w = np.asarray(weights, np.int64)
    largest, smallest = w.max(axis=1), w.min(axis=1)
    unbounded = np.iinfo(np.int64).max
    by_high = np.where(largest > 0, high // np.maximum(largest, 1), unbounded)
    by_low = np.where(smallest < 0, (-low) // np.maximum(-smallest, 1), unbounded)
    limit = np.minimum(by_high, by_low)
    return np.where(limit == unbounded, 1, np.maximum(1, limit))


def choose_unit(weights: np.ndarray, x_low: int, x_high: int, multiplier: np.ndarray, offset: np.ndarray,
                low: int, high: int, weight_low: int = -128, weight_high: int = 127) -> UnitChoice:
    """:func:`choose_channel` for each row of ``weights`` [C, K] (``w - zw``, any integer type).

    ``weight_low``/``weight_high`` bound ``k * w`` (int8 by default); a channel whose own
    weights exceed them keeps ``k = 1`` and the caller stores a wider container.
    """
    acc_low, acc_high = accumulator_range(weights, x_low, x_high)
    # A channel of zero weights has acc always 0: any k, the constant comes from B; its limit is 1.
    k_max = _weight_factor_limits(weights, weight_low, weight_high)
    k, bias, chosen, missed, checked, worst = _choose_rows(
        acc_low, acc_high, np.asarray(multiplier, np.float64).reshape(-1), np.asarray(offset, np.float64).reshape(-1),
        low, high, k_max)
    return UnitChoice(k, np.array(bias.tolist(), np.int32), chosen, missed, checked, worst)
