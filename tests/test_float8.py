"""FloatQuant lowering: float8 Q/DQ where the format is an ONNX float8 type, else exact float ops.

The float8 claims in ``qlower.float8`` are measured here against ONNX Runtime (exact for
saturating formats wherever ``x/scale`` is finite; the two known differences pinned), and
the float path is held bit-identical to ``semantics.float_quant`` by a property test over
formats, rounding modes, saturation and scales.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import qlower
from qlower.errors import UnsupportedError
from qlower import semantics
from qlower.semantics import ROUNDING_MODES

from helpers import make_qonnx_model
from paths import BREVITAS_DIR

F32 = np.float32
E4M3 = (TensorProto.FLOAT8E4M3FN, 4, 3, 7, 448.0)
E5M2 = (TensorProto.FLOAT8E5M2, 5, 2, 15, 57344.0)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def float8_qdq(fp8: int, scale: float, saturate: int) -> ort.InferenceSession:
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], saturate=saturate),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]), helper.make_tensor("zp", fp8, [], [0.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    return session(model)


def hard_inputs(rng: np.random.Generator, mantissa: int, bias: int, scale: F32, n: int = 4000) -> np.ndarray:
    """Every binade from below the subnormals to past the maximum, exact ties, zeros, and
    random float32 bit patterns (which include infinities, NaN and huge values)."""
    magnitudes = np.exp2(rng.uniform(-bias - mantissa - 4, 20, n))
    k = rng.integers(2**mantissa, 2 ** (mantissa + 1), n)
    ties = (k + 0.5) * np.exp2(rng.integers(-bias - mantissa - 2, 18, n) - mantissa)
    bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(F32)
    signs = rng.choice([-1.0, 1.0], 2 * n)
    units = np.concatenate([magnitudes, ties]) * signs
    return np.concatenate([(units.astype(F32) * scale).astype(F32), bits, np.array([0.0, -0.0], F32)]).astype(F32)


def same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise: identical float32 bit patterns, or both NaN."""
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


@pytest.mark.parametrize(("fp8", "exponent", "mantissa", "bias", "max_val"), [E4M3, E5M2], ids=["e4m3fn", "e5m2"])
@pytest.mark.parametrize("scale", [1.0, 0.37, 3.1e-3, 2.0**-20])
def test_saturating_float8_quantize_linear_is_float_quant_where_x_over_scale_is_finite(
    fp8: int, exponent: int, mantissa: int, bias: int, max_val: float, scale: float
) -> None:
    s = F32(scale)
    x = hard_inputs(np.random.default_rng(0), mantissa, bias, s)
    with np.errstate(all="ignore"):
        finite = np.isfinite(x / s)
        expected = semantics.float_quant(x, s, exponent, mantissa, bias, max_val)
    got = float8_qdq(fp8, scale, 1).run(None, {"x": x})[0]
    assert same_bits(got, expected)[finite].all()
    # Where x/scale is infinite FloatQuant gives NaN and saturate=1 gives +-max (documented).
    assert np.isnan(expected[~finite]).all()
    assert not np.isnan(got[~finite & ~np.isnan(x)]).any()


@pytest.mark.parametrize(
    ("fp8", "exponent", "mantissa", "bias", "max_val", "flag", "beyond"), [(*E4M3, "has_nan", 490.0), (*E5M2, "has_inf", 62000.0)]
)
def test_non_saturating_float8_quantize_linear_differs_from_float_quant(
    fp8: int, exponent: int, mantissa: int, bias: int, max_val: float, flag: str, beyond: float
) -> None:
    """Why saturation=0 takes the float path: ORT 1.32 gives 448 for E4M3FN at 490 and NaN
    for E5M2 at 62000, where FloatQuant gives NaN and inf respectively."""
    x = np.array([beyond, -beyond], F32)
    expected = semantics.float_quant(x, F32(1), exponent, mantissa, bias, max_val, saturation=False, **{flag: True})
    got = float8_qdq(fp8, 1.0, 0).run(None, {"x": x})[0]
    assert not same_bits(got, expected).all()


def convert_one(params: list[object], attrs: dict[str, object] | None = None, to: str = "qcdq", **kw: object) -> qlower.ConversionResult:
    return qlower.convert(make_qonnx_model("FloatQuant", params, attrs, shape=(2, 4, 5)), to, **kw)


@pytest.mark.parametrize("to", ["qcdq", "qop"])
@pytest.mark.parametrize(("fmt", "elem_type"), [(E4M3, TensorProto.FLOAT8E4M3FN), (E5M2, TensorProto.FLOAT8E5M2)])
def test_ocp_formats_become_float8_qdq_at_opset_19(fmt: tuple, elem_type: int, to: str) -> None:
    _, e, m, b, mx = fmt
    result = convert_one([0.37, e, m, b, mx], {"has_nan": 1, "has_inf": int(e == 5)}, to)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == ["QuantizeLinear", "DequantizeLinear"]
    assert result.report.output_opset == 19 and result.report.input_opset == 13
    zero_point = next(t for t in result.model.graph.initializer if t.data_type == elem_type)
    assert zero_point is not None
    assert result.report.verification is not None and result.report.verification.passed
    assert result.report.verification.outputs[0].max_abs_diff == 0


