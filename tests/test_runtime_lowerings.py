"""Quantizers whose parameters are computed at run time and need more than a float op per
step: BipolarQuant's scale, Trunc's scales / zero point / bit widths (its power-of-two
ratio), FloatQuant's exponent / mantissa / bias / max. Each lowering is held bit-identical
to ``qlower.semantics`` in ONNX Runtime at ORT_DISABLE_ALL, signed zeros and NaN included.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import qlower
from qlower import semantics
from qlower.errors import UnsupportedError

from helpers import run_disable_all

F32 = np.float32
QONNX = "qonnx.custom_op.general"
SPECIAL = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 1e-45, -1e-45, 1.1754942e-38, 3.4028235e38], F32)


def quantizer_model(
    op: str, params: dict[str, np.ndarray | tuple[int, ...]], attrs: dict[str, object], x_shape: tuple[int, ...], opset: int = 13
) -> onnx.ModelProto:
    """``y = op(x, *params)``: an array is an initializer, a shape tuple a graph input of that shape."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    inits = []
    for name, value in params.items():
        if isinstance(value, tuple):
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value)))
        else:
            inits.append(numpy_helper.from_array(np.asarray(value, F32), name))
    node = helper.make_node(op, ["x", *params], ["y"], name="q", domain=QONNX, **attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(QONNX, 2 if op == "Trunc" and len(params) == 5 else 1)])
    model.ir_version = 8
    return model



def assert_same_bits(got: np.ndarray, expected: np.ndarray) -> None:
    """Identical float32 bit patterns (the sign of zero included); any NaN equals any NaN."""
    got, expected = np.asarray(got, F32), np.asarray(expected, F32)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    same = (got.view(np.uint32) == expected.view(np.uint32)) | (np.isnan(got) & np.isnan(expected))
    assert same.all(), (got[~same][:8], expected[~same][:8])


def scale_values(count: int) -> st.SearchStrategy[list[float]]:
    """Run-time scales: ordinary, subnormal, zero of either sign, negative, NaN and infinite."""
    any_float = st.floats(width=32, allow_nan=True, allow_infinity=True)
    positive = st.floats(2.0**-149, 1e6, width=32)
    return st.lists(st.one_of(positive, positive, any_float, st.sampled_from([0.0, -0.0, 1e-45, -1.0])), min_size=count, max_size=count)


# ---- BipolarQuant ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=st.sampled_from([(), (1,), (3, 1, 1), (1, 3, 1, 1), (2, 3, 2, 2)]),
    data=st.data(),
    constant_input=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bipolar_run_time_scale_is_bit_identical(layout: tuple[int, ...], data: st.DataObject, constant_input: bool, seed: int) -> None:
    x_shape = (2, 3, 2, 2)
    scale = np.array(data.draw(scale_values(int(np.prod(layout)))), F32).reshape(layout)
    rng = np.random.default_rng(seed)
    x = (rng.normal(0, 1, x_shape) * 10.0 ** rng.integers(-40, 38, x_shape)).astype(F32)
    x.flat[: SPECIAL.size] = SPECIAL
    model = quantizer_model("BipolarQuant", {"s": layout}, {}, x_shape)
    if constant_input:  # a weight whose scale is computed at run time
        model.graph.input.pop(0)
        model.graph.initializer.append(numpy_helper.from_array(x, "x"))
    result = qlower.convert(model, verify_result=False)
    (record,) = result.report.quantizers
    assert record.lowered_by == "bipolar_float_path" and record.float_path
    feeds = {"s": scale} if constant_input else {"x": x, "s": scale}
    assert_same_bits(run_disable_all(result.model, feeds), semantics.bipolar_quant(x, scale))


