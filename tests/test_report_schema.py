"""Every JSON report (convert --report, verify --report, inspect --json) follows qlower/report_schema.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from paths import BREVITAS_DIR, ZOO_DIR
from qlower.report_schema import SCHEMA_VERSION, load_schema
from test_cli import qlower_cli

jsonschema = pytest.importorskip("jsonschema")

EXAMPLE = ZOO_DIR / "TFC_2W2A.onnx"
PER_CHANNEL = BREVITAS_DIR / "conv_w8a8_pc.qonnx.onnx"


@pytest.fixture(scope="module")
def validator() -> "jsonschema.protocols.Validator":
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def assert_valid(validator: "jsonschema.protocols.Validator", payload: dict[str, object], kind: str) -> None:
    errors = sorted(validator.iter_errors(payload), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])
    assert payload["schema"] == SCHEMA_VERSION and payload["kind"] == kind


def test_convert_reports_validate(tmp_path: Path, validator: "jsonschema.protocols.Validator") -> None:
    for target in ("qcdq", "qop"):
        report = tmp_path / f"{target}.json"
        proc = qlower_cli("convert", str(PER_CHANNEL), "--to", target, "-o", str(tmp_path / f"{target}.onnx"),
                          "--report", str(report), "--batches", "2", "-q")
        assert proc.returncode == 0, proc.stderr
        assert_valid(validator, json.loads(report.read_text()), "convert")
    unverified = tmp_path / "unverified.json"
    proc = qlower_cli("convert", str(EXAMPLE), "-o", str(tmp_path / "u.onnx"), "--no-verify", "--report", str(unverified), "-q")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(unverified.read_text())
    assert payload["verification"] is None
    assert_valid(validator, payload, "convert")


def test_verify_reports_validate_passed_and_failed(tmp_path: Path, validator: "jsonschema.protocols.Validator") -> None:
    lowered = tmp_path / "lowered.onnx"
    assert qlower_cli("convert", str(EXAMPLE), "-o", str(lowered), "--no-verify", "-q").returncode == 0
    good = tmp_path / "good.json"
    assert qlower_cli("verify", str(EXAMPLE), str(lowered), "--batches", "2", "--report", str(good), "-q").returncode == 0
    assert_valid(validator, json.loads(good.read_text()), "verify")
    wrong = onnx.load(str(lowered))
    for init in wrong.graph.initializer:
        if init.data_type == TensorProto.FLOAT and not init.dims:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.5), init.name))
    onnx.save(wrong, str(tmp_path / "wrong.onnx"))
    bad = tmp_path / "bad.json"
    proc = qlower_cli("verify", str(EXAMPLE), str(tmp_path / "wrong.onnx"), "--batches", "2", "--report", str(bad), "-q")
    assert proc.returncode == 1
    payload = json.loads(bad.read_text())
    assert payload["passed"] is False and payload["failures"]
    assert_valid(validator, payload, "verify")


@pytest.mark.parametrize("model", [EXAMPLE, PER_CHANNEL], ids=lambda p: p.stem)
def test_inspect_json_validates(model: Path, validator: "jsonschema.protocols.Validator") -> None:
    proc = qlower_cli("inspect", str(model), "--json")
    assert proc.returncode == 0, proc.stderr
    assert_valid(validator, json.loads(proc.stdout), "inspect")


def test_the_schema_rejects_a_report_missing_a_required_field(validator: "jsonschema.protocols.Validator") -> None:
    proc = qlower_cli("inspect", str(EXAMPLE), "--json")
    payload = json.loads(proc.stdout)
    del payload["quantizers"][0]["layout"]
    assert any("layout" in error.message for error in validator.iter_errors(payload))
    payload = json.loads(proc.stdout)
    payload["schema"] = 2
    assert not validator.is_valid(payload)
