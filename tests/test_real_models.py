"""Real Brevitas models (tests/fixtures/brevitas/real, made by generate_real.py there).

MobileNet v1 4b, bnn_pynq CNV 2w2a, a bnn_pynq-style ResNet-18 4w4a and the two 7-conv
deployment nets: qlower's QCDQ lowering of each QONNX export must verify exactly at
ORT_DISABLE_ALL, compute what Brevitas computed in torch, and, where Brevitas's own QCDQ
export computes the same function, give identical ONNX Runtime outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import qlower
from qlower.pipeline import ConversionResult

from paths import REAL_DIR, REAL_MANIFEST

QUANTIZER_OPS = {"Quant", "BipolarQuant", "Trunc", "FloatQuant", "QuantizeLinear", "DequantizeLinear"}


def _run_unoptimized(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _data_input(model: onnx.ModelProto) -> str:
    constants = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in constants)


@pytest.fixture(scope="module", params=REAL_MANIFEST, ids=lambda e: e["name"])
def lowered(request: pytest.FixtureRequest) -> tuple[dict, np.ndarray, ConversionResult]:
    entry = request.param
    x = np.load(REAL_DIR / entry["input"])
    source = onnx.load(str(REAL_DIR / entry["qonnx"]))
    return entry, x, qlower.convert(source, to="qcdq", inputs=[{_data_input(source): x}], batches=1)


def test_qcdq_verifies_exactly(lowered: tuple) -> None:
    _, _, result = lowered
    verification = result.report.verification
    assert verification is not None and verification.passed, verification.failures
    exact = [row for row in verification.outputs if row.level == "ORT_DISABLE_ALL"]
    assert exact and all(row.max_abs_diff == 0 for row in exact)
    assert not [n for n in result.model.graph.node if n.domain not in ("", "ai.onnx")]


def test_qcdq_computes_what_brevitas_computed_in_torch(lowered: tuple) -> None:
    entry, x, result = lowered
    expected = np.load(REAL_DIR / entry["torch_output"])
    # float ops (BatchNorm, residual Add, the float first conv) may round differently
    np.testing.assert_allclose(_run_unoptimized(result.model, x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "entry", [e for e in REAL_MANIFEST if e["qcdq"] and "Trunc" not in e["qonnx_ops"]], ids=lambda e: e["name"])
def test_qcdq_matches_brevitas_qcdq_export(entry: dict) -> None:
    # Models with a TruncAvgPool are left out: Brevitas exports it as a float AveragePool
    # and a round-half-even Q/DQ, which is a different function for FLOOR truncation (SPEC 5).
    x = np.load(REAL_DIR / entry["input"])
    ours = qlower.convert(onnx.load(str(REAL_DIR / entry["qonnx"])), to="qcdq", verify_result=False).model
    np.testing.assert_array_equal(_run_unoptimized(ours, x), _run_unoptimized(str(REAL_DIR / entry["qcdq"]), x))


@pytest.mark.parametrize("entry", REAL_MANIFEST, ids=lambda e: e["name"])
def test_float_architecture_is_plain_onnx(entry: dict) -> None:
    assert entry["float"], entry["float_refused"]
    model = onnx.load(str(REAL_DIR / entry["float"]))
    assert not QUANTIZER_OPS & {n.op_type for n in model.graph.node}
    x = np.load(REAL_DIR / entry["input"])
    assert _run_unoptimized(str(REAL_DIR / entry["float"]), x).shape == np.load(REAL_DIR / entry["torch_output"]).shape
