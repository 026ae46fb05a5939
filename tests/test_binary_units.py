"""``--to qop`` on binary activations (BipolarQuant, signed 1-bit Quant): the select stores
{-1, +1} as uint8 codes 127 | 129 (zero point 128), a unit whose output quantizer is
binary becomes an integer sign threshold (weights x 2, int32 bias, multiplier +-1, Clip),
and the next unit reads the codes as an integer tensor. Verified at both ORT levels."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import qlower
from qlower import taps
from qlower.passes.binary_output import _threshold
from qlower.requant import ort_output

import test_qop as qop

QONNX = qop.QONNX


def bipolar(b: qop.UnitBuilder, name: str, source: str, scale: float | np.ndarray) -> str:
    b.nodes.append(helper.make_node("BipolarQuant", [source, b.const(f"{name}_s", scale)], [f"{name}_out"], name=name,
                                    domain=QONNX))
    return f"{name}_out"


def batch_norm(b: qop.UnitBuilder, name: str, source: str, channels: int, rng: np.random.Generator) -> str:
    gamma = rng.normal(0, 1, channels).astype(np.float32)
    gamma[0], gamma[-1] = 0.0, -abs(gamma[-1])  # a zero and a negative gamma
    params = [b.const(f"{name}_{part}", value) for part, value in (
        ("gamma", gamma), ("beta", rng.normal(0, 0.5, channels)), ("mean", rng.normal(0, 1.0, channels)),
        ("var", rng.uniform(0.5, 4.0, channels)))]
    return b.node("BatchNormalization", [source, *params], name, epsilon=1e-4)


def binary_weight(b: qop.UnitBuilder, name: str, shape: tuple[int, ...], rng: np.random.Generator) -> str:
    return bipolar(b, name, b.const(f"{name}_w", rng.normal(0, 1, shape).astype(np.float32)), 1.0)


def cnv_like_model(seed: int = 0) -> onnx.ModelProto:
    """8-bit input -> Conv(binary W) -> BN -> BipolarQuant -> MaxPool -> Conv -> BN -> BipolarQuant
    -> Flatten -> Gemm(binary W) -> float logits, as bnn_pynq's 1w1a CNV is built."""
    rng = np.random.default_rng(seed)
    b = qop.UnitBuilder()
    x = b.quant("qx", "x", np.float32(2 ** -7), 0.0, 8, signed=1)
    y = b.node("Conv", [x, binary_weight(b, "w1", (8, 3, 3, 3), rng)], "conv1")
    y = bipolar(b, "a1", batch_norm(b, "bn1", y, 8, rng), np.float32(1.0))
    y = b.node("MaxPool", [y], "pool", kernel_shape=[2, 2], strides=[2, 2])
    y = b.node("Conv", [y, binary_weight(b, "w2", (6, 8, 3, 3), rng)], "conv2", pads=[1, 1, 1, 1])
    y = bipolar(b, "a2", batch_norm(b, "bn2", y, 6, rng), np.float32(0.5))
    y = b.node("Flatten", [y], "flatten")
    y = b.node("Gemm", [y, binary_weight(b, "w3", (4, 6 * 3 * 3), rng)], "fc", transB=1)
    return b.model((2, 3, 8, 8), y)


def test_bipolar_units_run_integer_and_verify() -> None:
    result = qop.convert_qop(cnv_like_model())
    ops = Counter(n.op_type for n in result.model.graph.node)
    assert ops["QLinearConv"] == 2 and not ops["Conv"]
    assert not ops["Where"] and not ops["GreaterOrEqual"] and not ops["BatchNormalization"]
    records = {u["node"]: u for u in result.report.unit_records}
    for name in ("conv1", "conv2"):
        assert "sign threshold on the accumulator" in records[name]["became"], records[name]
    # The Gemm's input is the second binary activation, read as integers (uint8, zero point 128).
    assert records["fc"]["became"] is None or "MatMulInteger" in records["fc"]["became"]
    (dq,) = [n for n in result.model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "a2_out"]
    assert int(qop.init(result.model, dq.input[2])) == 128
    # The first binary activation lives on only as integer codes: a tap says where.
    tapped = {tap.original: tap for tap in taps.read(result.model)}
    assert "a1_out" in tapped and tapped["a1_out"].zero_point == (128,) and tapped["a1_out"].scale == (1.0,)
    verification = result.report.verification
    assert verification.internal and all(row.differing == 0 for row in verification.internal), verification.internal
    for conv in qop.nodes_of(result.model, "QLinearConv"):
        weights = qop.init(result.model, conv.input[3])
        assert weights.dtype == np.int8 and set(np.unique(weights)) <= {-2, 0, 2}