@pytest.mark.parametrize(
    ("params", "attrs", "why"),
    [
        ([0.37, 4, 3, 7, 448.0], {"saturation": 0, "has_nan": 1}, "not a saturating ONNX float8 type"),
        ([0.37, 4, 3, 7, 448.0], {"rounding_mode": "FLOOR"}, "FLOOR rounding"),
        ([0.37, 4, 3, 7, 480.0], {}, "max 480"),
        ([0.37, 4, 3, 8, 448.0], {}, "bias 8"),
        ([0.05, 3, 2, 3, 28.0], {}, "e3m2"),
        # a max below the smallest normal (2^-6): the input sampler once drew exponents from an
        # empty range and verification crashed (fuzz)
        ([0.37, 4, 3, 7, 2.0**-8], {}, "max 0.00390625"),
    ],
)
def test_other_minifloats_take_the_float_path_and_say_why(params: list[object], attrs: dict[str, object], why: str) -> None:
    result = convert_one(params, attrs)
    record = result.report.quantizers[0]
    assert record.lowered_by == "float_quant_float_path" and record.float_path
    assert any(why in reason for _, reason in record.skipped)
    assert result.report.verification is not None and result.report.verification.passed


def weight_model(params: list[object], weight: np.ndarray) -> onnx.ModelProto:
    """``y = MatMul(x, FloatQuant(weight, *params))``."""
    model = make_qonnx_model("FloatQuant", params, shape=(2, weight.shape[0]))
    model.graph.node[0].input[0] = "w"
    model.graph.node[0].output[0] = "wq"
    model.graph.initializer.append(onnx.numpy_helper.from_array(weight.astype(F32), "w"))
    model.graph.node.append(helper.make_node("MatMul", ["x", "wq"], ["y"], name="mm"))
    model.graph.output[0].type.tensor_type.ClearField("shape")
    return model


def test_weights_fold_to_float8_initializers() -> None:
    weight = np.random.default_rng(1).normal(0, 0.3, (8, 5))
    result = qlower.convert(weight_model([0.01, 4, 3, 7, 448.0], weight))
    stored = next(t for t in result.model.graph.initializer if t.name.endswith("/quantized"))
    assert stored.data_type == TensorProto.FLOAT8E4M3FN
    assert result.report.quantizers[0].lowered_by == "fold_constant_float8"
    assert result.report.verification is not None and result.report.verification.passed


@pytest.mark.parametrize(
    ("params", "weight", "expected"),
    [
        # e3m2 with bias 3 is a subset of E4M3FN's grid, whatever the exponent width says.
        ([0.01, 3, 2, 3, 15.0], np.linspace(-0.2, 0.2, 40).reshape(8, 5), TensorProto.FLOAT8E4M3FN),
        # E5M2's range: values past 448 and below E4M3FN's subnormals.
        ([1.0, 5, 2, 15, 57344.0], np.geomspace(1e-4, 3e4, 40).reshape(8, 5), TensorProto.FLOAT8E5M2),
        # A mantissa finer than both float8 types stays float32.
        ([0.01, 3, 5, 3, 15.0], np.linspace(-0.2, 0.2, 40).reshape(8, 5), TensorProto.FLOAT),
    ],
    ids=["e3m2-in-e4m3fn", "e5m2", "m5-float32"],
)
def test_folded_weights_take_the_finest_float8_type_that_holds_them(params: list[object], weight: np.ndarray, expected: int) -> None:
    result = qlower.convert(weight_model(params, weight))
    stored = next(t for t in result.model.graph.initializer if list(t.dims) == [8, 5])
    assert stored.data_type == expected
    assert result.report.verification is not None and result.report.verification.passed


def test_qop_keeps_float8_units_as_qcdq_and_says_why() -> None:
    rng = np.random.default_rng(0)
    q = "qonnx.custom_op.general"
    params = ["e", "m", "b", "mx"]
    nodes = [
        helper.make_node("FloatQuant", ["x", "s", *params], ["xq"], name="act", domain=q),
        helper.make_node("FloatQuant", ["w", "ws", *params], ["wq"], name="weight", domain=q),
        helper.make_node("Conv", ["xq", "wq"], ["c"], name="conv", kernel_shape=[3, 3]),
        helper.make_node("FloatQuant", ["c", "s", *params], ["y"], name="out", domain=q),
    ]
    values = {"s": 0.02, "ws": 0.004, "e": 4, "m": 3, "b": 7, "mx": 448, "w": rng.normal(0, 0.3, (4, 3, 3, 3))}
    inits = [onnx.numpy_helper.from_array(np.asarray(v, F32), k) for k, v in values.items()]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(q, 1)])
    model.ir_version = 8
    result = qlower.convert(model, "qop")
    assert "QLinearConv" not in [n.op_type for n in result.model.graph.node]
    (unit,) = result.report.unit_records
    assert "float8" in str(unit["reason"]) and "stays QCDQ" in str(unit["reason"])
    assert result.report.verification is not None and result.report.verification.passed