def test_bipolar_run_time_scale_model_verifies_and_strict_refuses_it() -> None:
    """Conv -> BipolarQuant whose per-channel scale is the mean |activation| (XNOR-Net style)."""
    weight = np.random.default_rng(1).normal(0, 0.5, (4, 3, 3, 3)).astype(F32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Abs", ["c"], ["a"], name="abs"),
        helper.make_node("ReduceMean", ["a"], ["s"], name="mean", axes=[2, 3], keepdims=1),
        helper.make_node("BipolarQuant", ["c", "s"], ["y"], name="binarize", domain=QONNX),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QONNX, 1)])
    for target in ("qcdq", "qop"):
        result = qlower.convert(model, target)
        assert result.report.verification is not None and result.report.verification.passed
        assert all(row.max_abs_diff == 0 for row in result.report.verification.outputs if row.level == "ORT_DISABLE_ALL")
        (entry,) = result.report.float_path
        assert entry["node"] == "binarize" and "scale computed at run time" in str(entry["reason"])
    with pytest.raises(UnsupportedError) as info:
        qlower.convert(model, strict=True)
    assert info.value.node == "binarize" and "--strict" in str(info.value)


# ---- Trunc: the power-of-two tables --------------------------------------------------------


def run_emitted(build, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Run ``build(emitter, input tensor) -> output tensor`` as a one-input ONNX graph."""
    import onnx_graphsurgeon as gs

    from qlower.passes.base import NodeEmitter

    graph = gs.Graph(opset=13)
    (name,) = feeds
    value = gs.Variable(name, dtype=np.float32, shape=list(np.shape(feeds[name])))
    output = build(NodeEmitter(graph, "t"), value)
    graph.inputs, graph.outputs = [value], [output]
    model = gs.export_onnx(graph)
    model.ir_version = 8
    return run_disable_all(model, feeds)


def floats_around(values: np.ndarray, ulps: int) -> np.ndarray:
    bits = np.asarray(values, F32).view(np.uint32).astype(np.int64)
    around = np.clip(bits[:, None] + np.arange(-ulps, ulps + 1)[None, :], 0, 0x7F800000)
    return around.astype(np.uint32).view(F32).reshape(-1)


def test_trunc_ratio_snaps_bit_identically_at_every_step_and_its_neighbours() -> None:
    """``k = 2^round(log2(r))`` in ONNX Runtime against ``semantics.trunc_power_of_two`` at each
    of the 278 step points and 300 floats either side, subnormal ratios, zeros, NaN, inf."""
    from qlower.passes.trunc_power_of_two import emit_ratio_power_of_two, ratio_table

    thresholds, values = ratio_table()
    assert len(thresholds) == 278 and values[0] == 0 and values[-1] == np.inf
    subnormal = np.arange(0, 2**23, 4099, dtype=np.uint32).view(F32)
    ratios = np.concatenate([floats_around(thresholds, 300), subnormal, SPECIAL, -SPECIAL, [-1.0, -1e-45]]).astype(F32)
    got = run_emitted(emit_ratio_power_of_two, {"r": ratios})
    with np.errstate(all="ignore"):
        assert_same_bits(got, semantics.trunc_power_of_two(np.ones((), F32), ratios))
        # the reference also sees 0-d ratios (one per-tensor scale): same numpy results
        for r in floats_around(thresholds[::37], 2):
            assert_same_bits(semantics.trunc_power_of_two(F32(1), r), got[np.flatnonzero(ratios.view(np.uint32) == r.view(np.uint32))[0]])


@pytest.mark.slow
def test_trunc_ratio_table_matches_numpy_on_every_float32() -> None:
    """Exhaustive (about 2 minutes): the table lookup equals ``semantics.trunc_power_of_two``
    for all 2^31 non-negative float32 ratios (numpy's log2 is monotone on this machine)."""
    from qlower.passes.trunc_power_of_two import ratio_table

    thresholds, values = ratio_table()
    with np.errstate(all="ignore"):
        for start in range(0, 0x7F800001, 1 << 24):
            ratios = np.arange(start, min(start + (1 << 24), 0x7F800001), dtype=np.uint32).view(F32)
            expected = semantics.trunc_power_of_two(np.ones((), F32), ratios)
            table = values[np.searchsorted(thresholds, ratios, side="right")]
            assert np.array_equal(expected.view(np.uint32), table.view(np.uint32)), hex(start)


def test_trunc_v1_shift_is_numpy_exp2_for_whole_differences() -> None:
    from qlower.passes.trunc_power_of_two import emit_shift

    differences = np.concatenate([np.arange(-160, 140), [np.inf, -np.inf, np.nan, 0.5, -2.25, 7.75]]).astype(F32)
    with np.errstate(all="ignore"):
        expected = np.exp2(differences)
    got = run_emitted(emit_shift, {"d": differences})
    whole = np.isfinite(differences) & (np.floor(differences) == differences) | np.isinf(differences)
    assert_same_bits(got[whole], expected[whole])  # numpy's exp2(127) is one ulp above 2^127: kept
    assert np.allclose(got[~whole], expected[~whole], rtol=2**-22, equal_nan=True)  # Pow: within an ulp


# ---- Trunc with run-time parameters ---------------------------------------------------------

TRUNC_V2 = ("s", "z", "ib", "os", "ob")
TRUNC_V1 = ("s", "z", "ib", "ob")


@st.composite
def trunc_cases(draw: st.DrawFn) -> dict[str, object]:
    version = draw(st.sampled_from([1, 2]))
    names = TRUNC_V2 if version == 2 else TRUNC_V1
    runtime = draw(st.sets(st.sampled_from(names), min_size=1))
    layout = draw(st.sampled_from([(), (1,), (3, 1, 1), (1, 3, 1, 1)]))
    count = int(np.prod(layout))
    scale = np.array(draw(st.lists(st.sampled_from([1.0, 0.5, 2.0**-20, 2.0**30]) | st.floats(2.0**-126, 2.0**20, width=32), min_size=count, max_size=count)), F32).reshape(layout)
    thresholds = __import__("qlower.passes.trunc_power_of_two", fromlist=["ratio_table"]).ratio_table()[0]
    step = st.sampled_from(list(thresholds)).flatmap(lambda t: st.integers(-3, 3).map(lambda u: float(floats_around(np.array([t]), 3)[u + 3])))
    ratios = st.one_of(step, st.floats(2.0**-149, 2.0**60, width=32), st.sampled_from([1.0, 2.0, 0.5, 2.0**-140, 1e-45]))
    ratio = np.array(draw(st.lists(ratios, min_size=count, max_size=count)), F32).reshape(layout)
    with np.errstate(all="ignore"):
        out_scale = (ratio * scale).astype(F32)
    out_scale = np.where(np.isfinite(out_scale) & (out_scale > 0), out_scale, ratio).astype(F32)
    if "os" not in runtime:  # a constant output scale must be positive (a run-time one may be 0: k = 0)
        out_scale = np.maximum(out_scale, F32(2.0**-149))
    in_bits = float(draw(st.integers(2, 24)))
    out_bits = draw(st.sampled_from([1.0, 2.0, 3.0, 4.0, 8.0, 16.0, 2.5]))
    zero_point = np.array(draw(st.sampled_from([0.0, 1.0, -3.0, 0.5])), F32)
    values = {"s": scale, "z": zero_point, "ib": np.array(in_bits, F32), "os": out_scale, "ob": np.array(out_bits, F32)}
    attrs: dict[str, object] = {"rounding_mode": draw(st.sampled_from(semantics.ROUNDING_MODES))}
    if version == 2:
        attrs.update(signed=int(draw(st.booleans())), narrow=int(draw(st.booleans())))
    return {"version": version, "runtime": runtime, "values": {n: values[n] for n in names}, "attrs": attrs}


def trunc_reference(case: dict[str, object], x: np.ndarray) -> np.ndarray:
    from qlower.reference import evaluate_qonnx_node

    values = case["values"]
    return evaluate_qonnx_node("Trunc", [x, *values.values()], case["attrs"])  # type: ignore[union-attr]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=trunc_cases(), seed=st.integers(0, 2**16))
def test_trunc_run_time_parameters_are_bit_identical(case: dict[str, object], seed: int) -> None:
    x_shape = (2, 3, 2, 2)
    values: dict[str, np.ndarray] = case["values"]  # type: ignore[assignment]
    params = {name: (value.shape if name in case["runtime"] else value) for name, value in values.items()}  # type: ignore[operator]
    result = qlower.convert(quantizer_model("Trunc", params, case["attrs"], x_shape), verify_result=False)  # type: ignore[arg-type]
    (record,) = result.report.quantizers
    assert record.lowered_by == "trunc_float_ops" and record.float_path
    rng = np.random.default_rng(seed)
    scale = values["s"]
    units = np.round(rng.uniform(-300, 300, x_shape)) + rng.choice([0.0, 0.5, 0.25], x_shape)
    x = (units * scale).astype(F32)
    x.flat[:4] = [0.0, -0.0, np.nan, np.inf]
    feeds = {"x": x, **{name: values[name] for name in case["runtime"]}}  # type: ignore[union-attr]
    got = run_disable_all(result.model, feeds)
    with np.errstate(all="ignore"):
        expected = trunc_reference(case, x)
    # the zero point's Add is left out when it is a constant zero: -0 may come out as +0 (SPEC: values compared)
    zeros = (got == 0) & (expected == 0)
    assert_same_bits(np.where(zeros, F32(0), got), np.where(zeros, F32(0), expected))


def test_trunc_run_time_scales_model_verifies_and_strict_refuses_it() -> None:
    """A dynamically quantized average pool: Quant with scale ReduceMax(|x|)/127, AveragePool,
    then a Trunc v2 whose scale and output scale are computed from that same scale."""
    helpers = [
        helper.make_node("Abs", ["x"], ["a"], name="abs"),
        helper.make_node("ReduceMax", ["a"], ["peak"], name="peak", keepdims=0),
        helper.make_node("Div", ["peak", "c127"], ["s"], name="act_scale"),
        helper.make_node("Mul", ["s", "c3"], ["os"], name="out_scale"),  # ratio 3 snaps to k = 4
        helper.make_node("Quant", ["x", "s", "z", "b8"], ["xq"], name="act_quant", domain=QONNX, signed=1, narrow=0),
        helper.make_node("AveragePool", ["xq"], ["pool"], name="pool", kernel_shape=[2, 2]),
        helper.make_node("Mul", ["pool", "c4"], ["sum"], name="sum"),
        helper.make_node("Trunc", ["sum", "s", "z", "b10", "os", "b8"], ["y"], name="trunc", domain=QONNX, rounding_mode="FLOOR", signed=1),
    ]
    inits = [numpy_helper.from_array(np.asarray(v, F32), n) for n, v in (("c127", 127.0), ("c3", 3.0), ("c4", 4.0), ("z", 0.0), ("b8", 8.0), ("b10", 10.0))]
    graph = helper.make_graph(helpers, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QONNX, 2)])
    for target in ("qcdq", "qop"):
        result = qlower.convert(model, target)
        assert result.report.verification is not None and result.report.verification.passed
        assert all(row.max_abs_diff == 0 for row in result.report.verification.outputs if row.level == "ORT_DISABLE_ALL")
        entries = {entry["node"]: str(entry["reason"]) for entry in result.report.float_path}
        assert "scale and output scale computed at run time" in entries["trunc"]
    alone = quantizer_model("Trunc", {"s": (), "z": np.zeros(()), "ib": np.array(8.0), "os": (), "ob": np.array(4.0)}, {"rounding_mode": "FLOOR"}, (1, 4))
    with pytest.raises(UnsupportedError) as info:
        qlower.convert(alone, strict=True)
    assert info.value.node == "q" and "--strict" in str(info.value)


