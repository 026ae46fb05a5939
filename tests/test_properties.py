"""Properties every conversion must have, whatever the model.

* The input is never modified (file bytes, or the ModelProto passed to the API).
* The output is byte-identical across runs, also across processes with different hash
  seeds (no set/dict-order or id()-dependent names).
* Conversion is idempotent, and byte for byte: converting a lowered model again returns the
  same bytes. Byte identity (not just the same nodes) is the useful promise: CI can run
  qlower over a folder that mixes QONNX and already-lowered models, and content-hash
  caches see no change. It holds because every name qlower emits derives from the
  quantizer it replaces, the pipeline keeps the weight range-marker Clip it emitted
  (instead of folding it on the second pass), and a model without QONNX ops goes through
  the same normalize/export path as the first pass's result did.
* The output is written atomically: a failure during verification or while saving leaves
  no partial or temporary file, and a pre-existing output file untouched.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings

import qlower
import qlower.output
import qlower.verification
from qlower.errors import InvalidQuantizerError, OutputError, VerificationError
from qlower.verification import VerificationReport

from fuzz_graphs import FuzzCase, fuzz_cases
from paths import BREVITAS_DIR, ZOO_DIR

TESTS = Path(__file__).resolve().parent
MODELS = [
    ZOO_DIR / "TFC_2W2A.onnx",
    BREVITAS_DIR / "conv_w8a8_pc.qonnx.onnx",
    BREVITAS_DIR / "residual_add.qonnx.onnx",
    BREVITAS_DIR / "trunc_avgpool.qonnx.onnx",
]
TARGETS = ("qcdq", "qop")
FUZZ = settings(max_examples=40, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SENTINEL = b"a previous output that must survive a failed conversion\n"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qlower", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def ids(path: Path) -> str:
    return path.name


# ---- the input is never modified --------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("model", MODELS, ids=ids)
def test_input_file_unchanged_api(model: Path, target: str, tmp_path: Path) -> None:
    before, mtime = sha256(model), model.stat().st_mtime_ns
    qlower.convert(model, to=target, output_path=tmp_path / "out.onnx", batches=2)
    assert sha256(model) == before and model.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("target", TARGETS)
def test_input_file_unchanged_cli(target: str, tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes((BREVITAS_DIR / "conv_w8a8_pc.qonnx.onnx").read_bytes())
    before = sha256(model)
    proc = cli("convert", str(model), "--to", target, "-o", str(tmp_path / "out.onnx"), "--batches", "2", "-q")
    assert proc.returncode == 0, proc.stderr
    assert sha256(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "out.onnx"]


@FUZZ
@given(fuzz_cases())
def test_input_proto_unchanged(case: FuzzCase) -> None:
    before = case.model.SerializeToString()
    for target in TARGETS:
        qlower.convert(case.model, to=target, opset=case.opset, verify_result=False)
        assert case.model.SerializeToString() == before


# ---- deterministic output ---------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_output_identical_across_processes(target: str, tmp_path: Path) -> None:
    """Two CLI runs with different PYTHONHASHSEED write byte-identical files."""
    for model in (ZOO_DIR / "TFC_2W2A.onnx", BREVITAS_DIR / "residual_add.qonnx.onnx"):
        outputs = []
        for seed in ("1", "2"):
            out = tmp_path / f"{model.stem}.{seed}.onnx"
            proc = cli("convert", str(model), "--to", target, "-o", str(out), "--batches", "2", "-q", env={"PYTHONHASHSEED": seed})
            assert proc.returncode == 0, proc.stderr
            outputs.append(out.read_bytes())
        assert outputs[0] == outputs[1], f"{model.name} --to {target} differs between runs"


@FUZZ
@given(fuzz_cases())
def test_output_identical_across_runs(case: FuzzCase) -> None:
    for target in TARGETS:
        first = qlower.convert(case.model, to=target, opset=case.opset, verify_result=False).model
        second = qlower.convert(case.model, to=target, opset=case.opset, verify_result=False).model
        assert first.SerializeToString() == second.SerializeToString()


# ---- idempotence ------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("model", MODELS, ids=ids)
def test_idempotent_on_fixtures(model: Path, target: str) -> None:
    """convert(convert(m)) == convert(m), byte for byte, and the second conversion verifies."""
    once = qlower.convert(model, to=target, batches=2)
    twice = qlower.convert(once.model, to=target, batches=2)
    assert twice.model.SerializeToString() == once.model.SerializeToString()
    assert twice.report.quantizers == []
    assert twice.report.verification is not None and twice.report.verification.passed


@FUZZ
@given(fuzz_cases())
def test_idempotent_on_fuzz_graphs(case: FuzzCase) -> None:
    for target in TARGETS:
        once = qlower.convert(case.model, to=target, opset=case.opset, verify_result=False).model
        twice = qlower.convert(once, to=target, verify_result=False).model
        assert twice.SerializeToString() == once.SerializeToString(), target


# ---- atomic output ----------------------------------------------------------------------


@pytest.fixture
def previous_output(tmp_path: Path) -> Path:
    out = tmp_path / "out" / "model.qcdq.onnx"
    out.parent.mkdir()
    out.write_bytes(SENTINEL)
    return out


def assert_untouched(out: Path) -> None:
    assert out.read_bytes() == SENTINEL
    assert [p.name for p in out.parent.iterdir()] == [out.name], "a temporary file was left behind"


def test_failed_rename_leaves_previous_output(previous_output: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(qlower.output.os, "replace", refuse)
    with pytest.raises(OutputError, match="No space left on device"):
        qlower.convert(MODELS[0], output_path=previous_output, batches=2)
    assert_untouched(previous_output)


def test_failure_while_writing_leaves_previous_output(previous_output: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The temporary file is partly written when the failure hits; it must be removed."""
    written: list[Path] = []
    real_fsync = os.fsync

    def fail_after_write(fd: int) -> None:
        written.extend(p for p in previous_output.parent.iterdir() if p != previous_output)
        assert written and all(p.stat().st_size > 0 for p in written)  # a partial file exists now
        real_fsync(fd)
        raise KeyboardInterrupt  # even a BaseException must not leave it behind

    monkeypatch.setattr(qlower.output.os, "fsync", fail_after_write)
    with pytest.raises(KeyboardInterrupt):
        qlower.convert(MODELS[0], output_path=previous_output, batches=2)
    assert written, "the failure was not injected during the write"
    assert_untouched(previous_output)


