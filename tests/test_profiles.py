"""Profiles (SPEC 2.2): the same values in a layout tuned for the runtime that runs the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import qlower
from qlower.profiles import ORT, PORTABLE, PROFILES, emitted_forms, get_profile

import helpers
from ort_kernels import kernel_counts
from paths import BREVITAS_DIR, BREVITAS_MANIFEST, ZOO_MODELS

FIXTURES = [BREVITAS_DIR / f"{entry['name']}.qonnx.onnx" for entry in BREVITAS_MANIFEST]


def nodes_of(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op]


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def exact_at_disable_all(result: qlower.ConversionResult) -> bool:
    rows = [row for row in result.report.verification.outputs if row.level == "ORT_DISABLE_ALL"]
    return bool(rows) and all(row.max_abs_diff == 0 for row in rows)


def test_unknown_profile_and_qop_with_a_qcdq_profile_are_refused() -> None:
    with pytest.raises(qlower.UnsupportedError, match="unknown profile 'trt'"):
        get_profile("trt", "qcdq")
    with pytest.raises(qlower.UnsupportedError, match="applies to --to qcdq, not --to qop"):
        qlower.convert(helpers.make_quant_model(), to="qop", profile="ort", verify_result=False)
    assert get_profile("portable", "qop") is PORTABLE


def test_every_profile_lists_its_emitted_forms() -> None:
    rows = {name: emitted_forms(profile) for name, profile in PROFILES.items()}
    assert len({tuple(forms) for forms in rows.values()}) == 1, "every profile answers the same constructs"
    assert "uint8, zp+128" in rows["ort"]["signed activation, 2..8 bits, zero point 0"]
    assert "int8" in rows["portable"]["signed activation, 2..8 bits, zero point 0"]


def test_ort_profile_stores_signed_activations_as_shifted_uint8() -> None:
    model = helpers.make_quant_model((1, 8), scale=0.25, bit_width=4, signed=1)
    result = qlower.convert(model, profile="ort")
    (quantize,), (clip,), (dequantize,) = (nodes_of(result.model, op) for op in ("QuantizeLinear", "Clip", "DequantizeLinear"))
    assert initializer(result.model, quantize.input[2]).dtype == np.uint8
    assert int(initializer(result.model, quantize.input[2])) == 128
    assert [int(initializer(result.model, name)) for name in clip.input[1:]] == [128 - 8, 128 + 7]
    assert int(initializer(result.model, dequantize.input[2])) == 128
    assert exact_at_disable_all(result)
    assert result.report.to_dict()["profile"]["name"] == "ort"


def test_ort_profile_folds_relu_into_the_integer_clip() -> None:
    model = helpers.make_conv_chain_model(layers=1)
    result = qlower.convert(model, profile="ort")
    assert not nodes_of(result.model, "Relu")
    clips = nodes_of(result.model, "Clip")
    activation_clips = [c for c in clips if initializer(result.model, c.input[1]).dtype == np.uint8]
    # act_0 is the input quantizer (no Relu before it); act_1 follows the Relu: floor at zp 128.
    bounds = sorted(tuple(int(initializer(result.model, name)) for name in c.input[1:]) for c in activation_clips)
    assert bounds == [(120, 135), (128, 135)]
    assert exact_at_disable_all(result)
    portable = qlower.convert(model, verify_result=False).model
    assert len(nodes_of(portable, "Relu")) == 1


def test_ort_profile_stores_wide_weights_as_float() -> None:
    model = helpers.make_qonnx_model("Quant", [0.5, 0.0, 8.0], {"signed": 1, "narrow": 0, "rounding_mode": "ROUND"})
    # a 12-bit weight feeding a MatMul after an 8-bit activation quantizer
    weight = np.random.default_rng(0).normal(0, 100, (8, 4)).astype(np.float32)
    graph = model.graph
    graph.initializer.extend([numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.float32(0.25), "ws"),
                              numpy_helper.from_array(np.float32(0.0), "wz"), numpy_helper.from_array(np.float32(12.0), "wb")])
    graph.node.extend([
        onnx.helper.make_node("Quant", ["w", "ws", "wz", "wb"], ["wq"], name="w_quant", domain=helpers.QONNX_DOMAIN, signed=1, narrow=0),
        onnx.helper.make_node("MatMul", ["y", "wq"], ["z"], name="matmul"),
    ])
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 4]))
    portable = qlower.convert(model, verify_result=False)
    result = qlower.convert(model, profile="ort")
    assert len(nodes_of(portable.model, "DequantizeLinear")) == 2
    assert len(nodes_of(result.model, "DequantizeLinear")) == 1, "the 12-bit weight is a float constant"
    record = next(r for r in result.report.quantizers if r.node == "w_quant")
    assert record.lowered_by == "fold_constant_float"
    assert exact_at_disable_all(result)


def test_ort_profile_runs_every_conv_of_a_signed_4bit_deployment_net_as_an_integer_kernel(tmp_path: Path) -> None:
    model = helpers.make_conv_chain_model(layers=7, bits=4, signed=1)
    portable = qlower.convert(model)
    result = qlower.convert(model, profile="ort")
    assert exact_at_disable_all(portable) and exact_at_disable_all(result)
    assert kernel_counts(portable.model, tmp_path) == (0, 7), "Brevitas's int8 layout never fuses (SPEC 2.2)"
    assert kernel_counts(result.model, tmp_path) == (7, 0)


@pytest.mark.parametrize("path", ZOO_MODELS + FIXTURES, ids=lambda p: p.name.removesuffix(".onnx"))
@pytest.mark.parametrize("profile", [p for p in PROFILES if p != "portable"])
def test_profiles_are_exact_on_zoo_and_brevitas_fixtures(path: Path, profile: str) -> None:
    result = qlower.convert(path, profile=profile, batches=4)
    assert exact_at_disable_all(result)
    assert result.report.verification.passed, result.report.verification.failures
