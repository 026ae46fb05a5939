"""Each QCDQ pass on tiny hand-built graphs: what it emits, and that the result is exact."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qlower
from qlower.passes.registry import quantizer_passes_for

QONNX = "qonnx.custom_op.general"


def one_quantizer_model(
    op: str,
    params: dict[str, np.ndarray | float],
    attrs: dict[str, object] | None = None,
    x_shape: tuple[int, ...] = (2, 3, 4, 4),
    weight: np.ndarray | None = None,
    opset: int = 13,
) -> onnx.ModelProto:
    """``y = op(x or weight, *params)``; with ``weight`` the quantizer sits on a constant
    feeding ``MatMul(x, Wq)`` (or Conv when the weight is 4-d)."""
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), name) for name, v in params.items()]
    nodes = []
    if weight is None:
        nodes.append(helper.make_node(op, ["x", *params], ["y"], name="q", domain=QONNX, **(attrs or {})))
    else:
        inits.append(numpy_helper.from_array(weight.astype(np.float32), "w"))
        nodes.append(helper.make_node(op, ["w", *params], ["wq"], name="q", domain=QONNX, **(attrs or {})))
        compute = "Conv" if weight.ndim == 4 else "MatMul"
        nodes.append(helper.make_node(compute, ["x", "wq"], ["y"], name="compute"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(QONNX, 1)])


def quant_params(scale: np.ndarray | float, zero_point: np.ndarray | float, bits: float) -> dict[str, np.ndarray | float]:
    return {"s": scale, "z": zero_point, "b": bits}


def lowered_ops(result: qlower.ConversionResult) -> Counter[str]:
    return Counter(n.op_type for n in result.model.graph.node)


def record(result: qlower.ConversionResult) -> dict[str, object]:
    return result.report.quantizers[0].to_dict()


def assert_exact(result: qlower.ConversionResult) -> None:
    verification = result.report.verification
    assert verification is not None and verification.passed, verification.failures
    assert all(r.max_abs_diff == 0 for r in verification.outputs if r.level == "ORT_DISABLE_ALL")


def initializer(result: qlower.ConversionResult, suffix: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in result.model.graph.initializer if t.name.endswith(suffix))


def node_attr(result: qlower.ConversionResult, op: str, name: str) -> object:
    node = next(n for n in result.model.graph.node if n.op_type == op)
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


# ---- activation_qcdq ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "signed", "narrow", "clip"),
    [(8, 1, 0, None), (8, 1, 1, (-127, 127)), (4, 1, 0, (-8, 7)), (8, 0, 0, None), (3, 0, 0, (0, 7)), (2, 0, 1, (0, 2))],
)
def test_activation_qcdq_layout(bits: int, signed: int, narrow: int, clip: tuple[int, int] | None) -> None:
    model = one_quantizer_model("Quant", quant_params(0.05, 0.0, bits), {"signed": signed, "narrow": narrow})
    result = qlower.convert(model, batches=4)
    assert_exact(result)
    ops = lowered_ops(result)
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1 and ops["Clip"] == (clip is not None)
    container = np.int8 if signed else np.uint8
    assert initializer(result, "/zero_point").dtype == container
    if clip:
        assert (int(initializer(result, "/clip_min")), int(initializer(result, "/clip_max"))) == clip
    assert record(result)["lowered_by"] == "activation_qcdq"


def test_activation_per_channel_writes_the_axis() -> None:
    scale = np.array([0.1, 0.2, 0.05], np.float32).reshape(1, 3, 1, 1)
    result = qlower.convert(one_quantizer_model("Quant", quant_params(scale, 0.0, 8)), batches=4)
    assert_exact(result)
    assert node_attr(result, "QuantizeLinear", "axis") == 1
    assert node_attr(result, "DequantizeLinear", "axis") == 1


@pytest.mark.parametrize("zero_point", [1.0, 3.0, -5.0, 77.0])
def test_odd_zero_point_is_exact_at_ties(zero_point: float) -> None:
    # x/s + zp lands on .5 ties: QuantizeLinear's round(x/s) + zp would be off by one.
    model = one_quantizer_model("Quant", quant_params(0.5, zero_point, 8), {"signed": zero_point < 0 or 0, "narrow": 0})
    ties = (np.arange(-40, 40, dtype=np.float32) + np.float32(0.5)) * np.float32(0.5)
    feeds = [{"x": np.resize(ties, (2, 3, 4, 4)).astype(np.float32)}]
    result = qlower.convert(model, inputs=feeds)
    assert_exact(result)
    assert lowered_ops(result)["Add"] == 1, "the zero point must be added in float, before rounding"


def test_wide_activation_uses_int16_at_opset_21() -> None:
    model = one_quantizer_model("Quant", quant_params(0.001, 0.0, 12), {"signed": 1, "narrow": 0})
    result = qlower.convert(model, opset=21, batches=4)
    assert_exact(result)
    assert initializer(result, "/zero_zero_point").dtype == np.int16
    assert lowered_ops(result)["Clip"] == 1  # in float, before QuantizeLinear
    assert record(result)["lowered_by"] == "activation_qcdq"


def test_wide_activation_below_opset_21_takes_the_float_path() -> None:
    model = one_quantizer_model("Quant", quant_params(0.001, 0.0, 12), {"signed": 1, "narrow": 0})
    result = qlower.convert(model, batches=4)
    assert_exact(result)
    rec = record(result)
    assert rec["lowered_by"] == "quant_float_path" and rec["float_path"]
    assert any(s["pass"] == "activation_qcdq" and "opset 21" in s["reason"] for s in rec["skipped"])


def test_int16_float_clip_bounds_give_the_same_integers() -> None:
    # Values exactly at and just beyond the range ends, where the float clip acts.
    scale = np.float32(0.0037)
    model = one_quantizer_model("Quant", quant_params(scale, 0.0, 10), {"signed": 1, "narrow": 1}, x_shape=(64,))
    edge = np.array([-511, 511, -512, 512, -511.5, 511.5, -600, 600], np.float32) * scale
    x = np.resize(np.concatenate([edge, np.nextafter(edge, np.float32(0)), np.nextafter(edge, np.float32(1e9))]), 64).astype(np.float32)
    assert_exact(qlower.convert(model, opset=21, inputs=[{"x": x}]))


# ---- quant_float_path ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["FLOOR", "CEIL", "UP", "DOWN", "HALF_UP", "HALF_DOWN"])
def test_non_round_activation_modes_are_exact(mode: str) -> None:
    model = one_quantizer_model("Quant", quant_params(0.25, 2.0, 5), {"signed": 1, "narrow": 0, "rounding_mode": mode})
    ties = (np.arange(-48, 48, dtype=np.float32) * np.float32(0.5) + np.float32(0.125)).astype(np.float32)
    result = qlower.convert(model, inputs=[{"x": np.resize(ties, (2, 3, 4, 4)).astype(np.float32)}], batches=4)
    assert_exact(result)
    assert record(result)["lowered_by"] == "quant_float_path"
    assert not lowered_ops(result)["QuantizeLinear"]


# ---- fold_constant_quantizer ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["ROUND", "FLOOR", "HALF_UP"])
def test_weight_folds_to_integers_with_any_rounding(mode: str) -> None:
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((4, 5)).astype(np.float32)
    model = one_quantizer_model("Quant", quant_params(0.3, 0.0, 4), {"signed": 1, "narrow": 1, "rounding_mode": mode}, x_shape=(2, 4), weight=weight)
    result = qlower.convert(model, batches=4)
    assert_exact(result)
    ops = lowered_ops(result)
    assert ops["QuantizeLinear"] == 0 and ops["DequantizeLinear"] == 1 and ops["Clip"] == 1
    stored = initializer(result, "/quantized")
    assert stored.dtype == np.int8 and stored.min() >= -7 and stored.max() <= 7


def test_per_channel_conv_weight_axis_0() -> None:
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    scale = np.linspace(0.05, 0.3, 6, dtype=np.float32).reshape(6, 1, 1, 1)
    model = one_quantizer_model("Quant", quant_params(scale, 0.0, 8), {"signed": 1, "narrow": 1}, weight=weight)
    result = qlower.convert(model, batches=4)
    assert_exact(result)
    assert node_attr(result, "DequantizeLinear", "axis") == 0


def test_per_channel_matmul_weight_axis_1() -> None:
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((4, 6)).astype(np.float32)
    scale = np.linspace(0.05, 0.3, 6, dtype=np.float32).reshape(1, 6)
    model = one_quantizer_model("Quant", quant_params(scale, 0.0, 6), {"signed": 1, "narrow": 0}, x_shape=(2, 4), weight=weight)
    result = qlower.convert(model, batches=4)
    assert_exact(result)
    assert node_attr(result, "DequantizeLinear", "axis") == 1


def test_wide_weight_and_bias_fold_to_int32_without_clip() -> None:
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((4, 6)).astype(np.float32)
    model = one_quantizer_model("Quant", quant_params(1e-4, 0.0, 24), {"signed": 1, "narrow": 0}, x_shape=(2, 4), weight=weight)
    result = qlower.convert(model, batches=4)
    assert_exact(result)
    assert initializer(result, "/quantized").dtype == np.int32
    assert lowered_ops(result)["Clip"] == 0


def test_bipolar_weight_folds_to_int8_signs() -> None:
    weight = np.array([[0.0, -1.0, 2.0], [-0.0, 3.0, -4.0]], np.float32)
    model = one_quantizer_model("BipolarQuant", {"s": 0.5}, x_shape=(1, 2), weight=weight)
    result = qlower.convert(model, batches=4)
    assert_exact(result)
    np.testing.assert_array_equal(initializer(result, "/quantized"), [[1, -1, 1], [1, 1, -1]])


# ---- bipolar_activation --------------------------------------------------------------


def test_bipolar_activation_is_a_select() -> None:
    result = qlower.convert(one_quantizer_model("BipolarQuant", {"s": 0.75}), batches=4)
    assert_exact(result)
    assert lowered_ops(result) == Counter({"GreaterOrEqual": 1, "Where": 1})


def test_signed_one_bit_quant_with_zero_point() -> None:
    model = one_quantizer_model("Quant", quant_params(0.5, -1.0, 1), {"signed": 1, "narrow": 0})
    result = qlower.convert(model, batches=4)
    assert_exact(result)
    assert record(result)["lowered_by"] == "bipolar_activation"


# ---- trunc ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["FLOOR", "ROUND", "CEIL"])
def test_trunc_v2_is_exact(mode: str) -> None:
    params = {"s": 0.0625, "z": 0.0, "bi": 12.0, "so": 1.0, "bo": 4.0}
    model = one_quantizer_model("Trunc", params, {"rounding_mode": mode, "signed": 0, "narrow": 0})
    model.opset_import[1].version = 2
    result = qlower.convert(model, batches=8)
    assert_exact(result)
    assert record(result)["lowered_by"] == "trunc_float_ops"


def test_trunc_v1_is_exact() -> None:
    model = one_quantizer_model("Trunc", {"s": 0.125, "z": 0.0, "bi": 10.0, "bo": 6.0}, {"rounding_mode": "FLOOR"})
    result = qlower.convert(model, batches=8)
    assert_exact(result)


# ---- pipeline table ------------------------------------------------------------------


def test_every_pass_declares_its_pattern() -> None:
    for rule in quantizer_passes_for("qcdq"):
        assert rule.name and rule.matches and rule.emits
