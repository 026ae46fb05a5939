"""Brevitas conformance: qlower on Brevitas's QONNX export vs Brevitas's own QCDQ export.

The fixtures in tests/fixtures/brevitas were made by generate.py there (torch + brevitas,
random weights). For every fixture, qlower's lowering of the QONNX export must verify
exactly; where Brevitas could also export QCDQ, qlower must emit the same number of
QuantizeLinear/Clip/DequantizeLinear nodes and identical ONNX Runtime outputs.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import qlower
from qlower.reference import ReferenceExecutor

from paths import BREVITAS_DIR, BREVITAS_MANIFEST

QCDQ_OPS = ("QuantizeLinear", "Clip", "DequantizeLinear")


def _run_unoptimized(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _qcdq_counts(model: onnx.ModelProto, skip_prefixes: tuple[str, ...] = ()) -> tuple[int, ...]:
    counts = Counter(n.op_type for n in model.graph.node if not n.name.startswith(skip_prefixes))
    return tuple(counts[op] for op in QCDQ_OPS)


def _data_input(model: onnx.ModelProto) -> str:
    constants = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in constants)


def _trunc_nodes(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "Trunc"]


@pytest.mark.parametrize("entry", BREVITAS_MANIFEST, ids=lambda e: e["name"])
def test_qonnx_export_lowers_exactly(entry: dict) -> None:
    x = np.load(BREVITAS_DIR / entry["input"])
    source = onnx.load(str(BREVITAS_DIR / entry["qonnx"]))
    result = qlower.convert(source, to="qcdq", inputs=[{_data_input(source): x}], batches=8)
    verification = result.report.verification
    assert verification is not None and verification.passed, verification.failures
    assert all(row.max_abs_diff == 0 for row in verification.outputs if row.level == "ORT_DISABLE_ALL")
    assert not [n for n in result.model.graph.node if n.domain not in ("", "ai.onnx")]


@pytest.mark.parametrize("entry", [e for e in BREVITAS_MANIFEST if e["qcdq"]], ids=lambda e: e["name"])
def test_layout_and_outputs_match_brevitas_qcdq(entry: dict) -> None:
    x = np.load(BREVITAS_DIR / entry["input"])
    source = onnx.load(str(BREVITAS_DIR / entry["qonnx"]))
    theirs = onnx.load(str(BREVITAS_DIR / entry["qcdq"]))
    ours = qlower.convert(source, to="qcdq", verify_result=False).model
    truncs = _trunc_nodes(source)
    if not truncs:
        assert _qcdq_counts(ours) == _qcdq_counts(theirs)
        np.testing.assert_array_equal(_run_unoptimized(ours, x), _run_unoptimized(theirs, x))
        return
    # Brevitas exports TruncAvgPool2d as AveragePool -> QuantizeLinear -> DequantizeLinear
    # (one Q/DQ pair, no Clip at full 8-bit range), which rounds half-to-even whatever the
    # Trunc's rounding mode: with FLOOR it is one LSB off the QONNX semantics at ties
    # (SPEC 5). qlower lowers the Trunc to exact float ops instead, so the layouts agree
    # outside the Trunc, and the outputs are held to the reference, not to Brevitas.
    q, clip, dq = _qcdq_counts(theirs)
    assert _qcdq_counts(ours, skip_prefixes=tuple(truncs)) == (q - len(truncs), clip, dq - len(truncs))
    reference = ReferenceExecutor(source).run({_data_input(source): x})
    expected = next(iter(reference.values()))
    np.testing.assert_array_equal(_run_unoptimized(ours, x), expected)
    floor_truncs = [
        n for n in source.graph.node
        if n.op_type == "Trunc" and any(a.name == "rounding_mode" and a.s.upper() == b"FLOOR" for a in n.attribute)
    ]
    if floor_truncs:
        assert not np.array_equal(_run_unoptimized(theirs, x), expected), "Brevitas's FLOOR Trunc export became exact; revisit this test"
