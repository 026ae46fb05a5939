"""``--to qop`` units whose folded multiplier is >= 1 (one accumulator step is worth a whole
output step or more, e.g. a BatchNorm with a large gamma before a 2-bit quantizer, as in the
zoo's unsw_nb15 MLP): the contract of qlower/requant.py's search holds for every multiplier,
so they become integer units like any other (exact where the search finds an exact choice, as
on unsw_nb15's two Gemms); only where the float reference's own rounding near the output range
could reach half a step, or the requantized value could leave int32, is the unit left QCDQ,
with that reason."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlower.requant import choose_channel, ort_output, reference_output

import test_qop as qop


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    acc_low=st.integers(-3000, 100),
    span=st.integers(0, 3000),
    magnitude=st.floats(1.0, 5e4),
    sign=st.sampled_from([1.0, -1.0]),
    crossing=st.floats(0, 1),
    output_range=st.sampled_from([(0, 3), (-2, 1), (0, 15), (0, 255), (-128, 127), (-1, 1)]),
)
def test_a_multiplier_of_one_or_more_is_searched_exactly(acc_low: int, span: int, magnitude: float, sign: float,
                                                         crossing: float, output_range: tuple[int, int]) -> None:
    """Brute force over every accumulator: the search's contract holds for ``|M| >= 1`` too
    (its proof needs only that both maps are monotone): a choice it calls exact equals the
    real-valued rounding on every accumulator, and the misses it counts are real ones."""
    acc_high = acc_low + span
    low, high = output_range
    multiplier = sign * magnitude
    offset = -multiplier * (acc_low + crossing * span)  # the output range is crossed inside the accumulators
    choice = choose_channel(acc_low, acc_high, multiplier, offset, low, high, 16)
    every = np.arange(acc_low, acc_high + 1)
    got = ort_output(every, choice.k, choice.bias, choice.multiplier, low, high)
    expected = reference_output(every, multiplier, offset, low, high)
    if choice.missed == 0:
        np.testing.assert_array_equal(got, expected)
    else:
        assert np.count_nonzero(got != expected) >= choice.missed


def coarse_unit_model(gamma: float, mean_in_steps: float, y_scale: float) -> onnx.ModelProto:
    """Quant(x, 4 bit unsigned) -> MatMul(4-bit W) -> BN(gamma, mean) -> Relu -> Quant(y, 2 bit)."""
    rng = np.random.default_rng(11)
    b = qop.UnitBuilder()
    sx, sw = np.float32(0.25), np.float32(0.125)
    x = b.quant("qx", "x", sx, 0.0, 4, signed=0)
    w = b.quant("qw", b.const("W", (rng.integers(-7, 8, (16, 12)) * sw).astype(np.float32)), sw, 0.0, 4, narrow=1)
    channels = 12
    params = [b.const(f"bn_{name}", value) for name, value in (
        ("gamma", rng.uniform(0.5, 1.5, channels) * gamma), ("beta", rng.normal(0, 0.3, channels)),
        ("mean", (rng.integers(-20, 20, channels) + mean_in_steps) * sx * sw + rng.uniform(0, 0.03, channels)),
        ("var", rng.uniform(0.5, 2.0, channels)))]
    y = b.node("BatchNormalization", [b.node("MatMul", [x, w], "compute"), *params], "bn", epsilon=1e-5)
    y = b.quant("qy", b.node("Relu", [y], "relu"), np.float32(y_scale), 0.0, 2, signed=0)
    return b.model((64, 16), y)


def test_units_with_a_multiplier_of_one_or_more_run_integer_exactly() -> None:
    result = qop.convert_qop(coarse_unit_model(gamma=30.0, mean_in_steps=0.0, y_scale=0.5))
    record = qop.unit_record(result)
    assert record["became"] and "exact requantization" in record["became"], record
    (mul,) = qop.nodes_of(result.model, "Mul")
    assert float(np.max(np.abs(qop.init(result.model, mul.input[1])))) >= 1  # M' >= 1 on some channel
    assert all(row.differing == 0 for row in result.report.verification.internal)
    assert all(row.max_lsb_diff == 0 for row in result.report.verification.outputs)


def test_where_the_reference_rounding_decides_the_unit_stays_qcdq_with_the_reason() -> None:
    """A BatchNorm mean of ~300 accumulator steps with a gamma worth thousands of output steps
    per accumulator step: the float reference rounds the unit's real value near the output
    range on an ulp of many output steps, so no integer unit can be held to it."""
    result = qop.convert_qop(coarse_unit_model(gamma=1e5, mean_in_steps=300.0, y_scale=0.5))
    record = qop.unit_record(result)
    assert record["became"] is None and "the reference, not the unit, decides" in record["reason"], record
