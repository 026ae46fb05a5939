"""The exact requantization search (qlower/requant.py): brute force over every accumulator,
and ONNX Runtime's kernels against the module's model of them."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qlower import requant
from qlower.requant import (
    INT32_MAX,
    ChannelChoice,
    accumulator_range,
    checkpoints,
    choose_channel,
    choose_unit,
    ort_output,
    reference_output,
    weight_factor_limit,
)

OUTPUT_RANGES = [(-128, 127), (0, 255), (0, 15), (-8, 7), (0, 127), (-1, 1)]


@st.composite
def channels(draw: st.DrawFn) -> tuple[int, int, float, float, int, int, int]:
    acc_low = draw(st.integers(-3000, 100))
    acc_high = draw(st.integers(acc_low, acc_low + 5000))
    sign = draw(st.sampled_from([1.0, 1.0, -1.0, 0.0]))
    # Tiny multipliers at half-integer offsets make T flat where the float estimate of its
    # steps says it steps (float64 absorbs M * acc into the offset).
    magnitude = draw(st.one_of(st.floats(1e-4, 0.6), st.floats(1e-45, 1e-12)))
    offset = draw(st.one_of(st.floats(-300.0, 300.0), st.integers(-300, 300).map(lambda i: i + 0.5)))
    low, high = draw(st.sampled_from(OUTPUT_RANGES))
    k_max = draw(st.integers(1, 20))
    return acc_low, acc_high, sign * magnitude, offset, low, high, k_max


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(channels())
def test_an_exact_choice_is_exact_on_every_accumulator(channel: tuple[int, int, float, float, int, int, int]) -> None:
    acc_low, acc_high, multiplier, offset, low, high, k_max = channel
    choice = choose_channel(acc_low, acc_high, multiplier, offset, low, high, k_max)
    every = np.arange(acc_low, acc_high + 1)
    expected = reference_output(every, multiplier, offset, low, high)
    got = ort_output(every, choice.k, choice.bias, choice.multiplier, low, high)
    assert choice.k <= max(k_max, 1)
    if choice.missed == 0:
        np.testing.assert_array_equal(got, expected)
    else:  # the checked points are a subset: the misses there are real misses
        assert np.count_nonzero(got != expected) >= choice.missed
    if multiplier == 0:
        assert choice.k == 0 and choice.missed == 0
    elif multiplier < 0 and choice.k > 0:
        assert choice.multiplier < 0  # a negative scale, weights not flipped


@settings(max_examples=200, deadline=None)
@given(channels())
def test_checkpoints_hold_every_step_of_the_reference(channel: tuple[int, int, float, float, int, int, int]) -> None:
    acc_low, acc_high, multiplier, offset, low, high, _ = channel
    points = set(checkpoints(acc_low, acc_high, multiplier, offset, low, high).tolist())
    every = np.arange(acc_low, acc_high + 1)
    values = reference_output(every, multiplier, offset, low, high)
    steps = np.nonzero(np.diff(values))[0]
    assert {acc_low, acc_high} <= points
    for i in steps:
        assert int(every[i]) in points and int(every[i + 1]) in points
    assert len(points) <= 2 * (high - low) + 2


@pytest.mark.parametrize("multiplier", [4.20000666e-40, -4.20000666e-40, 1e-30, 2.0**-60])
def test_checkpoints_where_the_offset_absorbs_the_product(multiplier: float) -> None:
    """A generated qop unit (M = 4.2e-40, offset 0.5, accumulators -1323..1197) crashed the
    step search: rint(0.5 + M * acc) is 0 everywhere, the float estimate put its step at 0,
    and single-point corrections could not walk 1,197 points."""
    acc_low, acc_high, offset, low, high = -1323, 1197, 0.5, 0, 15
    every = np.arange(acc_low, acc_high + 1)
    values = reference_output(every, multiplier, offset, low, high)
    points = set(checkpoints(acc_low, acc_high, multiplier, offset, low, high).tolist())
    assert {acc_low, acc_high} <= points
    for i in np.nonzero(np.diff(values))[0]:
        assert int(every[i]) in points and int(every[i + 1]) in points
    choice = choose_channel(acc_low, acc_high, multiplier, offset, low, high, 8)
    got = ort_output(every, choice.k, choice.bias, choice.multiplier, low, high)
    if len(np.unique(values)) == 1:  # a flat T is a constant channel: exact
        assert choice.missed == 0
    if choice.missed == 0:
        np.testing.assert_array_equal(got, values)
    else:  # the checked points are a subset: the misses there are real misses
        assert np.count_nonzero(got != values) >= choice.missed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.integers(1, 24), st.sampled_from(OUTPUT_RANGES))
def test_channels_searched_together_choose_what_each_alone_chooses(seed: int, channels: int, output: tuple[int, int]) -> None:
    """choose_unit searches a block of channels at once with numpy: every channel must get
    exactly the choice its own search gets (no channel's progress steers another's)."""
    rng = np.random.default_rng(seed)
    weights = rng.integers(-8, 8, (channels, 6)) * rng.integers(0, 2, (channels, 1))
    multiplier = rng.uniform(-0.3, 0.3, channels) * rng.choice([1.0, 0.0, 1e-4], channels)
    offset = rng.uniform(-40, 40, channels)
    low, high = output
    unit = choose_unit(weights, 0, 15, multiplier, offset, low, high)
    acc_low, acc_high = accumulator_range(weights, 0, 15)
    for c in range(channels):
        k_max = weight_factor_limit(weights[c], -128, 127) if np.any(weights[c]) else 1
        alone = choose_channel(int(acc_low[c]), int(acc_high[c]), float(multiplier[c]), float(offset[c]), low, high, k_max)
        assert (unit.k[c], unit.bias[c], unit.missed[c], unit.checked[c], unit.worst[c]) == (
            alone.k, alone.bias, alone.missed, alone.checked, alone.worst)
        assert unit.multiplier[c].tobytes() == np.float32(alone.multiplier).tobytes()


def test_the_search_beats_the_naive_fold() -> None:
    """Typical BatchNorm-folded channels: rounding the offset to the accumulator grid (k = 1,
    M' = M) misses steps that a small k and a chosen B and M' hit."""
    rng = np.random.default_rng(0)
    exact_naive = exact_searched = 0
    for _ in range(200):
        multiplier = float(rng.uniform(0.002, 0.17))
        offset = float(rng.uniform(-50, 50))
        every = np.arange(-2000, 2001)
        expected = reference_output(every, multiplier, offset, 0, 15)
        naive = ort_output(every, 1, int(np.rint(offset / np.float32(multiplier))), np.float32(multiplier), 0, 15)
        exact_naive += np.array_equal(naive, expected)
        exact_searched += choose_channel(-2000, 2000, multiplier, offset, 0, 15, 16).missed == 0
    assert exact_searched == 200 and exact_naive < 150


def test_float32_conversion_of_large_accumulators_is_modelled() -> None:
    """k * acc + B beyond 2^24 is not exact in float32; the choice still holds everywhere."""
    acc_low, acc_high = -40_000, 40_000
    choice = choose_channel(acc_low, acc_high, 3e-3, 2.0e5 * 3e-3, -128, 127, 127)
    every = np.arange(acc_low, acc_high + 1)
    expected = reference_output(every, 3e-3, 2.0e5 * 3e-3, -128, 127)
    assert choice.missed == 0
    np.testing.assert_array_equal(ort_output(every, choice.k, choice.bias, choice.multiplier, -128, 127), expected)


def test_impossible_channels_report_the_fewest_misses() -> None:
    """A multiplier whose steps need more resolution than any k gives: the least-bad choice."""
    choice = choose_channel(0, 3, 0.5, 0.5, 0, 255, 1)  # T = rint(0.5 a + 0.5): ties at every a
    every = np.arange(0, 4)
    got = ort_output(every, choice.k, choice.bias, choice.multiplier, 0, 255)
    assert choice.missed == np.count_nonzero(got != reference_output(every, 0.5, 0.5, 0, 255))


def test_int32_overflow_limits_k() -> None:
    choice = choose_channel(-(2**30), 2**30, 1e-7, 0.0, -128, 127, 10)
    assert choice.k == 1
    with pytest.raises(OverflowError):
        choose_channel(-(2**31) - 5, 0, 1e-7, 0.0, -128, 127, 10)
    assert 2 * 2**30 > INT32_MAX


def test_accumulator_range_and_weight_limits() -> None:
    weights = np.array([[3, -2, 0], [0, 0, 0]])
    low, high = accumulator_range(weights, -128, 127)
    assert low.tolist() == [3 * -128 + -2 * 127, 0] and high.tolist() == [3 * 127 + -2 * -128, 0]
    low, high = accumulator_range(weights, 1, 15)  # widened to 0: padding contributes 0
    assert low.tolist() == [-30, 0] and high.tolist() == [45, 0]
    assert weight_factor_limit(np.array([-64, 10]), -128, 127) == 2
    assert weight_factor_limit(np.array([-3, 42]), -128, 127) == 3
    assert weight_factor_limit(np.array([200]), -128, 127) == 1  # already too wide: the caller widens


def test_choose_unit_zero_channel_and_describe() -> None:
    weights = np.array([[1, -1, 2], [0, 0, 0], [5, 5, -5]])
    choice = choose_unit(weights, 0, 15, np.array([0.1, 0.2, 0.0]), np.array([0.3, 4.2, -2.0]), 0, 15)
    assert choice.k[2] == 0 and choice.bias[2] == 0  # zero multiplier: constant rint(-2) clipped to 0
    assert ort_output(np.zeros(1), choice.k[1], choice.bias[1], choice.multiplier[1], 0, 15)[0] == 4  # B carries it
    assert choice.describe() is None
    assert np.array_equal(choice.scaled_weights(weights)[2], [0, 0, 0])


# ---- ONNX Runtime against the model of it --------------------------------------------


def _qlinearconv(weights: np.ndarray, multiplier: np.ndarray, bias: np.ndarray, x_zero_point: int,
                 y_zero_point: int) -> onnx.ModelProto:
    """1x1 QLinearConv over [C_in] channels with x_scale = y_scale = 1."""
    c_out, c_in = weights.shape
    inits = [
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(x_zero_point, np.uint8), "xzp"),
        numpy_helper.from_array(weights.astype(np.int8).reshape(c_out, c_in, 1, 1), "w"),
        numpy_helper.from_array(multiplier.astype(np.float32), "ws"),
        numpy_helper.from_array(np.zeros(c_out, np.int8), "wzp"),
        numpy_helper.from_array(np.array(y_zero_point, np.uint8), "yzp"),
        numpy_helper.from_array(bias.astype(np.int32), "b"),
    ]
    node = helper.make_node("QLinearConv", ["x", "one", "xzp", "w", "ws", "wzp", "one", "yzp", "b"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, c_in, None, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _matmul_integer_chain(weights: np.ndarray, multiplier: np.ndarray, bias: np.ndarray, x_zero_point: int,
                          y_zero_point: int) -> onnx.ModelProto:
    c_out, c_in = weights.shape
    inits = [
        numpy_helper.from_array(weights.T.astype(np.int8).copy(), "w"),
        numpy_helper.from_array(np.array(x_zero_point, np.uint8), "xzp"),
        numpy_helper.from_array(np.array(0, np.int8), "wzp"),
        numpy_helper.from_array(bias.astype(np.int32), "b"),
        numpy_helper.from_array(multiplier.astype(np.float32), "m"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(y_zero_point, np.uint8), "yzp"),
    ]
    nodes = [
        helper.make_node("MatMulInteger", ["x", "w", "xzp", "wzp"], ["acc"]),
        helper.make_node("Add", ["acc", "b"], ["total"]),
        helper.make_node("Cast", ["total"], ["real"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["real", "m"], ["scaled"]),
        helper.make_node("QuantizeLinear", ["scaled", "one", "yzp"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, c_in])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("level", [ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL],
                         ids=["disable_all", "enable_all"])
@pytest.mark.parametrize("kernel", ["qlinearconv", "matmulinteger"])
def test_onnx_runtime_requantizes_as_modelled(kernel: str, level: ort.GraphOptimizationLevel) -> None:
    """Negative multipliers, biases far beyond 2^24 (float32 conversion rounds), int8 weights
    up to +-127 (exact u8s8 on this CPU's kernels): ORT equals :func:`ort_output`."""
    rng = np.random.default_rng(7)
    c_in, c_out, x_zero_point, y_zero_point = 40, 16, 128, 100
    weights = rng.integers(-127, 128, (c_out, c_in))
    multiplier = (rng.uniform(1e-6, 3e-3, c_out) * rng.choice([-1, 1], c_out)).astype(np.float32)
    bias = rng.integers(-(2**16), 2**16, c_out)
    large = np.arange(c_out) % 2 == 0  # k*acc + B beyond 2^24, where float32 conversion rounds
    bias[large] = rng.integers(2**25, 2**29, large.sum()) * rng.choice([-1, 1], large.sum())
    multiplier[large] = (np.sign(multiplier[large]) * rng.uniform(50, 120, large.sum()) / np.abs(bias[large])).astype(np.float32)
    x = rng.integers(0, 256, (1, c_in, 500, 1)).astype(np.uint8)
    acc = np.einsum("oi,nihw->nohw", weights, x.astype(np.int64) - x_zero_point)
    expected = np.stack([ort_output(acc[:, c], 1, int(bias[c]), multiplier[c], -y_zero_point, 255 - y_zero_point)
                         for c in range(c_out)], axis=1) + y_zero_point
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    if kernel == "qlinearconv":
        model, feed = _qlinearconv(weights, multiplier, bias, x_zero_point, y_zero_point), x
    else:
        model = _matmul_integer_chain(weights, multiplier, bias, x_zero_point, y_zero_point)
        feed, expected = x[0, :, :, 0].T.copy(), expected[0, :, :, 0].T
    got = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": feed})[0]
    assert np.abs(bias).max() > 2**24 and (multiplier < 0).any()
    assert ((got > 0) & (got < 255)).mean() > 0.3  # mostly not saturated
    np.testing.assert_array_equal(got.astype(np.int64), expected)


# ---- the batched search against the search written out one k, one candidate at a time ----


def _per_factor_search(acc_low: int, acc_high: int, multiplier: float, offset: float, low: int, high: int,
                       k_max: int) -> tuple[int, int, np.float32, int, int]:
    """The search as choose_channel's docstring states it, for one channel, one ``k`` and one
    candidate at a time: ``k`` from 1 while ``k * acc`` stays in int32, the nine biases in
    order (a repeat skipped), each with the middle of the slopes it allows and its float32
    neighbours; the first exact candidate wins, else the first of those missing fewest.
    Returns ``(k, B, M', missed, worst)``."""
    points = checkpoints(acc_low, acc_high, multiplier, offset, low, high)
    targets = reference_output(points, multiplier, offset, low, high)
    if multiplier == 0:
        return 0, int(np.clip(np.rint(offset), low, high)), np.float32(1), 0, 0
    if targets[0] == targets[-1]:
        return 0, int(targets[0]), np.float32(1), 0, 0
    below = np.where(targets == low, -np.inf, targets - 0.5)
    above = np.where(targets == high, np.inf, targets + 0.5)
    p = points.astype(np.float64)
    m_true = np.float64(multiplier)
    d_low, d_high = np.max(below - m_true * p), np.min(above - m_true * p)
    sign = 1.0 if multiplier > 0 else -1.0
    best: tuple[int, int, np.float32, int, int] | None = None
    for k in range(1, max(k_max, 1) + 1):
        if k * max(abs(acc_low), abs(acc_high)) > INT32_MAX:
            break
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            one, two = k * d_low / m_true, k * d_high / m_true
        first_end, last_end = min(one, two), max(one, two)
        first = first_end if np.isfinite(first_end) else (last_end if np.isfinite(last_end) else 0.0)
        last = last_end if np.isfinite(last_end) else (first_end if np.isfinite(first_end) else 0.0)
        middle = (first + last) / 2
        biases = [np.rint(middle), np.floor(middle), np.ceil(middle), np.floor(first) + 1, np.ceil(last) - 1,
                  np.floor(first), np.ceil(last), np.floor(first) - 1, np.ceil(last) + 1]
        tried: list[int] = []
        for around in biases:
            bias = int(min(max(around, float(-(2**31) - k * acc_low)), float(INT32_MAX - k * acc_high)))
            if bias in tried:
                continue
            tried.append(bias)
            c = p + np.float64(bias) / np.float64(k)
            with np.errstate(divide="ignore", invalid="ignore"):
                low_bound, high_bound = np.minimum(below / c, above / c), np.maximum(below / c, above / c)
            low_bound[c == 0], high_bound[c == 0] = -np.inf, np.inf
            allowed = not np.any((c == 0) & ~((below < 0) & (above > 0)))
            lowest = max(low_bound.max(), 0.0 if sign > 0 else -np.inf)
            highest = min(high_bound.min(), 0.0 if sign < 0 else np.inf)
            feasible = allowed and lowest < highest
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                if np.isfinite(lowest) and np.isfinite(highest):
                    slope = (lowest + highest) / 2
                elif lowest < m_true < highest:
                    slope = m_true
                else:
                    slope = lowest * 2 if np.isfinite(lowest) else highest / 2
                nearest = np.float32(slope / k if feasible else m_true / k)
            multipliers = [nearest] + ([np.nextafter(nearest, np.float32(np.inf)),
                                        np.nextafter(nearest, np.float32(-np.inf))] if feasible else [])
            for m in multipliers:
                if m == 0 or not np.isfinite(m) or np.sign(m) != sign:
                    continue
                with np.errstate(over="ignore"):
                    got = ort_output(points, k, bias, m, low, high)
                missed = int(np.count_nonzero(got != targets))
                if best is None or missed < best[3]:
                    best = (k, bias, m, missed, int(np.abs(got - targets).max()))
                if missed == 0:
                    return best
    assert best is not None
    return best


def _assert_same_as_per_factor(acc_low: int, acc_high: int, multiplier: float, offset: float, low: int, high: int,
                               k_max: int) -> ChannelChoice:
    choice = choose_channel(acc_low, acc_high, multiplier, offset, low, high, k_max)
    k, bias, chosen, missed, worst = _per_factor_search(acc_low, acc_high, multiplier, offset, low, high, k_max)
    assert (choice.k, choice.bias, choice.missed, choice.worst) == (k, bias, missed, worst)
    assert np.float32(choice.multiplier).tobytes() == np.float32(chosen).tobytes()
    return choice


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(channels())
def test_the_batched_search_chooses_what_the_per_factor_search_chooses(
        channel: tuple[int, int, float, float, int, int, int]) -> None:
    """choose_channel tries several k per numpy round; the choice must be the one trying each
    k in turn, each candidate in turn, gives (smallest k, first exact; else fewest missed)."""
    _assert_same_as_per_factor(*channel)


@pytest.mark.parametrize("channel", [
    (-1323, 1197, 4.20000666e-40, 0.5, 0, 15, 8),  # the offset absorbs M * acc: a flat T
    (-1323, 1197, -1e-30, 0.5, 0, 15, 8),
    (0, 3, 0.5, 0.5, 0, 255, 1),  # ties at every accumulator: no exact choice
    (0, 3, 0.5, 0.5, 0, 255, 6),
    (-40_000, 40_000, 3e-3, 2.0e5 * 3e-3, -128, 127, 127),  # k * acc + B past 2^24
    (-(2**30), 2**30, 1e-7, 0.0, -128, 127, 10),  # int32 allows k = 1 only
    (-2000, 2000, 0.0123, -7.3, 0, 15, 16),
    (-2000, 2000, -0.0123, 7.3, -8, 7, 16),
])
def test_hard_channels_choose_what_the_per_factor_search_chooses(channel: tuple[int, int, float, float, int, int, int]) -> None:
    _assert_same_as_per_factor(*channel)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.sampled_from(OUTPUT_RANGES), st.sampled_from([27, 27 * 8, 27 * 64]))
def test_a_small_round_budget_chooses_the_same(seed: int, channels: int, output: tuple[int, int], budget: int) -> None:
    """With rounds bounded to a few candidate points (fewer factors per round, the 24 later
    candidates in several calls), every channel still gets its per-factor choice."""
    rng = np.random.default_rng(seed)
    weights = rng.integers(-8, 8, (channels, 6)) * rng.integers(0, 2, (channels, 1))
    multiplier = rng.uniform(-0.3, 0.3, channels) * rng.choice([1.0, 0.0, 1e-4], channels)
    offset = rng.uniform(-40, 40, channels)
    low, high = output
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(requant, "_CANDIDATE_POINTS", budget)
        unit = choose_unit(weights, 0, 15, multiplier, offset, low, high)
    acc_low, acc_high = accumulator_range(weights, 0, 15)
    for c in range(channels):
        k_max = weight_factor_limit(weights[c], -128, 127) if np.any(weights[c]) else 1
        k, bias, chosen, missed, worst = _per_factor_search(int(acc_low[c]), int(acc_high[c]), float(multiplier[c]),
                                                            float(offset[c]), low, high, k_max)
        assert (unit.k[c], unit.bias[c], unit.missed[c], unit.worst[c]) == (k, bias, missed, worst)
        assert unit.multiplier[c].tobytes() == np.float32(chosen).tobytes()