# ---- FloatQuant with a run-time format ----------------------------------------------------

FLOAT_QUANT_PARAMS = ("s", "e", "m", "b", "mx")


@st.composite
def float_quant_cases(draw: st.DrawFn) -> dict[str, object]:
    runtime = draw(st.sets(st.sampled_from(FLOAT_QUANT_PARAMS), min_size=1).filter(lambda r: r != {"s"}))
    exponent = draw(st.integers(1, 8) | st.sampled_from([10, 20, 30]))
    mantissa = draw(st.integers(0, 7) | st.sampled_from([10, 23, 24, 25, 40, 100, 127, 128, 200]))
    bias = draw(st.integers(-4, 2 ** (exponent - 1) + 3) | st.sampled_from([126, 127, 128, 149, 150, 160, 200, 300, -100, -126, -127, -130, -300]))
    top = semantics.minifloat_max(exponent, mantissa, bias)
    # A constant max_val must be a positive float32 (analysis refuses others as invalid); the
    # format's own maximum or a third of it underflows to 0 for large biases.
    max_val = draw(st.sampled_from([top, top / 3, top * 2, 1.0, 3e38]).map(lambda v: float(F32(min(v, 3e38)))).filter(lambda v: v > 0)
                   | st.floats(2.0**-149, 2.0**127, width=32))
    if "mx" in runtime:  # a run-time max_val may be anything the reference runs
        max_val = draw(st.just(max_val) | st.sampled_from([0.0, -1.0, float("nan"), 2.0**-140]))
    attrs: dict[str, object] = {"rounding_mode": draw(st.sampled_from(semantics.ROUNDING_MODES))}
    if draw(st.booleans()):
        attrs["saturation"] = 0
        attrs[draw(st.sampled_from(["has_inf", "has_nan"]))] = 1
    layout = draw(st.sampled_from([(), (3, 1, 1)]))
    scale = np.array(draw(st.lists(st.sampled_from([1.0, 0.25, 3.0, 2.0**-100, 2.0**60]) | st.floats(2.0**-20, 2.0**20, width=32),
                                   min_size=int(np.prod(layout)), max_size=int(np.prod(layout)))), F32).reshape(layout)
    values = {"s": scale, "e": np.array(exponent, F32), "m": np.array(mantissa, F32), "b": np.array(bias, F32), "mx": np.array(max_val, F32)}
    return {"runtime": runtime, "values": values, "attrs": attrs}


