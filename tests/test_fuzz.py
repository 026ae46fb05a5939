"""Differential fuzzing: random valid QONNX graphs, every target, lowered and verified.

For every graph from :func:`tests.fuzz_graphs.fuzz_cases` and every target:

* ``qlower.convert`` succeeds (the graphs are valid QONNX, so a refusal is a bug);
* the result passes ``onnx.checker.check_model(full_check=True)`` and keeps no QONNX op;
* ONNX Runtime loads it at ``ORT_DISABLE_ALL`` and ``ORT_ENABLE_ALL``;
* verification against the QONNX reference holds: ``qcdq`` at ``ORT_DISABLE_ALL`` is
  bit-identical (max |diff| 0) on random batches and on inputs placed on exact rounding
  ties of the first quantizer; everything else is within ``TOLERANCE_LSB``.

``test_fuzz_fixed`` runs a fixed, derandomized set of ``FIXED_EXAMPLES`` graphs per target
in ``make test``. ``test_fuzz_campaign`` (``-m slow``, ``make fuzz``) runs
``QLOWER_FUZZ_EXAMPLES`` random graphs per target and prints how many it tried. Set
``QLOWER_FUZZ_SAVE=<dir>`` to write each failing model there for minimization.

Named regression tests for bugs the fuzzer found live at the bottom of this file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, note, settings
from onnx import TensorProto, helper, numpy_helper

import qlower
from qlower.ir import QONNX_DOMAINS

from fuzz_graphs import FuzzCase, fuzz_cases

TARGETS = ("qcdq", "qop")
FIXED_EXAMPLES = 300
TOLERANCE_LSB = 1.0  # the stated bound for qop and for optimized qcdq (qlower's default)
BATCHES = 3  # random batches per graph, on top of the tie inputs

_COMMON = dict(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)
FIXED = settings(max_examples=FIXED_EXAMPLES, derandomize=True, **_COMMON)


def _session(model: onnx.ModelProto, level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _save_failure(case: FuzzCase, target: str) -> None:
    folder = os.environ.get("QLOWER_FUZZ_SAVE")
    if not folder:
        return
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    stem = f"fail_{target}_{abs(hash(case.model.SerializeToString())) % 10**10}"
    onnx.save(case.model, str(path / f"{stem}.onnx"))
    if case.inputs:
        np.savez(path / f"{stem}.inputs.npz", **{f"{i}_{k}": v for i, feed in enumerate(case.inputs) for k, v in feed.items()})
    (path / f"{stem}.txt").write_text(repr(case) + "\n")


def check_case(case: FuzzCase, target: str) -> qlower.ConversionResult:
    """Convert + every check of the module docstring, on random and on tie inputs."""
    note(repr(case))
    try:
        result = qlower.convert(case.model, to=target, opset=case.opset, batches=BATCHES, seed=0, tolerance_lsb=TOLERANCE_LSB)
        lowered = result.model
        onnx.checker.check_model(lowered, full_check=True)
        assert not [n.name for n in lowered.graph.node if n.domain in QONNX_DOMAINS], "a QONNX op survived"
        assert all(n.domain in ("", "ai.onnx") for n in lowered.graph.node), "non-standard op in the output"
        for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
            _session(lowered, level)
        _assert_verified(result.report.verification, target)
        if case.inputs is not None:
            ties = qlower.verify(case.model, lowered, target=target, inputs=case.inputs, tolerance_lsb=TOLERANCE_LSB)
            _assert_verified(ties, target)
    except BaseException:
        _save_failure(case, target)
        raise
    return result


def _assert_verified(report: qlower.VerificationReport | None, target: str) -> None:
    assert report is not None
    assert report.passed, report.failures
    levels = {record.level for record in report.outputs}
    assert levels == {"ORT_DISABLE_ALL", "ORT_ENABLE_ALL"}, levels
    for record in report.outputs:
        if target == "qcdq" and record.level == "ORT_DISABLE_ALL":
            assert record.max_abs_diff == 0, record
        elif record.max_lsb_diff is not None:
            assert record.max_lsb_diff <= TOLERANCE_LSB, record


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_fixed(target: str) -> None:
    """FIXED_EXAMPLES derandomized graphs per target; part of ``make test``."""
    tried = 0

    @FIXED
    @given(fuzz_cases())
    def run(case: FuzzCase) -> None:
        nonlocal tried
        tried += 1
        check_case(case, target)

    run()
    assert tried >= FIXED_EXAMPLES


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_campaign(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``QLOWER_FUZZ_EXAMPLES`` random graphs per target (``make fuzz``)."""
    examples = int(os.environ.get("QLOWER_FUZZ_EXAMPLES", "2000"))
    tried = 0
    start = time.perf_counter()

    @settings(max_examples=examples, **_COMMON)
    @given(fuzz_cases(max_steps=8))
    def run(case: FuzzCase) -> None:
        nonlocal tried
        tried += 1
        check_case(case, target)

    try:
        run()
    finally:
        elapsed = time.perf_counter() - start
        with capsys.disabled():
            print(f"\nfuzz campaign [{target}]: {tried} graphs tried in {elapsed:.0f} s ({tried / max(elapsed, 1e-9):.1f}/s)")
