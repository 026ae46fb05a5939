"""The QONNX arithmetic of ``qlower.semantics`` against hand-computed values (SPEC section 1)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qlower import semantics
from qlower.semantics import F32

TIES = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5], dtype=np.float32)
BELOW_HALF = np.nextafter(F32(0.5), F32(0))  # 0.49999997
ABOVE_HALF = np.nextafter(F32(0.5), F32(1))  # 0.50000006

# Expected results at TIES, and at +-0.49999997 and +-0.50000006, for every rounding mode.
TIE_RESULTS = {
    "ROUND": [-2, -2, 0, 0, 2, 2],
    "HALF_EVEN": [-2, -2, 0, 0, 2, 2],
    "CEIL": [-2, -1, 0, 1, 2, 3],
    "FLOOR": [-3, -2, -1, 0, 1, 2],
    "UP": [-3, -2, -1, 1, 2, 3],
    "DOWN": [-2, -1, 0, 0, 1, 2],
    "HALF_UP": [-3, -2, -1, 1, 2, 3],
    "HALF_DOWN": [-2, -1, 0, 0, 1, 2],
}
NEAR_TIE_RESULTS = {  # inputs: -0.50000006, -0.49999997, 0.49999997, 0.50000006
    "ROUND": [-1, 0, 0, 1],
    "HALF_EVEN": [-1, 0, 0, 1],
    "CEIL": [0, 0, 1, 1],
    "FLOOR": [-1, -1, 0, 0],
    "UP": [-1, -1, 1, 1],
    "DOWN": [0, 0, 0, 0],
    "HALF_UP": [-1, 0, 0, 1],
    "HALF_DOWN": [-1, 0, 0, 1],
}


@pytest.mark.parametrize("mode", semantics.ROUNDING_MODES)
def test_rounding_at_ties(mode: str) -> None:
    assert semantics.round_with_mode(TIES, mode).tolist() == TIE_RESULTS[mode]


@pytest.mark.parametrize("mode", semantics.ROUNDING_MODES)
def test_rounding_next_to_ties(mode: str) -> None:
    values = np.array([-ABOVE_HALF, -BELOW_HALF, BELOW_HALF, ABOVE_HALF], dtype=np.float32)
    assert semantics.round_with_mode(values, mode).tolist() == NEAR_TIE_RESULTS[mode]


@pytest.mark.parametrize("mode", semantics.ROUNDING_MODES)
def test_rounding_leaves_large_integers_alone(mode: str) -> None:
    # Above 2**23 every float32 is an integer; |t| + 0.5 would round to even there.
    values = np.array([2**23 + 1, -(2**23 + 1), 2**24 + 2, 3 * 2**30], dtype=np.float32)
    assert np.array_equal(semantics.round_with_mode(values, mode), values)


def test_rounding_mode_names_are_case_insensitive_and_checked() -> None:
    assert semantics.normalize_rounding_mode(b"half_even") == "HALF_EVEN"
    assert semantics.normalize_rounding_mode("Floor") == "FLOOR"
    with pytest.raises(ValueError, match="unknown rounding_mode 'NEAREST'"):
        semantics.normalize_rounding_mode("NEAREST")


@pytest.mark.parametrize("mode", semantics.ROUNDING_MODES)
def test_negative_zero_and_small_negatives(mode: str) -> None:
    expected = {"FLOOR": [0, -1], "UP": [0, -1]}.get(mode, [0, 0])
    assert semantics.round_with_mode(np.array([-0.0, -0.25], dtype=np.float32), mode).tolist() == expected


def test_negative_zero_is_positive_for_bipolar_and_signed_one_bit() -> None:
    x = np.array([-0.0, 0.0, -1e-30, 1e-30], dtype=np.float32)
    assert semantics.bipolar_quant(x, F32(0.5)).tolist() == [0.5, 0.5, -0.5, 0.5]
    one_bit = semantics.quant(x, F32(0.5), F32(0), 1, signed=True, narrow=False)
    assert one_bit.tolist() == [0.5, 0.5, -0.5, 0.5]


@pytest.mark.parametrize(
    ("signed", "narrow", "bits", "expected"),
    [
        (True, False, 8, (-128, 127)),
        (True, True, 8, (-127, 127)),
        (False, False, 8, (0, 255)),
        (False, True, 8, (0, 254)),
        (True, False, 2, (-2, 1)),
        (True, True, 2, (-1, 1)),
        (False, False, 1, (0, 1)),
        (False, True, 1, (0, 0)),
        (True, False, 32, (-(2**31), 2**31 - 1)),
        (False, False, 32, (0, 2**32 - 1)),
    ],
)
def test_integer_range_by_hand(signed: bool, narrow: bool, bits: int, expected: tuple[int, int]) -> None:
    assert semantics.int_range(signed, narrow, bits) == expected


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("narrow", [True, False])
@pytest.mark.parametrize("bits", range(1, 33))
def test_integer_range_formula_and_float_bounds(signed: bool, narrow: bool, bits: int) -> None:
    q_min, q_max = semantics.int_range(signed, narrow, bits)
    if signed:
        assert (q_min, q_max) == (-(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1)
    else:
        assert (q_min, q_max) == (0, 2**bits - 1 - int(narrow))
    # The float32 clamp bounds are the same numbers rounded once (exact up to 24 bits).
    low, high = semantics.float_range(signed, narrow, bits)
    assert (low, high) == (F32(q_min), F32(q_max))
    if bits <= 24:
        assert (int(low), int(high)) == (q_min, q_max)


def test_signed_one_bit_ignores_narrow_and_the_clamp() -> None:
    x = np.array([-3.0, -0.1, 0.0, 0.1, 3.0], dtype=np.float32)
    for narrow in (False, True):
        q = semantics.quant_integer(x, F32(1), F32(0), 1, signed=True, narrow=narrow)
        assert q.tolist() == [-1, -1, 1, 1, 1]


def test_unsigned_one_bit_is_a_plain_zero_one_quantizer() -> None:
    x = np.array([-1.0, 0.4, 0.6, 5.0], dtype=np.float32)
    assert semantics.quant_integer(x, F32(1), F32(0), 1, signed=False, narrow=False).tolist() == [0, 0, 1, 1]


def test_zero_point_is_added_before_rounding() -> None:
    # x/s = 0.5 and zp = 1: QONNX rounds 1.5 -> 2 and returns (2 - 1) * s = s. ONNX's
    # QuantizeLinear would compute round(0.5) + 1 = 1 and return 0.
    y = semantics.quant(np.array([0.25], np.float32), F32(0.5), F32(1), 8, signed=False, narrow=False)
    assert y.tolist() == [0.5]
    # Zero point 3 at the tie 2.5 + 3 = 5.5 -> 6 -> (6 - 3) * 0.5.
    y = semantics.quant(np.array([1.25], np.float32), F32(0.5), F32(3), 8, signed=True, narrow=False)
    assert y.tolist() == [1.5]


def test_clamp_happens_before_rounding() -> None:
    s = F32(1)
    # Clamp to [-128, 127] first: 127.6 -> 127 (not round 128 then clamp, same here) and with
    # a CEIL the clamp keeps -128.5 at -128.
    q = semantics.quant_integer(np.array([127.6, -128.5, 1000], np.float32), s, F32(0), 8, True, False, "CEIL")
    assert q.tolist() == [127, -128, 127]


def test_non_integer_bit_width_has_non_integer_bounds() -> None:
    # 2.5 signed bits: bounds -2**1.5 = -2.828 and 2**1.5 - 1 = 1.828; 1.9 clamps to 1.828
    # and then rounds to 2, which a truncated 2-bit range ([-2, 1]) would never give.
    q_min, q_max = semantics.float_range(True, False, 2.5)
    assert q_min == -(F32(2) ** F32(1.5)) and q_max == F32(2) ** F32(1.5) - F32(1)
    q = semantics.quant_integer(np.array([1.9, -2.9, 1.2], np.float32), F32(1), F32(0), 2.5, True, False)
    assert q.tolist() == [2, -3, 1]


def test_quant_dequantizes_with_the_zero_point_and_scale() -> None:
    x = np.array([-1.0, -0.26, 0.0, 0.3, 0.74, 5.0], dtype=np.float32)
    y = semantics.quant(x, F32(0.25), F32(2), 3, signed=False, narrow=False)
    # t = x/0.25 + 2 = [-2, 0.96, 2, 3.2, 4.96, 22] -> clamp [0, 7] -> round -> minus 2, times 0.25
    assert y.tolist() == [-0.5, -0.25, 0.0, 0.25, 0.75, 1.25]


def test_trunc_v1_by_hand() -> None:
    s = F32(0.5)
    x = np.array([13, -13, 7, 6.6], dtype=np.float32) * s
    # t = rint(x/s) = [13, -13, 7, 7] -> / 2**(8-6) = [3.25, -3.25, 1.75, 1.75] -> FLOOR
    y = semantics.trunc_v1(x, s, F32(0), 8, 6, "FLOOR")
    assert y.tolist() == [1.5, -2.0, 0.5, 0.5]
    assert semantics.trunc_v1(x, s, F32(0), 8, 6, "ROUND").tolist() == [1.5, -1.5, 1.0, 1.0]


def test_trunc_v2_by_hand() -> None:
    # scale 0.5, out_scale 2 -> k = 4; 4-bit signed output range [-8, 7].
    x = np.array([6.5, 40.0, -40.0, -0.75], dtype=np.float32)
    y = semantics.trunc_v2(x, F32(0.5), F32(0), F32(2), 4, signed=True, narrow=False, rounding_mode="FLOOR")
    # t = rint(x/0.5) = [13, 80, -80, -2 (rint(-1.5) is even)] -> /4 -> [3.25, 20, -20, -0.5]
    # -> clamp [-8, 7] -> floor -> [3, 7, -8, -1] -> * 2
    assert y.tolist() == [6.0, 14.0, -16.0, -2.0]


def test_trunc_v2_zero_point_and_power_of_two_snapping() -> None:
    # scale 1, zero point 2, out_scale 2 -> k = 2: t = rint(5 + 2) = 7 -> 3.5 -> floor 3
    # -> (3 - 2/2) * 2 = 4.
    y = semantics.trunc_v2(np.array([5.0], np.float32), F32(1), F32(2), F32(2), 8, True, False, "FLOOR")
    assert y.tolist() == [4.0]
    # out_scale / scale = 3.9 snaps to k = 4.
    assert semantics.trunc_power_of_two(F32(1), F32(3.9)) == 4
    y = semantics.trunc_v2(np.array([13.0], np.float32), F32(1), F32(0), F32(3.9), 8, True, False, "FLOOR")
    assert y.tolist() == [F32(3) * F32(3.9)]


def test_bipolar_quant_maps_zero_to_plus_one() -> None:
    x = np.array([-2.0, -1e-7, 0.0, 1e-7, 3.0], dtype=np.float32)
    assert semantics.bipolar_quant(x, F32(0.25)).tolist() == [-0.25, -0.25, 0.25, 0.25, 0.25]


def test_float_quant_by_hand_e4m3() -> None:
    x = np.array([0.3, -0.3, 1.0, 300.0, 460.0, 470.0, 1e6, 2**-9 * 1.4, 2**-10, 0.0], dtype=np.float32)
    y = semantics.float_quant(x, F32(1), 4, 3, 7, 448.0)
    # 0.3 lies in [0.25, 0.5): step 2**-5 -> 9.6 steps -> 10 -> 0.3125. 300 in [256, 512):
    # step 32 -> 9.375 -> 9 -> 288. 460 -> 14.375 * 32 -> 448; 470 rounds to 480, clamps
    # to 448. Subnormals have step 2**-9: 1.4 steps -> 1; half a step -> 0 (ties to even).
    expected = [0.3125, -0.3125, 1.0, 288.0, 448.0, 448.0, 448.0, 2**-9, 0.0, 0.0]
    assert y.tolist() == expected


def test_float_quant_without_saturation() -> None:
    # E4M3 with NaN: 470 rounds to 480, past 448 -> NaN; 460 rounds to 448 and stays.
    x = np.array([470.0, -470.0, 460.0], dtype=np.float32)
    y = semantics.float_quant(x, F32(1), 4, 3, 7, 448.0, saturation=False, has_nan=True)
    assert np.isnan(y[:2]).all() and y[2] == 448
    # E5M2 with inf: 70000 rounds to 65536, past 57344 -> inf.
    y = semantics.float_quant(np.array([70000.0, -70000.0], np.float32), F32(1), 5, 2, 15, 57344.0, saturation=False, has_inf=True)
    assert y.tolist() == [np.inf, -np.inf]
    with pytest.raises(ValueError, match="has_inf or has_nan"):
        semantics.float_quant(x, F32(1), 4, 3, 7, 448.0, saturation=False)


def test_float_quant_non_finite_gives_nan_as_in_qonnx() -> None:
    y = semantics.float_quant(np.array([np.inf, -np.inf, np.nan], np.float32), F32(1), 4, 3, 7, 448.0)
    assert np.isnan(y).all()


@pytest.mark.parametrize(
    ("dtype", "exponent", "mantissa", "bias", "max_val"),
    [(ml_dtypes.float8_e4m3fn, 4, 3, 7, 448.0), (ml_dtypes.float8_e5m2, 5, 2, 15, 57344.0)],
)
def test_float_quant_matches_onnx_float8_types(dtype: type, exponent: int, mantissa: int, bias: int, max_val: float) -> None:
    rng = np.random.default_rng(0)
    scale = F32(0.37)
    x = (np.exp2(rng.uniform(-20, 18, 20000)) * rng.choice([-1, 1], 20000)).astype(np.float32) * scale
    ties = (rng.integers(8, 16, 2000) + 0.5) * np.exp2(rng.integers(-9, 5, 2000)) * scale
    x = np.concatenate([x, ties.astype(np.float32)])
    y = semantics.float_quant(x, scale, exponent, mantissa, bias, max_val)
    # Saturating float8: clamp into range, convert (round to nearest even), scale back.
    t = np.clip(x / scale, -max_val, max_val)
    expected = t.astype(dtype).astype(np.float32) * scale
    assert np.array_equal(y, expected)


@given(
    value=st.floats(width=32, allow_nan=False),
    low=st.integers(-300, 300),
    span=st.integers(0, 600),
    mode=st.sampled_from(semantics.ROUNDING_MODES),
)
def test_clamp_then_round_equals_round_then_clamp(value: float, low: int, span: int, mode: str) -> None:
    t = np.array([value], dtype=np.float32)
    lo, hi = F32(low), F32(low + span)
    clamp_first = semantics.round_with_mode(np.clip(t, lo, hi), mode)
    round_first = np.clip(semantics.round_with_mode(t, mode), lo, hi)
    assert clamp_first[0] == round_first[0]