@st.composite
def minifloats(draw: st.DrawFn) -> tuple[list[object], dict[str, object]]:
    exponent = draw(st.integers(1, 6))
    mantissa = draw(st.integers(0, 5))
    bias = draw(st.integers(-3, 2 ** (exponent - 1) + 3))
    top = semantics.minifloat_max(exponent, mantissa, bias)
    max_val = draw(st.sampled_from([top, top * 2, top / 2]) | st.floats(2.0**-6, 2.0**12, width=32))
    saturation = draw(st.booleans())
    overflow = draw(st.sampled_from(["has_inf", "has_nan"]))
    attrs: dict[str, object] = {"saturation": int(saturation), overflow: 1, "rounding_mode": draw(st.sampled_from(ROUNDING_MODES))}
    scale = draw(st.floats(2.0**-12, 2.0**6, width=32))
    return [scale, exponent, mantissa, bias, max_val], attrs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=minifloats(), seed=st.integers(0, 2**16))
def test_float_path_is_bit_identical_to_float_quant(case: tuple[list[object], dict[str, object]], seed: int) -> None:
    params, attrs = case
    model = make_qonnx_model("FloatQuant", params, attrs, shape=["n"])
    lowered = qlower.convert(model, verify_result=False).model
    scale, exponent, mantissa, bias, max_val = params
    x = hard_inputs(np.random.default_rng(seed), int(mantissa), int(bias), F32(scale), n=500)
    with np.errstate(all="ignore"):
        expected = semantics.float_quant(
            x, F32(scale), int(exponent), int(mantissa), int(bias), max_val,
            has_inf=bool(attrs.get("has_inf")), has_nan=bool(attrs.get("has_nan")),
            saturation=bool(attrs["saturation"]), rounding_mode=str(attrs["rounding_mode"]),
        )
    got = session(lowered).run(None, {"x": x})[0]
    mismatch = ~same_bits(got, expected)
    if lowered.graph.node[0].op_type == "QuantizeLinear":  # float8 Q/DQ: exact where x/scale is finite
        with np.errstate(all="ignore"):
            mismatch &= np.isfinite(x / F32(scale))
    assert not mismatch.any(), (x[mismatch][:5], got[mismatch][:5], expected[mismatch][:5])


FP8_FIXTURES = ["fp8_e4m3_linear_bias", "fp8_e4m3_conv", "fp8_e5m2_linear", "fp8_e5m2_conv_bias"]


@pytest.mark.parametrize("to", ["qcdq", "qop"])
@pytest.mark.parametrize("name", FP8_FIXTURES)
def test_brevitas_fp8_exports_lower_to_float8_qdq_bit_identically(name: str, to: str) -> None:
    """Brevitas 0.13.4 OCP FP8 exports (its own QCDQ export refuses them): float8 Q/DQ,
    loadable in ONNX Runtime, bit-identical at ORT_DISABLE_ALL on the fixture's input and
    on random inputs."""
    path = BREVITAS_DIR / f"{name}.qonnx.onnx"
    x = np.load(BREVITAS_DIR / f"{name}.input.npy")
    original = onnx.load(path)
    feeds = [{original.graph.input[0].name: x}]
    for inputs in (feeds, None):
        result = qlower.convert(path, to, inputs=inputs)
        verification = result.report.verification
        assert verification is not None and verification.passed
        assert all(row.max_abs_diff == 0 for row in verification.outputs if row.level == "ORT_DISABLE_ALL")
    expected = TensorProto.FLOAT8E4M3FN if "e4m3" in name else TensorProto.FLOAT8E5M2
    model = result.model
    float8 = {t.name for t in model.graph.initializer if t.data_type == expected}
    ops = [(n.op_type, n.input[2] in float8) for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert ops.count(("QuantizeLinear", True)) == 2 and ops.count(("DequantizeLinear", True)) == 3
    assert all(is_float8 for _, is_float8 in ops)
    assert [q.lowered_by for q in result.report.quantizers].count("fold_constant_float8") == 1
    session(model)  # loads in ONNX Runtime


def test_strict_accepts_float8_qdq_and_refuses_other_minifloats() -> None:
    assert convert_one([0.37, 4, 3, 7, 448.0], strict=True).report.float_path == []
    with pytest.raises(UnsupportedError) as info:
        convert_one([0.05, 3, 2, 3, 28.0], strict=True)
    assert info.value.node == "FloatQuant_0" and "--strict" in str(info.value) and "e3m2" in str(info.value)
    report = convert_one([0.05, 3, 2, 3, 28.0]).report
    assert [entry["node"] for entry in report.float_path] == ["FloatQuant_0"]
    assert "not a saturating ONNX float8 type" in str(report.float_path[0]["reason"])
