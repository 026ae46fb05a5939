"""End to end: the six real QONNX zoo models lower to exact, runnable QCDQ."""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

import qlower
from qlower.ir import is_qonnx_node

from paths import ZOO_MODELS



@pytest.mark.parametrize("path", ZOO_MODELS, ids=lambda p: p.stem)
def test_zoo_model_lowers_to_exact_qcdq(path: Path, tmp_path: Path) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    out = tmp_path / "lowered.onnx"
    result = qlower.convert(path, to="qcdq", output_path=out, batches=16)

    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, "the input file was modified"
    lowered = onnx.load(str(out))
    assert not [n.name for n in lowered.graph.node if is_qonnx_node(n)]
    assert {o.domain for o in lowered.opset_import} <= {"", "ai.onnx"}
    assert max(o.version for o in lowered.opset_import) >= 13
    onnx.checker.check_model(lowered, full_check=True)
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])

    verification = result.report.verification
    assert verification is not None and verification.passed, verification.failures
    assert verification.batches >= 16
    exact = [row for row in verification.outputs if row.level == "ORT_DISABLE_ALL"]
    assert exact and all(row.max_abs_diff == 0 for row in exact)


@pytest.mark.parametrize("path", [p for p in ZOO_MODELS if onnx.load(str(p)).opset_import[0].version < 13], ids=lambda p: p.stem)
def test_old_opset_models_are_really_upgraded(path: Path) -> None:
    lowered = qlower.convert(path, to="qcdq", verify_result=False).model
    assert [o.version for o in lowered.opset_import if o.domain in ("", "ai.onnx")] == [13]
    for node in lowered.graph.node:
        # Unsqueeze/Squeeze take axes as an input from opset 13 on: a model whose number
        # was merely rewritten would still carry the attribute and fail in ONNX Runtime.
        if node.op_type in ("Unsqueeze", "Squeeze"):
            assert not any(a.name == "axes" for a in node.attribute), node.name
    onnx.checker.check_model(lowered, full_check=True)
