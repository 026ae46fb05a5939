"""QCDQ input: Brevitas's export_onnx_qcdq files and ONNX Runtime quantizer QDQ files.

Such a model has no QONNX node; the reference is the input model itself, run by ONNX
Runtime at ORT_DISABLE_ALL, and --to qop fuses its Q/DQ units into QLinear operators.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qlower
from paths import BREVITAS_DIR

BREVITAS_QCDQ = sorted(BREVITAS_DIR.glob("*.qcdq.onnx"))
REAL = BREVITAS_DIR / "real"
INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "MatMulInteger")


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


@pytest.mark.parametrize("path", BREVITAS_QCDQ, ids=lambda p: p.name.removesuffix(".qcdq.onnx"))
def test_brevitas_qcdq_export_lowers_to_qop(path: Path) -> None:
    result = qlower.convert(path, "qop", batches=4)
    report = result.report
    assert report.quantizers == []  # nothing QONNX in it: every unit is read from its Q/DQ
    assert report.verification is not None and report.verification.passed
    fused = [unit for unit in report.unit_records if unit["pass"] in ("qlinear_conv", "qlinear_matmul") and unit["became"]]
    assert sum(_ops(result.model)[op] for op in INTEGER_OPS) >= len(fused)


@pytest.mark.parametrize("name", ["deploy_w8a8_bn_merged", "deploy_w4a4_signed"])
def test_brevitas_deployment_net_qcdq_to_seven_qlinearconv(name: str) -> None:
    result = qlower.convert(REAL / f"{name}.qcdq.onnx", "qop", batches=4)
    assert result.report.verification is not None and result.report.verification.passed
    assert _ops(result.model)["QLinearConv"] == 7 and _ops(result.model)["Conv"] == 0
    # The reference is the QCDQ input itself: its outputs' unit is the last DequantizeLinear's step.
    assert all("DequantizeLinear" in output.lsb_source for output in result.report.verification.outputs)


def test_brevitas_qcdq_export_stays_exact_with_qcdq_profiles() -> None:
    path = REAL / "deploy_w4a4_signed.qcdq.onnx"
    for profile in ("portable", "ort", "openvino"):
        result = qlower.convert(path, "qcdq", profile=profile, batches=2)
        assert result.report.verification is not None and result.report.verification.passed
        assert result.report.quantizers == []


def _float_cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def weight(name: str, shape: tuple[int, ...], scale: float) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [
        weight("w1", (8, 3, 3, 3), 0.3), weight("b1", (8,), 0.1), weight("w2", (8, 8, 3, 3), 0.2),
        weight("b2", (8,), 0.1), weight("w3", (10, 8 * 8 * 8), 0.05), weight("b3", (10,), 0.1),
        numpy_helper.from_array(np.array([1, -1], np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Reshape", ["r2", "flat"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(nodes, "float_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_onnxruntime_quantizer_qdq_output_lowers_to_qop(tmp_path: Path, per_channel: bool) -> None:
    quantization = pytest.importorskip("onnxruntime.quantization")
    float_path, qdq_path = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(_float_cnn(), str(float_path))
    rng = np.random.default_rng(1)

    class Calibration(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": rng.uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(8)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantization.quantize_static(
        str(float_path), str(qdq_path), Calibration(), quant_format=quantization.QuantFormat.QDQ,
        per_channel=per_channel, activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
    )
    result = qlower.convert(qdq_path, "qop", batches=4)
    assert result.report.verification is not None and result.report.verification.passed
    ops = _ops(result.model)
    assert ops["QLinearConv"] == 2 and ops["Conv"] == 0
    assert ops["MatMulInteger"] + ops["QLinearMatMul"] == 1 and ops["Gemm"] == 0


def test_inspect_reads_bit_widths_from_qcdq_as_from_qonnx() -> None:
    qonnx_cost = qlower.inspect(REAL / "deploy_w4a4_signed.qonnx.onnx").summary()["cost"]
    qcdq_cost = qlower.inspect(REAL / "deploy_w4a4_signed.qcdq.onnx").summary()["cost"]
    assert qcdq_cost == qonnx_cost == [
        {"activation_bits": 4.0, "weight_bits": 4.0, "units": 7, "macs": 17420288, "weight_params": 287840}
    ]
