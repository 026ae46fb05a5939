"""The verifier's runners work on threads of their own (issue 9): the report is the one a
run with every runner's work done in line gives, failures included, in the same order."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest
from benchmarks.synthetic import shared_chain

import qlower
from qlower.errors import QlowerError
from qlower.verification import verifier
from qlower.verification.runners import OPTIMIZED, UNOPTIMIZED, OrtRunner, Session
from qlower.verification.sessions import InLine


class FailingAt(Session):
    """A session whose ``fail_at``-th run (from 0) raises; counts the runs asked of it."""

    def __init__(self, inner: Session, fail_at: int) -> None:
        self.inner, self.fail_at, self.runs = inner, fail_at, 0
        self.input_names, self.output_names = inner.input_names, inner.output_names

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.runs += 1
        if self.runs - 1 == self.fail_at:
            raise RuntimeError(f"injected failure on run {self.fail_at}")
        return self.inner.run(names, feeds)


def _report(original: Any, lowered: Any, **kwargs: Any) -> str:
    return json.dumps(qlower.verify(original, lowered, **kwargs).to_dict())


@pytest.fixture(scope="module")
def chain() -> tuple[Any, Any]:
    original = shared_chain(40)
    return original, qlower.convert(original, verify_result=False).model


def test_threaded_report_is_the_in_line_report(chain: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    original, lowered = chain
    threaded = _report(original, lowered, batches=6)
    monkeypatch.setattr(verifier, "runner_thread", lambda stack: InLine())
    assert _report(original, lowered, batches=6) == threaded
    assert json.loads(threaded)["passed"]


def test_runners_failing_on_their_threads_are_reported_in_batch_order(
    chain: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # ORT_DISABLE_ALL fails on batch 2 and the deployed ORT_ENABLE_ALL session on batch 1:
    # the failures read as the batches ran (ORT_ENABLE_ALL first), and no runner is asked
    # for a batch after the one it failed on (the next batch may already be queued).
    original, lowered = chain
    sessions: dict[str, FailingAt] = {}
    real_open = OrtRunner.open

    def failing_open(runner: OrtRunner, *args: Any) -> Session:
        session = FailingAt(real_open(runner, *args), 2 if runner.level == UNOPTIMIZED else 1)
        sessions.setdefault(runner.level, session)
        return session

    monkeypatch.setattr(OrtRunner, "open", failing_open)
    report = qlower.verify(original, lowered, batches=5)
    assert report.failures == [
        f"lowered model at {OPTIMIZED}: ONNX Runtime failed to run it: injected failure on run 1",
        f"lowered model at {UNOPTIMIZED}: ONNX Runtime failed to run it: injected failure on run 2",
    ]
    assert sessions[UNOPTIMIZED].runs == 3 and sessions[OPTIMIZED].runs == 2
    assert not report.outputs and not report.internal  # a runner that failed is not concluded
    threaded = json.dumps(report.to_dict())
    sessions.clear()
    monkeypatch.setattr(verifier, "runner_thread", lambda stack: InLine())
    assert _report(original, lowered, batches=5) == threaded


def test_a_runner_failing_to_load_on_its_thread_is_reported(chain: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    original, lowered = chain
    real_open = OrtRunner.open

    def open_unoptimized_only(runner: OrtRunner, *args: Any) -> Session:
        if runner.level == OPTIMIZED:
            raise RuntimeError("injected load failure\nsecond line")
        return real_open(runner, *args)

    monkeypatch.setattr(OrtRunner, "open", open_unoptimized_only)
    report = qlower.verify(original, lowered, batches=2)
    assert report.failures == [f"lowered model at {OPTIMIZED}: ONNX Runtime cannot load it: injected load failure"]
    assert {record.level for record in report.outputs} == {UNOPTIMIZED} and report.internal


def test_an_error_in_the_reference_while_runners_open_is_raised(chain: tuple[Any, Any]) -> None:
    original, lowered = chain
    with pytest.raises(QlowerError):
        qlower.verify(original, lowered, inputs=[{"not_an_input": np.zeros((1, 16), np.float32)}])


def test_traces_made_while_runners_run_give_the_same_report(chain: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # Slow runners: the reference traces the later batches while it waits for each one's
    # first batch; each batch is traced once, and the report is the one made without that.
    original, lowered = chain
    monkeypatch.setattr(verifier, "TRACE_AHEAD_BYTES", 0)
    plain = _report(original, lowered, batches=5)
    monkeypatch.undo()
    real_run_batch = verifier.Opened.run_batch

    def slow_run_batch(self: Any, outputs: list[str], feeds: dict[str, np.ndarray]) -> Any:
        time.sleep(0.05)
        return real_run_batch(self, outputs, feeds)

    traced: list[int] = []
    real_trace = verifier.ReferenceExecutor.trace

    def counted_trace(self: Any, feeds: dict[str, np.ndarray]) -> Any:
        traced.append(id(feeds))
        return real_trace(self, feeds)

    held: list[int] = []
    real_trace_ahead = verifier._trace_ahead

    def watched_trace_ahead(*args: Any) -> None:
        real_trace_ahead(*args)
        held.append(len(args[3]))

    monkeypatch.setattr(verifier.Opened, "run_batch", slow_run_batch)
    monkeypatch.setattr(verifier.ReferenceExecutor, "trace", counted_trace)
    monkeypatch.setattr(verifier, "_trace_ahead", watched_trace_ahead)
    assert _report(original, lowered, batches=5) == plain
    assert len(traced) == len(set(traced)) == 5
    assert max(held) > 0