def minifloat_inputs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Magnitudes log-uniform over all of float32, exact grid ties for small formats, specials."""
    magnitude = np.exp2(rng.uniform(-152, 129, shape))
    ties = (rng.integers(-64, 64, shape) + 0.5) * np.exp2(rng.integers(-10, 10, shape).astype(np.float64))
    with np.errstate(over="ignore"):
        x = np.where(rng.random(shape) < 0.3, ties, magnitude * np.where(rng.random(shape) < 0.5, -1, 1)).astype(F32)
    x.flat[: SPECIAL.size] = SPECIAL
    return x


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=float_quant_cases(), seed=st.integers(0, 2**16))
def test_float_quant_run_time_format_is_bit_identical(case: dict[str, object], seed: int) -> None:
    from qlower.passes.float_quant_format_float_path import out_of_domain
    from qlower.reference import evaluate_qonnx_node

    values: dict[str, np.ndarray] = case["values"]  # type: ignore[assignment]
    runtime: set[str] = case["runtime"]  # type: ignore[assignment]
    params = {name: (value.shape if name in runtime else value) for name, value in values.items()}
    mantissa, bias = int(values["m"]), int(values["b"])
    constant_format_outside = out_of_domain(mantissa, bias) is not None and not ({"m", "b"} & runtime)
    model = quantizer_model("FloatQuant", params, case["attrs"], (2, 3, 4, 4))  # type: ignore[arg-type]
    event("constant format outside the exact domain" if constant_format_outside else (
        "run-time format outside the exact domain" if out_of_domain(mantissa, bias) else "exact domain"))
    if constant_format_outside:
        with pytest.raises(UnsupportedError, match="float32"):
            qlower.convert(model, verify_result=False)
        return
    result = qlower.convert(model, verify_result=False)
    (record,) = result.report.quantizers
    assert record.lowered_by == "float_quant_format_float_path" and record.float_path
    x = minifloat_inputs(np.random.default_rng(seed), (2, 3, 4, 4))
    got = run_disable_all(result.model, {"x": x, **{name: values[name] for name in runtime}})
    if out_of_domain(mantissa, bias) is not None:
        assert np.isnan(got).all()  # outside the exact domain: NaN, never a different number
        return
    with np.errstate(all="ignore"):
        expected = evaluate_qonnx_node("FloatQuant", [x, *values.values()], case["attrs"])  # type: ignore[arg-type]
    assert_same_bits(got, expected)


def test_float_quant_maxima_table_holds_every_mantissa_width() -> None:
    """The maximum for m >= 24 is the m = 24 column, and rows beyond the table are 0 or inf."""
    from qlower.passes.float_quant_format_float_path import MANTISSA_COLUMNS, TOP_EXPONENTS, maxima_table

    table = maxima_table().reshape(-1, MANTISSA_COLUMNS)
    low, high = TOP_EXPONENTS
    with np.errstate(over="ignore"):
        for top in range(low - 10, high + 10):
            for mantissa in range(0, 300):
                expected = F32(semantics.minifloat_max(1, mantissa, 1 - top))
                got = table[min(max(top, low), high) - low, min(mantissa, MANTISSA_COLUMNS - 1)]
                assert expected.view(np.uint32) == got.view(np.uint32), (top, mantissa)


def test_float_quant_run_time_format_model_verifies_and_strict_refuses_it() -> None:
    """A minifloat whose mantissa width and max_val arrive as model inputs (a format chosen at
    deployment), after a MatMul; and a constant format with bias 150 (steps below float32's
    smallest subnormal), which the constant tables cannot hold."""
    weight = np.random.default_rng(2).normal(0, 0.5, (6, 5)).astype(F32)
    inits = [numpy_helper.from_array(np.asarray(v, F32), n) for n, v in (("w", weight), ("s", 0.05), ("e", 4.0), ("b", 7.0), ("b150", 150.0), ("mx", 1e30), ("m3", 3.0))]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("FloatQuant", ["h", "s", "e", "m", "b", "max"], ["y"], name="fp_runtime", domain=QONNX, rounding_mode="ROUND"),
        helper.make_node("FloatQuant", ["h", "s", "e", "m3", "b150", "mx"], ["z"], name="fp_tiny_steps", domain=QONNX),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in (("x", [2, 6]), ("m", []), ("max", []))]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z")]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QONNX, 1)])
    feeds = [{"x": np.random.default_rng(i).normal(0, 4, (2, 6)).astype(F32), "m": np.array(m, F32), "max": np.array(mx, F32)}
             for i, (m, mx) in enumerate([(3.0, 448.0), (2.0, 57344.0), (1.0, 6.0)])]
    for target in ("qcdq", "qop"):
        result = qlower.convert(model, target, inputs=feeds)
        assert result.report.verification is not None and result.report.verification.passed
        assert all(row.max_abs_diff == 0 for row in result.report.verification.outputs if row.level == "ORT_DISABLE_ALL")
        entries = {entry["node"]: str(entry["reason"]) for entry in result.report.float_path}
        assert "mantissa bit width and max_val computed at run time" in entries["fp_runtime"]
        assert "outside what float32 holds" in entries["fp_tiny_steps"]
    with pytest.raises(UnsupportedError) as info:
        qlower.convert(model, strict=True, inputs=feeds)
    assert info.value.node == "fp_runtime" and "--strict" in str(info.value)


def test_cli_lists_all_three_run_time_forms_and_strict_refuses_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """One model with a run-time BipolarQuant scale, Trunc scale and FloatQuant mantissa width:
    ``qlower convert`` verifies it and lists all three under ``float_path``; ``--strict``
    refuses it, exit 2, naming the first."""
    import json

    from test_cli import assert_refused, qlower_cli

    nodes = [
        helper.make_node("BipolarQuant", ["x", "s"], ["b"], name="binary", domain=QONNX),
        helper.make_node("Trunc", ["b", "s", "z", "ib", "s4", "ob"], ["t"], name="trunc", domain=QONNX, rounding_mode="FLOOR"),
        helper.make_node("Mul", ["s", "four"], ["s4"], name="out_scale"),
        helper.make_node("FloatQuant", ["t", "one", "e", "m", "bias", "mx"], ["y"], name="minifloat", domain=QONNX),
    ]
    inits = [numpy_helper.from_array(np.asarray(v, F32), n) for n, v in
             (("z", 0.0), ("ib", 8.0), ("ob", 4.0), ("four", 4.0), ("one", 1.0), ("e", 4.0), ("bias", 7.0), ("mx", 448.0))]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]), helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
              helper.make_tensor_value_info("m", TensorProto.FLOAT, [])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model_path, out, report = tmp_path / "runtime.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QONNX, 2)]), str(model_path))
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, x=np.linspace(-3, 3, 8, dtype=F32).reshape(2, 4), s=np.array(0.3, F32), m=np.array(3.0, F32))
    proc = qlower_cli("convert", str(model_path), "-o", str(out), "--report", str(report), "--inputs", str(feeds), "-q")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(report.read_text())
    assert payload["verification"]["passed"]
    assert [entry["node"] for entry in payload["float_path"]] == ["binary", "trunc", "minifloat"]
    out.unlink()
    assert_refused(qlower_cli("convert", str(model_path), "-o", str(out), "--strict"), "UnsupportedError", "binary", "--strict", "run time")
    assert not out.exists()