def test_failed_verification_writes_nothing(previous_output: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_verify(*_args: object, **kwargs: object) -> VerificationReport:
        report = VerificationReport("qcdq", 1.0, 1, 0)
        report.failures.append("output 'y' at ORT_DISABLE_ALL: injected failure")
        return report

    monkeypatch.setattr(qlower.verification, "verify", failing_verify)
    with pytest.raises(VerificationError, match="injected failure"):
        qlower.convert(MODELS[0], output_path=previous_output, batches=2)
    assert_untouched(previous_output)


def test_refused_input_writes_nothing(previous_output: Path) -> None:
    """A refused model (API and CLI) leaves the previous output as it was."""
    bad = TESTS / "hostile" / "quant_zero_scale.onnx"
    with pytest.raises(InvalidQuantizerError):
        qlower.convert(bad, output_path=previous_output)
    assert_untouched(previous_output)
    proc = cli("convert", str(bad), "-o", str(previous_output))
    assert proc.returncode == 2
    assert_untouched(previous_output)


def test_successful_write_replaces_completely(previous_output: Path) -> None:
    qlower.convert(MODELS[0], output_path=previous_output, batches=2)
    written = onnx.load(str(previous_output))
    assert written.graph.node and not previous_output.read_bytes().startswith(SENTINEL)
    assert [p.name for p in previous_output.parent.iterdir()] == [previous_output.name]
    assert np.all([n.domain in ("", "ai.onnx") for n in written.graph.node])
