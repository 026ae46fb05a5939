"""The verifier's batched tap comparisons give what the per-tap ones give (compare.add_taps,
internal.lowered_values, reference.all_identical)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qlower.reference import all_identical, identical
from qlower.taps import Tap
from qlower.verification.compare import Tally, add_taps
from qlower.verification.internal import TapPoint, lowered_values

SPECIAL = [0.0, -0.0, np.nan, np.inf, -np.inf, 1.0, 0.5]


@st.composite
def tap_pairs(draw: st.DrawFn) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pairs (reference, lowered) as taps come: mostly equal, sometimes one value changed
    (to NaN, -0.0, inf, a step), another shape or dtype, empty or 0-d, or large."""
    pairs = []
    for _ in range(draw(st.integers(0, 6))):
        shape = draw(st.sampled_from([(1, 4), (2, 3), (), (0, 3), (3,), (1 << 16,)]))
        seed = draw(st.integers(0, 2**16))
        reference = np.random.default_rng(seed).integers(-8, 8, shape).astype(np.float32) * np.float32(0.25)
        got = reference.copy()
        change = draw(st.sampled_from(["same", "value", "shape", "dtype", "same", "same"]))
        if change == "value" and got.size:
            got.reshape(-1)[draw(st.integers(0, got.size - 1))] = draw(st.sampled_from(SPECIAL))
            if draw(st.booleans()):
                reference.reshape(-1)[0] = draw(st.sampled_from(SPECIAL))
        elif change == "shape":
            got = got.reshape(-1)
        elif change == "dtype":
            got = got.astype(np.float64)
        pairs.append((reference, got))
    return pairs


def _state(tally: Tally) -> tuple:
    return (tally.max_abs, tally.max_units, tally.differing, tally.total, tally.note)


@settings(max_examples=150, deadline=None)
@given(tap_pairs())
def test_add_taps_tallies_what_adding_each_tap_tallies(pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    step = lambda values: np.full_like(values, 0.25)  # noqa: E731
    one_by_one, batched = [Tally() for _ in pairs], [Tally() for _ in pairs]
    for _ in range(2):  # a second batch folds into the first
        for tally, (reference, got) in zip(one_by_one, pairs):
            tally.add(reference, got, lambda reference=reference: step(reference.astype(np.float64)), True)
        add_taps(batched, [reference for reference, _ in pairs], [got for _, got in pairs], [step] * len(pairs))
    assert [repr(_state(t)) for t in batched] == [repr(_state(t)) for t in one_by_one]


@settings(max_examples=150, deadline=None)
@given(tap_pairs())
def test_all_identical_is_identical_of_every_pair(pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    values, others = [a for a, _ in pairs], [b for _, b in pairs]
    assert all_identical(values, others) == all(identical(a, b) for a, b in pairs)
    assert all_identical(values, [a.copy() for a in values])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(
    st.sampled_from([np.int8, np.uint8, np.int16, np.int32, np.int64, np.float32]),
    st.sampled_from([(1, 4), (), (0, 2), (2, 3)]),
    st.floats(0.0009765625, 10, width=32),
    st.integers(-128, 127),
    st.sampled_from(["tensor", "channel", "snapped", "float"]),
), max_size=6), st.integers(0, 2**16))
def test_lowered_values_decodes_as_each_tap_does(specs: list, seed: int) -> None:
    rng = np.random.default_rng(seed)
    points, raws = [], []
    for number, (dtype, shape, scale, zero_point, kind) in enumerate(specs):
        info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
        raw = rng.integers(max(info.min, -1000), min(info.max, 1000), shape).astype(dtype) if info else rng.standard_normal(shape).astype(dtype)
        if kind == "channel" and len(shape) == 2 and shape[1] > 1:
            tap = Tap.of(f"t{number}", f"q{number}", np.full(shape[1], scale, np.float32), np.zeros(shape[1], np.int8), 1)
        else:
            tap = None if kind == "float" else Tap.of(f"t{number}", f"q{number}", np.float32(scale), np.int64(zero_point))
        point = TapPoint(f"t{number}", "node", number, None, f"q{number}", tap, snapped=kind == "snapped")  # type: ignore[arg-type]
        points.append(point)
        raws.append(raw.astype(np.float32) * np.float32(scale) if kind == "snapped" else raw)
    batched = lowered_values(points, raws)
    for point, raw in zip(points, raws):
        expected = point.lowered_value(raw)
        ours = batched[point.original]
        assert ours.dtype == expected.dtype and ours.shape == expected.shape and ours.tobytes() == expected.tobytes()
