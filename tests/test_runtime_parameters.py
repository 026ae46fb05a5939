"""Quantizer parameters the integer forms cannot take: run-time scale, zero point and bit
width, zero points outside the integer range, non-integer bit widths. All take the exact
float path (or an integer form where one is exact) and are bit-identical to the semantics.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import qlower
from qlower import semantics
from qlower.semantics import ROUNDING_MODES

from helpers import run_disable_all

F32 = np.float32
QONNX = "qonnx.custom_op.general"


def runtime_model(op: str, runtime: dict[str, np.ndarray | None], attrs: dict[str, object], x_shape: tuple[int, ...] = (4, 6)) -> onnx.ModelProto:
    """``y = op(x, *params)`` where a parameter given as None is a graph input (run time)."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    inits = []
    for name, value in runtime.items():
        if value is None:
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, []))
        else:
            inits.append(numpy_helper.from_array(np.asarray(value, F32), name))
    node = helper.make_node(op, ["x", *runtime], ["y"], name="q", domain=QONNX, **attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x_shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QONNX, 1)])
    model.ir_version = 8
    return model



def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Identical bit patterns, NaN equal to NaN, and +0 equal to -0: QONNX adds a zero zero
    point (-0 + 0 = +0) where the float path leaves the Add out, so a -0 input can keep its
    sign; the verifier, too, compares values."""
    zeros = (a == 0) & (b == 0)
    return bool(np.all((a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b)) | zeros))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.sets(st.sampled_from(["s", "z", "b"]), min_size=1),
    scale=st.floats(2.0**-10, 2.0**4, width=32),
    zero_point=st.integers(-6, 20).map(float) | st.floats(-4, 4, width=32),
    bits=st.sampled_from([1.0, 2.0, 3.0, 4.0, 8.0, 2.5, 5.75, 16.0]),
    signed=st.booleans(),
    narrow=st.booleans(),
    mode=st.sampled_from(ROUNDING_MODES),
    seed=st.integers(0, 2**16),
)
def test_runtime_quant_parameters_are_bit_identical(
    which: set[str], scale: float, zero_point: float, bits: float, signed: bool, narrow: bool, mode: str, seed: int
) -> None:
    values = {"s": np.array(scale, F32), "z": np.array(zero_point, F32), "b": np.array(bits, F32)}
    model = runtime_model("Quant", {k: (None if k in which else v) for k, v in values.items()},
                          {"signed": int(signed), "narrow": int(narrow), "rounding_mode": mode})
    result = qlower.convert(model, verify_result=False)
    record = result.report.quantizers[0]
    assert record.lowered_by == "quant_float_path" and record.float_path
    rng = np.random.default_rng(seed)
    q_range = 2.0 ** bits
    units = np.concatenate([rng.uniform(-q_range - 4, q_range + 4, 20), np.round(rng.uniform(-q_range, q_range, 4)) + 0.5]).astype(F32)
    x = (units.reshape(4, 6) * F32(scale)).astype(F32)
    x.flat[0], x.flat[1] = F32(0.0), F32(-0.0)
    feeds = {"x": x, **{k: values[k] for k in which}}
    got = run_disable_all(result.model, feeds)
    expected = semantics.quant(x, values["s"], values["z"], bits, signed, narrow, mode)
    assert same_bits(got, expected), (got, expected)


def test_runtime_scale_on_a_constant_weight() -> None:
    """A weight whose scale is computed at run time: float ops on the constant."""
    weight = np.random.default_rng(0).normal(0, 0.3, (6, 3)).astype(F32)
    nodes = [
        helper.make_node("Quant", ["w", "s", "z", "b"], ["wq"], name="weight_quant", domain=QONNX, signed=1, narrow=1),
        helper.make_node("MatMul", ["x", "wq"], ["y"], name="mm"),
    ]
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.array(0, F32), "z"), numpy_helper.from_array(np.array(4, F32), "b")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6]), helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QONNX, 1)])
    model.ir_version = 8
    result = qlower.convert(model, inputs=[{"x": np.ones((2, 6), F32), "s": np.array(0.05, F32)}])
    assert result.report.quantizers[0].lowered_by == "quant_float_path"
    assert result.report.verification is not None and result.report.verification.passed


def test_runtime_float_quant_scale() -> None:
    model = runtime_model("FloatQuant", {"s": None, "e": np.array(4.0), "m": np.array(3.0), "b": np.array(7.0), "mx": np.array(448.0)}, {})
    result = qlower.convert(model, verify_result=False)
    assert result.report.quantizers[0].lowered_by == "float_quant_float_path"
    x = (np.random.default_rng(0).normal(0, 30, (4, 6))).astype(F32)
    got = run_disable_all(result.model, {"x": x, "s": np.array(0.3, F32)})
    assert same_bits(got, semantics.float_quant(x, F32(0.3), 4, 3, 7, 448.0))


@pytest.mark.parametrize(
    ("zero_point", "bits", "signed", "narrow", "lowered_by"),
    [
        (2.0, 2.0, 1, 1, "activation_qcdq"),  # range [-1, 1], zero point 2: int8 Q/Clip/DQ holds it
        (-3.0, 4.0, 0, 0, "activation_qcdq"),  # unsigned with a negative zero point: uint8 cannot hold -3
        (300.0, 8.0, 1, 0, "quant_float_path"),  # no int8 holds 300
    ],
)
def test_zero_points_outside_the_range_lower_exactly(zero_point: float, bits: float, signed: int, narrow: int, lowered_by: str) -> None:
    model = runtime_model("Quant", {"s": np.array(0.1), "z": np.array(zero_point), "b": np.array(bits)}, {"signed": signed, "narrow": narrow})
    result = qlower.convert(model)
    record = result.report.quantizers[0]
    if zero_point < 0 and not signed:
        assert record.lowered_by == "quant_float_path"  # the uint8 container cannot store -3
    else:
        assert record.lowered_by == lowered_by
    verification = result.report.verification
    assert verification is not None and verification.passed
    assert all(row.max_abs_diff == 0 for row in verification.outputs if row.level == "ORT_DISABLE_ALL")


def test_qop_unit_with_relu_and_a_zero_point_above_the_range_stays_qcdq() -> None:
    """Reduced from the fuzz campaign: MatMul -> Relu -> unsigned 2-bit Quant with zero
    point 5 (range [0, 3]): every output saturates, the requantization range is empty, and
    the unit must be left as QCDQ (it crashed the exact-unit search)."""
    weight = np.array([[0.7]], F32)
    nodes = [
        helper.make_node("Quant", ["x", "s", "z0", "b"], ["xq"], name="act", domain=QONNX, signed=0, narrow=0),
        helper.make_node("Quant", ["w", "s", "z0", "b"], ["wq"], name="weight", domain=QONNX, signed=1, narrow=0),
        helper.make_node("MatMul", ["xq", "wq"], ["m"], name="mm"),
        helper.make_node("Relu", ["m"], ["r"], name="relu"),
        helper.make_node("Quant", ["r", "s", "z5", "b"], ["y"], name="out", domain=QONNX, signed=0, narrow=0),
    ]
    inits = [numpy_helper.from_array(np.asarray(v, F32), n) for n, v in (("s", 1 / 3), ("z0", 0.0), ("z5", 5.0), ("b", 2.0), ("w", weight))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QONNX, 1)])
    model.ir_version = 8
    result = qlower.convert(model, "qop")
    assert any("stays QCDQ" in str(unit["reason"]) for unit in result.report.unit_records)
    assert result.report.verification is not None and result.report.verification.passed


@pytest.mark.parametrize("profile", ["portable", "openvino"])
def test_trunc_with_a_non_integer_output_width_takes_the_float_ops(profile: str) -> None:
    """Trunc v2, unit scale ratio, 2.5 output bits: the Q/DQ form some profiles use needs an
    integer range, so it passes and the exact float ops lower it."""
    params = {"s": np.array(0.25), "z": np.array(0.0), "ib": np.array(8.0), "os": np.array(0.25), "ob": np.array(2.5)}
    model = runtime_model("Trunc", params, {"rounding_mode": "FLOOR", "signed": 1, "narrow": 0})
    model.opset_import[1].version = 2
    result = qlower.convert(model, profile=profile)
    assert result.report.quantizers[0].lowered_by == "trunc_float_ops"
    assert result.report.verification is not None and result.report.verification.passed