@pytest.mark.parametrize("zero_point, relu", [(0.0, False), (-2.0, False), (3.0, False), (-2.0, True), (1.0, True)])
def test_signed_one_bit_quant_output_with_zero_point_and_relu(zero_point: float, relu: bool) -> None:
    """MatMul -> BN -> [Relu] -> Quant(1 bit, signed, zp) -> MatMul: a threshold on y >= -zp*s
    (with the Relu: a constant +1 when that floor is <= 0)."""
    rng = np.random.default_rng(3)
    b = qop.UnitBuilder()
    x = b.quant("qx", "x", np.float32(0.05), 0.0, 4, signed=0)
    w = b.quant("qw", b.const("W", (rng.integers(-7, 8, (12, 10)) * 0.1).astype(np.float32)), 0.1, 0.0, 4, narrow=1)
    y = batch_norm(b, "bn", b.node("MatMul", [x, w], "compute"), 10, rng)
    if relu:
        y = b.node("Relu", [y], "relu")
    y = b.quant("qy", y, np.float32(0.25), zero_point, 1, signed=1)
    y = b.node("MatMul", [y, binary_weight(b, "w2", (10, 5), rng)], "next")
    result = qop.convert_qop(b.model((16, 12), y))
    record = qop.unit_record(result)
    assert "sign threshold on the accumulator" in record["became"], record
    if relu and zero_point > 0:
        assert "10 constant channels" in record["became"]
    assert not qop.nodes_of(result.model, "Where")
    assert all(row.differing == 0 for row in result.report.verification.internal)


def test_standalone_binary_activation_is_integer_only_for_qop() -> None:
    b = qop.UnitBuilder()
    y = bipolar(b, "a", "x", np.float32(0.75))
    qop_result = qlower.convert(b.model((4, 6), y), to="qop", batches=4)
    assert qop_result.report.verification.passed
    ops = [n.op_type for n in qop_result.model.graph.node]
    assert ops == ["GreaterOrEqual", "Where", "DequantizeLinear"]
    codes = [qop.init(qop_result.model, name) for name in qop_result.model.graph.node[1].input[1:]]
    assert [c.dtype for c in codes] == [np.uint8, np.uint8] and [int(c) for c in codes] == [129, 127]
    qcdq_ops = [n.op_type for n in qlower.convert(b.model((4, 6), y), to="qcdq", batches=4).model.graph.node]
    assert qcdq_ops == ["GreaterOrEqual", "Where"]


def test_standalone_signed_one_bit_quant_with_zero_point() -> None:
    """Div -> Add(zp) -> GreaterOrEqual -> Where(codes) -> DequantizeLinear(s, 128 + zp): the Add's
    zero point and the DequantizeLinear's are distinct constants (float and uint8)."""
    b = qop.UnitBuilder()
    y = b.quant("qy", "x", np.float32(0.5), -1.0, 1, signed=1)
    result = qlower.convert(b.model((4, 6), y), to="qop", batches=4)
    assert result.report.verification.passed
    (dq,) = qop.nodes_of(result.model, "DequantizeLinear")
    assert int(qop.init(result.model, dq.input[2])) == 127
    (add,) = qop.nodes_of(result.model, "Add")
    assert qop.init(result.model, add.input[1]).dtype == np.float32


def test_per_channel_binary_scale_stays_a_float_select() -> None:
    b = qop.UnitBuilder()
    y = bipolar(b, "a", "x", np.array([0.5, 1.0, 2.0], np.float32).reshape(1, 3))
    result = qlower.convert(b.model((4, 3), y), to="qop", batches=4)
    assert result.report.verification.passed
    assert [n.op_type for n in result.model.graph.node] == ["GreaterOrEqual", "Where"]


def test_weights_too_wide_to_double_stay_qcdq_with_the_reason() -> None:
    rng = np.random.default_rng(4)
    b = qop.UnitBuilder()
    x = b.quant("qx", "x", np.float32(0.05), 0.0, 8, signed=0)
    w = b.quant("qw", b.const("W", (rng.integers(-100, 100, (4, 3, 3, 3)) * 0.01).astype(np.float32)), 0.01, 0.0, 8,
                narrow=1)
    y = bipolar(b, "a", b.node("Conv", [x, w], "compute"), np.float32(1.0))
    result = qop.convert_qop(b.model((1, 3, 6, 6), y))
    record = qop.unit_record(result)
    assert record["became"] is None and "2 * w leaves [-128, 127]" in record["reason"]


@settings(max_examples=300, deadline=None)
@given(
    acc_low=st.integers(-400, 0),
    span=st.integers(0, 600),
    multiplier=st.one_of(st.just(0.0), st.floats(-5, 5, allow_nan=False).filter(lambda m: abs(m) > 1e-6)),
    crossing=st.floats(-500, 500, allow_nan=False),
    on_integer=st.booleans(),
)
def test_threshold_reproduces_the_sign_for_every_accumulator(acc_low: int, span: int, multiplier: float,
                                                            crossing: float, on_integer: bool) -> None:
    """Brute force over the whole accumulator range: ONNX Runtime's requantization of the
    doubled accumulator plus the bias, clipped to [-1, 1], is +1 exactly where
    multiplier * acc + offset >= 0 (a crossing on an integer: the real value is exactly 0 there)."""
    if on_integer:
        crossing = float(round(crossing))
        multiplier = float(np.float32(multiplier) if multiplier else 0.0)
        multiplier = float(round(multiplier * 4) / 4) or 0.25  # exact products, so the 0 is exact
    offset = -multiplier * crossing
    acc_high = acc_low + span
    k, bias, sign = _threshold(acc_low, acc_high, multiplier, offset)
    acc = np.arange(acc_low, acc_high + 1)
    got = ort_output(acc, k, bias, np.float32(sign), -1, 1)
    expected = np.where(multiplier * acc.astype(np.float64) + offset >= 0, 1, -1)
    np.testing.assert_array_equal(got, expected)
