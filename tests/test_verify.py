"""The verifier: random inputs, user inputs, LSB measurement, and the pass/fail rules."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qlower
from helpers import QONNX_DOMAIN, make_qonnx_model, make_quant_model
from qlower.errors import ModelLoadError, UnsupportedError, VerificationError
from qlower.verification import OPTIMIZED, UNOPTIMIZED, load_inputs_npz, make_inputs, verify

F32 = np.float32


def _model(nodes: list, inputs: list, outputs: list, initializers: list, opset: int = 13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(QONNX_DOMAIN, 1)])
    model.ir_version = 8
    return model


def _const(name: str, value: object, dtype: type = F32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _qdq_model(
    scale: float = 0.5, zero_point: int = 0, dq_scale: float | None = None, dq_zero_point: int | None = None
) -> onnx.ModelProto:
    """A hand-lowered 8-bit signed Quant: ``y = DequantizeLinear(QuantizeLinear(x))``, [1, 8]."""
    return _model(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s_dq", "zp_dq"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [
            _const("s", scale),
            _const("zp", zero_point, np.int8),
            _const("s_dq", scale if dq_scale is None else dq_scale),
            _const("zp_dq", zero_point if dq_zero_point is None else dq_zero_point, np.int8),
        ],
    )


# ---------------------------------------------------------------------------------------
# Pass / fail


def test_a_standard_model_verifies_against_itself() -> None:
    rng = np.random.default_rng(0)
    model = _model(
        [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Relu", ["a"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_const("W", rng.standard_normal((6, 3)))],
    )
    report = verify(model, model, batches=4)
    assert report.passed, report.failures
    exact, optimized = report.outputs
    assert (exact.name, exact.level, optimized.level) == ("y", UNOPTIMIZED, OPTIMIZED)
    assert exact.max_abs_diff == 0 and exact.differing_share == 0
    # Optimized, ORT prepacks the constant weight and may sum in another order: a few
    # float32 ulps, far below the float unit (2^-16 of the largest value).
    assert optimized.max_lsb_diff is None and optimized.max_unit_diff < 0.1
    assert optimized.lsb_source.startswith("no quantizer on or upstream")


def test_a_correct_qcdq_lowering_is_bit_identical() -> None:
    report = verify(make_quant_model(scale=0.5), _qdq_model(0.5), batches=8, seed=3)
    assert report.passed, report.failures
    exact = next(row for row in report.outputs if row.level == UNOPTIMIZED)
    assert exact.max_abs_diff == 0 and exact.max_lsb_diff == 0 and exact.rule == "bit-identical"
    assert exact.lsb_source == "Quant 'Quant_0': scale 0.5"
    assert report.batches == 8 and report.seed == 3 and report.target == "qcdq"


def test_a_one_lsb_shift_fails_exactness_and_names_the_output() -> None:
    # DequantizeLinear with zero point 1 instead of 0: every value one step low.
    report = verify(make_quant_model(scale=0.5), _qdq_model(0.5, dq_zero_point=1), batches=4)
    assert not report.passed
    assert report.failures[0].startswith(f"output 'y' at {UNOPTIMIZED}: ")
    assert "must be bit-identical" in report.failures[0]
    rows = {row.level: row for row in report.outputs}
    assert rows[UNOPTIMIZED].max_abs_diff == 0.5 and rows[UNOPTIMIZED].max_lsb_diff == 1.0
    assert rows[UNOPTIMIZED].differing_share == 1.0 and not rows[UNOPTIMIZED].passed
    # One LSB is within the default tolerance where exactness is not required.
    assert rows[OPTIMIZED].passed and rows[OPTIMIZED].max_lsb_diff == 1.0
    with pytest.raises(VerificationError, match=f"^output 'y' at {UNOPTIMIZED}: "):
        report.raise_if_failed()


@pytest.mark.parametrize("scale", [0.37, 0.0123])
def test_a_one_lsb_flip_counts_as_exactly_one_lsb(scale: float) -> None:
    # (q - 1) * s and q * s are each rounded to float32, so their difference is not exactly
    # s; a whole number of steps up to that rounding counts as that number.
    report = verify(make_quant_model(scale=scale), _qdq_model(scale, dq_zero_point=1), batches=8)
    assert [row.max_lsb_diff for row in report.outputs] == [1.0, 1.0]
    assert report.outputs[1].passed


def test_qop_is_held_to_the_tolerance_at_both_levels() -> None:
    shifted = _qdq_model(0.5, dq_zero_point=1)
    assert verify(make_quant_model(scale=0.5), shifted, target="qop", batches=2).passed
    report = verify(make_quant_model(scale=0.5), shifted, target="qop", batches=2, tolerance_lsb=0.5)
    assert [line.split(":")[0] for line in report.failures] == [f"output 'y' at {UNOPTIMIZED}", f"output 'y' at {OPTIMIZED}"]
    assert "exceeds the tolerance <= 0.5 LSB" in report.failures[0]


def test_a_wrong_scale_fails_in_lsb_units() -> None:
    report = verify(make_quant_model(scale=0.5), _qdq_model(0.5, dq_scale=0.53), batches=4)
    rows = {row.level: row for row in report.outputs}
    assert not rows[OPTIMIZED].passed and rows[OPTIMIZED].max_lsb_diff > 1
    assert any(line.startswith(f"output 'y' at {OPTIMIZED}") for line in report.failures)


def test_an_unloadable_lowered_model_is_a_failed_verification() -> None:
    model = make_quant_model()  # still has the QONNX op: ORT cannot load it
    report = verify(model, model, batches=1)
    assert not report.passed and not report.outputs
    assert report.failures[0].startswith(f"lowered model at {UNOPTIMIZED}: ONNX Runtime cannot load it: ")
    assert "\n" not in report.failures[0]


def test_missing_outputs_and_shape_mismatches_are_failures() -> None:
    lowered = _qdq_model()
    lowered.graph.node[1].output[0] = lowered.graph.output[0].name = "other"
    report = verify(make_quant_model(scale=0.5), lowered, batches=1)
    assert report.failures == ["output 'y': missing from the lowered model"]

    flat = _qdq_model()
    flat.graph.node[1].output[0] = "y0"
    flat.graph.node.append(helper.make_node("Flatten", ["y0"], ["y"], axis=2))
    report = verify(make_quant_model(scale=0.5), flat, batches=1, check_optimized=False)
    assert report.failures == [f"output 'y' at {UNOPTIMIZED}: got float32[8, 1], the reference is float32[1, 8]"]
    assert report.outputs[0].note is not None and report.outputs[0].max_abs_diff == float("inf")


def test_report_serializes_to_strict_json() -> None:
    report = verify(make_quant_model(scale=0.5), _qdq_model(0.5, dq_zero_point=1), batches=1)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["passed"] is False and data["outputs"][0]["name"] == "y" and data["failures"]


# ---------------------------------------------------------------------------------------
# Units: grids, per-channel steps, float heads


def _per_row(tail: list, lowered: bool) -> onnx.ModelProto:
    """Quant with per-row scales [0.25, 0.5, 1] on x [3, 4], then ``tail`` nodes from "q" to "y".

    The lowered form uses QuantizeLinear/DequantizeLinear on axis 0 with the dequantizing
    zero point shifted by one: every element is exactly one step of its own row low.
    """
    scale = np.array([0.25, 0.5, 1.0], dtype=F32)
    if lowered:
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q8"], axis=0),
            helper.make_node("DequantizeLinear", ["q8", "s", "zp1"], ["q"], axis=0),
        ]
        inits = [_const("s", scale), _const("zp", [0, 0, 0], np.int8), _const("zp1", [1, 1, 1], np.int8)]
    else:
        nodes = [helper.make_node("Quant", ["x", "s", "zp", "b"], ["q"], domain=QONNX_DOMAIN)]
        inits = [_const("s", scale.reshape(3, 1)), _const("zp", 0), _const("b", 8)]
    inits.append(_const("shape", [12], np.int64))
    return _model(
        nodes + tail,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )


def test_per_channel_lsb_is_elementwise_while_the_axis_stays() -> None:
    tail = [helper.make_node("Identity", ["q"], ["y"])]
    report = verify(_per_row(tail, False), _per_row(tail, True), batches=2, check_optimized=False)
    row = report.outputs[0]
    assert "per-channel scales [3, 1]" in row.lsb_source
    assert row.max_lsb_diff == 1.0  # one step of each row, not 4 steps of the finest row


def test_per_channel_lsb_is_the_finest_step_after_a_reshape() -> None:
    tail = [helper.make_node("Reshape", ["q", "shape"], ["y"])]
    report = verify(_per_row(tail, False), _per_row(tail, True), batches=2, check_optimized=False)
    assert report.outputs[0].max_lsb_diff == 4.0  # the 1.0-step row measured in 0.25 steps


def _float_head(weight: np.ndarray) -> onnx.ModelProto:
    """x -> Quant (4-bit, scale 0.25) -> MatMul(W) -> y: an output with no grid."""
    return _model(
        [
            helper.make_node("Quant", ["x", "s", "zp", "b"], ["q"], domain=QONNX_DOMAIN, narrow=0, signed=1),
            helper.make_node("MatMul", ["q", "W"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_const("s", 0.25), _const("zp", 0), _const("b", 4), _const("W", weight)],
    )


def _float_head_lowered(weight: np.ndarray, flip: bool = False) -> onnx.ModelProto:
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q8"]),
        helper.make_node("Clip", ["q8", "lo", "hi"], ["qc"]),
        helper.make_node("DequantizeLinear", ["qc", "s", "zp"], ["q"]),
        helper.make_node("MatMul", ["q", "W"], ["y"]),
    ]
    inits = [_const("s", 0.25), _const("zp", 0, np.int8), _const("lo", -8, np.int8), _const("hi", 7, np.int8)]
    inits.append(_const("W", -weight if flip else weight))
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )


def test_a_float_head_is_measured_by_the_upstream_probe() -> None:
    weight = np.random.default_rng(0).standard_normal((16, 5)).astype(F32)
    good = verify(_float_head(weight), _float_head_lowered(weight), target="qop", batches=4)
    assert good.passed, good.failures
    row = good.outputs[0]
    assert row.max_lsb_diff is None and "no grid on this output" in row.lsb_source and "'Quant#0'" in row.lsb_source
    bad = verify(_float_head(weight), _float_head_lowered(weight, flip=True), target="qop", batches=4)
    assert not bad.passed
    assert bad.failures[0].startswith(f"output 'y' at {UNOPTIMIZED}:") and "x unit" in bad.failures[0]


# ---------------------------------------------------------------------------------------
# Random inputs


def _annotated(datatype: str) -> onnx.ModelProto:
    model = make_qonnx_model("BipolarQuant", [1.0], shape=("batch", 64))
    annotation = onnx.TensorAnnotation(tensor_name="x")
    annotation.quant_parameter_tensor_names.add(key="finn_datatype", value=datatype)
    model.graph.quantization_annotation.append(annotation)
    return model


@pytest.mark.parametrize(
    ("datatype", "allowed"),
    [("BIPOLAR", {-1, 1}), ("BINARY", {0, 1}), ("TERNARY", {-1, 0, 1}), ("INT3", set(range(-4, 4))), ("UINT2", {0, 1, 2, 3})],
)
def test_make_inputs_honours_datatype_annotations(datatype: str, allowed: set[int]) -> None:
    batches = make_inputs(_annotated(datatype), 3, seed=0)
    assert len(batches) == 3
    values = np.concatenate([batch["x"].ravel() for batch in batches])
    assert batches[0]["x"].shape == (1, 64) and batches[0]["x"].dtype == np.float32  # symbolic dim -> 1
    assert set(values.tolist()) == allowed


def test_make_inputs_draws_on_the_first_quantizers_grid_with_exact_ties() -> None:
    # x -> Mul 2 -> Sub 1 -> Quant(scale 0.1, zero point 3, 4 bits unsigned): the draw is made
    # in the quantizer's domain and mapped back through the affine ops.
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["m"]),
        helper.make_node("Sub", ["m", "one"], ["t"]),
        helper.make_node("Quant", ["t", "s", "zp", "b"], ["y"], domain=QONNX_DOMAIN, signed=0),
    ]
    inits = [_const("two", 2), _const("one", 1), _const("s", 0.1), _const("zp", 3), _const("b", 4)]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    x = make_inputs(model, 1, seed=0)[0]["x"]
    t = (x * F32(2) - F32(1)) / F32(0.1) + F32(3)
    assert -2.5 <= t.min() and t.max() <= 17.5  # [q_min - 2, q_max + 2] = [-2, 17]
    share_ties = np.mean(np.abs(t - np.floor(t) - 0.5) < 1e-4)
    share_grid = np.mean(np.abs(t - np.rint(t)) < 1e-4)
    assert 0.15 < share_ties < 0.35 and 0.15 < share_grid < 0.4


def test_make_inputs_is_deterministic_and_falls_back_to_normal() -> None:
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1000])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [],
    )
    first, again, other = make_inputs(model, 2, 7), make_inputs(model, 2, 7), make_inputs(model, 2, 8)
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(first, again))
    assert not np.array_equal(first[0]["x"], other[0]["x"])
    assert abs(float(first[0]["x"].std()) - 1) < 0.1


def test_make_inputs_needs_a_shape() -> None:
    model = make_quant_model()
    model.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(UnsupportedError, match="model input 'x' has no declared shape"):
        make_inputs(model, 1, 0)


# ---------------------------------------------------------------------------------------
# User inputs


def test_load_inputs_npz_round_trip(tmp_path: Path) -> None:
    model = make_quant_model(shape=(1, 8))
    one = np.linspace(-2, 2, 8, dtype=F32).reshape(1, 8)
    np.savez(tmp_path / "one.npz", x=one)
    loaded = load_inputs_npz(tmp_path / "one.npz")
    assert len(loaded) == 1 and np.array_equal(loaded[0]["x"], one)
    assert np.array_equal(load_inputs_npz(tmp_path / "one.npz", model)[0]["x"], one)

    stacked = np.stack([one, one * 2, one * 3])  # a leading batch-of-batches axis
    np.savez(tmp_path / "three.npz", x=stacked)
    batches = load_inputs_npz(tmp_path / "three.npz", model)
    assert [b["x"].tolist() for b in batches] == [a.tolist() for a in stacked]
    report = verify(model, _qdq_model(0.5), inputs=batches)
    assert report.passed and report.batches == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not a readable .npz archive"),
        (b"not numpy at all", "not a readable .npz archive"),
        ("npy", "a single .npy array"),
        ({"z": np.zeros((1, 8), F32)}, "no array for model input 'x'"),
        ({"x": np.zeros((1, 8), F32), "extra": np.zeros(1)}, "array 'extra' is not a model input"),
        ({"x": np.zeros(8, F32)}, "has shape \\[8\\]; the input has rank 2"),
    ],
)
def test_load_inputs_npz_errors(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "inputs.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "npy":
        with open(path, "wb") as stream:
            np.save(stream, np.zeros(3))
    elif isinstance(content, dict):
        np.savez(path, **content)
    with pytest.raises(ModelLoadError, match=message):
        load_inputs_npz(path, make_quant_model(shape=(1, 8)))


def test_verify_checks_given_inputs() -> None:
    model, lowered = make_quant_model(shape=(1, 8)), _qdq_model(0.5)
    with pytest.raises(ModelLoadError, match="batch 0 has no array for model input 'x'"):
        verify(model, lowered, inputs=[{"y": np.zeros((1, 8), F32)}])
    with pytest.raises(ModelLoadError, match=r"input 'x' has shape \[2, 8\], the model wants \[1, 8\]"):
        verify(model, lowered, inputs=[{"x": np.zeros((2, 8), F32)}])
    with pytest.raises(ModelLoadError, match="does not convert exactly to float32"):
        verify(model, lowered, inputs=[{"x": np.full((1, 8), 0.1, dtype=np.float64)}])
    # float64 values that are exact in float32 are accepted and cast.
    assert verify(model, lowered, inputs=[{"x": np.full((1, 8), 0.25, dtype=np.float64)}]).passed


# ---------------------------------------------------------------------------------------
# A known ONNX Runtime pitfall (SPEC 4) must surface


def test_a_qgemm_that_ignores_the_bias_scale_fails_when_optimized() -> None:
    # x -> Quant(u6) -> MatMul(Quant(W, s6)) -> Add(Quant(bias)) -> Relu -> Quant(u6). The
    # lowering keeps the bias as int32 DQ with its own scale 0.03125; ORT_ENABLE_ALL fuses
    # the unit into QGemm, which reads the int32 bias as if its scale were s_x * s_w
    # (ORT 1.30-1.32): exact unoptimized, many LSB off optimized.
    rng = np.random.default_rng(0)
    weight = rng.integers(-31, 32, (16, 8)).astype(np.int8)
    bias = rng.integers(-20, 21, 8).astype(np.int32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    act = {"signed": 0, "narrow": 0}
    original = _model(
        [
            helper.make_node("Quant", ["x", "sa", "zero", "b6"], ["xa"], domain=QONNX_DOMAIN, **act),
            helper.make_node("Quant", ["w", "sw", "zero", "b6"], ["wq"], domain=QONNX_DOMAIN),
            helper.make_node("MatMul", ["xa", "wq"], ["m"]),
            helper.make_node("Quant", ["bias", "sw", "zero", "b16"], ["bq"], domain=QONNX_DOMAIN),
            helper.make_node("Add", ["m", "bq"], ["a"]),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("Quant", ["r", "sa", "zero", "b6"], ["y"], domain=QONNX_DOMAIN, **act),
        ],
        [x], [y],
        [_const("sa", 0.015625), _const("sw", 0.03125), _const("zero", 0), _const("b6", 6), _const("b16", 16),
         _const("w", weight.astype(F32) * F32(0.03125)), _const("bias", bias.astype(F32) * F32(0.03125))],
    )
    lowered = _model(
        [
            helper.make_node("QuantizeLinear", ["x", "sa", "za"], ["xq"]),
            helper.make_node("Clip", ["xq", "lo", "hi"], ["xc"]),
            helper.make_node("DequantizeLinear", ["xc", "sa", "za"], ["xa"]),
            helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wq"]),
            helper.make_node("MatMul", ["xa", "wq"], ["m"]),
            helper.make_node("DequantizeLinear", ["bias", "sw", "zb"], ["bq"]),
            helper.make_node("Add", ["m", "bq"], ["a"]),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("QuantizeLinear", ["r", "sa", "za"], ["rq"]),
            helper.make_node("Clip", ["rq", "lo", "hi"], ["rc"]),
            helper.make_node("DequantizeLinear", ["rc", "sa", "za"], ["y"]),
        ],
        [x], [y],
        [_const("sa", 0.015625), _const("sw", 0.03125), _const("za", 0, np.uint8), _const("zw", 0, np.int8),
         _const("zb", 0, np.int32), _const("lo", 0, np.uint8), _const("hi", 63, np.uint8),
         numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "bias")],
    )
    report = verify(original, lowered, batches=4)
    rows = {row.level: row for row in report.outputs}
    assert rows[UNOPTIMIZED].passed and rows[UNOPTIMIZED].max_abs_diff == 0
    assert not rows[OPTIMIZED].passed and rows[OPTIMIZED].max_lsb_diff > 8
    assert report.failures[0].startswith(f"output 'y' at {OPTIMIZED}: ")


def test_an_output_that_is_nan_everywhere_compares_without_warnings() -> None:
    """Sqrt of a negative quantized value is NaN in both models; the probe (one step up or
    down stays negative) measures no change, and that must not warn 'All-NaN slice'."""
    original = make_quant_model((1, 8), scale=0.5, bit_width=4.0)
    original.graph.node[0].output[0] = "q"
    original.graph.node.append(helper.make_node("Sqrt", ["q"], ["y"], name="sqrt"))
    lowered = qlower.convert(original, verify_result=False).model
    inputs = [{"x": np.full((1, 8), -2.0, F32)}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = verify(original, lowered, target="qop", inputs=inputs)
    assert report.passed, report.failures
    assert all(record.max_abs_diff == 0 for record in report.outputs)  # NaN equals NaN


def test_a_difference_against_an_all_zero_float_output_is_infinite_units() -> None:
    """A float output whose reference is zero everywhere has a zero unit; any difference is
    infinitely many units and must be reported as inf, not as the largest float."""
    def scaled(factor: float) -> onnx.ModelProto:
        return _model(
            [helper.make_node("Mul", ["x", "k"], ["y"])],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
            [_const("k", factor)],
        )

    report = verify(scaled(0.0), scaled(1e-30), target="qop", check_optimized=False, batches=1)
    assert not report.passed
    assert report.outputs[0].max_unit_diff == float("inf")
    assert report.to_dict()["outputs"][0]["max_unit_diff"] == "inf"


def test_probe_unit_does_not_collapse_when_random_signs_cancel() -> None:
    """y = Quant_a(x) + Quant_b(x) on one element. Random signs move a and b by +1 and -1
    step half of the time, y does not move, and the unit fell to the float unit: a lowered
    model one step off in a measured as thousands of units. Moving a alone gives 1 step."""
    domain = QONNX_DOMAIN
    params = [_const(n, v) for n, v in (("s", 0.1), ("z", 0.0), ("bits", 4.0))]
    original = _model(
        [
            helper.make_node("Quant", ["x", "s", "z", "bits"], ["a"], name="quant_a", domain=domain, signed=0),
            helper.make_node("Quant", ["x", "s", "z", "bits"], ["b"], name="quant_b", domain=domain, signed=0),
            helper.make_node("Add", ["a", "b"], ["y"], name="add"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        params,
    )
    lowered = qlower.convert(original, verify_result=False).model
    # quant_a's DequantizeLinear one step low (a new zero point: equal constants are shared)
    dequantize = next(node for node in lowered.graph.node if node.name.startswith("quant_a") and node.op_type == "DequantizeLinear")
    lowered.graph.initializer.append(numpy_helper.from_array(np.array(1, np.uint8), "quant_a/one_step_low"))
    dequantize.input[2] = "quant_a/one_step_low"
    report = verify(original, lowered, target="qop", check_optimized=False, batches=16)
    assert report.passed, report.failures
    # y is held to its unit-local reference (computed from the lowered a): the probe unit
    # itself is what must not collapse, one step of a at least in every batch
    from qlower.reference import ReferenceExecutor
    from qlower.verification.graph import GraphIndex
    from qlower.verification.units import output_unit, probe

    reference = ReferenceExecutor(original)
    units = {"y": output_unit(GraphIndex.of(original), "y")}
    for number, feeds in enumerate(make_inputs(original, 16, 0)):
        unit = float(probe(reference, feeds, reference.run(feeds), units, np.random.default_rng([0, number]))["y"])
        assert 0.1 - 1e-6 <= unit <= 0.2 + 1e-6
