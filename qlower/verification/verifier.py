"""The verify() entry: run the reference and each runner on every batch and compare.

Per batch the reference runs once (returning the graph outputs and every tapped
quantizer output), and each runner runs the lowered model once as deployed; a runner
that rewrites the graph (ORT_ENABLE_ALL, OpenVINO) runs a second session with the taps
exposed as extra outputs, because exposing a tensor keeps it from being fused away and
would change what the deployed graph computes. A runner that does not (ORT_DISABLE_ALL)
reads outputs and taps in one run.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx

from ..collector import paused_cycle_collection
from ..errors import UnsupportedError
from ..ir import ModelSource, default_opset, load_model, normalize
from ..progress import Progress
from ..reference import ReferenceExecutor, first_line, node_label
from .compare import (
    Advisory,
    InternalRecord,
    OutputRecord,
    Tally,
    VerificationReport,
    failure_line,
    internal_failure_line,
    make_internal_record,
    make_record,
)
from .divergence import first_divergence
from .graph import GraphIndex, input_dependent, topological_ranks
from .inputs import conform_inputs, make_inputs
from .internal import TapPoint, plan_taps, upstream_taps
from .kernels import count_kernels
from .runners import OPTIMIZED, OrtRunner, Runner, Session, runners_for, with_outputs
from .units import Unit, output_unit, probe

TARGETS = ("qcdq", "qop")


@dataclass
class _Opened:
    """A runner with the lowered model open: as deployed, and with the taps exposed."""

    runner: Runner
    deployed: Session
    tapped: Session
    points: list[TapPoint]

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        exposed = [point.exposed for point in self.points]
        if self.tapped is self.deployed:
            results = self.deployed.run(outputs + exposed, feeds)
            return results[: len(outputs)], results[len(outputs) :]
        return self.deployed.run(outputs, feeds), self.tapped.run(exposed, feeds) if exposed else []


@contextmanager
def _scratch_file() -> Iterator[Path]:
    """A temporary file path for ORT's saved optimized graph (a file: removing a directory costs more)."""
    handle, name = tempfile.mkstemp(prefix="qlower-", suffix=".onnx")
    os.close(handle)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def _open(runner: Runner, model: onnx.ModelProto, points: list[TapPoint], saved_graph: Path | None, notes: list[str]) -> _Opened:
    """Open ``model`` in ``runner``; raises what the runtime raises when it cannot load the model."""
    exposed = list(dict.fromkeys(point.exposed for point in points))
    if not exposed:
        session = runner.open(model, saved_graph)
        return _Opened(runner, session, session, [])
    if not runner.optimizes:
        session = runner.open(with_outputs(model, exposed), saved_graph)
        return _Opened(runner, session, session, points)
    deployed = runner.open(model, saved_graph)
    try:
        tapped = runner.open(with_outputs(model, exposed))
    except Exception as exc:  # the runtime's own exception types; the deployed model loads
        notes.append(f"{runner.level}: internal tensors not compared, exposing them failed: {first_line(exc)}")
        return _Opened(runner, deployed, deployed, [])
    return _Opened(runner, deployed, tapped, points)


@paused_cycle_collection
def verify(
    original: ModelSource,
    lowered: ModelSource,
    *,
    target: str = "qcdq",
    inputs: Sequence[dict[str, np.ndarray]] | None = None,
    batches: int = 16,
    seed: int = 0,
    tolerance_lsb: float = 1.0,
    check_optimized: bool = True,
    reference_opset: int | None = None,
    runtime: str = "onnxruntime",
    progress: Progress | None = None,
) -> VerificationReport:
    """Compare ``lowered``, run on ``runtime``, with the QONNX reference running ``original``.

    ``inputs`` (a list of feeds, one per batch) replaces the ``batches`` random feeds drawn
    by :func:`make_inputs` with ``seed``. ``reference_opset`` (default: the lowered model's
    opset) is the opset the reference runs the original's standard ops at; the original is
    never run below its own. ``runtime`` is "onnxruntime" (``ORT_DISABLE_ALL``, and
    ``ORT_ENABLE_ALL`` unless ``check_optimized`` is False) or "openvino" (CPU, f32
    precision hint; needs the optional openvino package). The rules are in the package
    docstring. A lowered model that the runtime cannot load or run is a failed
    verification carrying the runtime's message, not an exception; problems with the
    original model or the inputs raise QlowerError.
    """
    if target not in TARGETS:
        raise UnsupportedError(f"unknown verification target {target!r}; choose one of {', '.join(TARGETS)}")
    runners = runners_for(runtime, check_optimized)
    progress = progress or Progress()
    progress.stage("preparing verification")
    # verify only reads the models: a ModelProto handed in is not copied (weights held once)
    original_model = load_model(original, copy=False)
    lowered_model = load_model(lowered, copy=False)
    wanted_opset = default_opset(lowered_model) if reference_opset is None else reference_opset
    if wanted_opset > default_opset(original_model):
        reference = ReferenceExecutor(normalize(original_model, wanted_opset))
    else:
        reference = ReferenceExecutor(original_model)
    feeds_list = conform_inputs(original_model, inputs) if inputs is not None else make_inputs(original_model, batches, seed)
    report = VerificationReport(target, tolerance_lsb, len(feeds_list), seed, runtime=runtime)
    index = GraphIndex.of(original_model)
    ranks = topological_ranks(index)
    units = {name: output_unit(index, name) for name in reference.output_names}
    points = plan_taps(index, ranks, input_dependent(index, list(reference.input_names)), lowered_model)

    opened: list[_Opened] = []
    for runner in runners:
        counting = isinstance(runner, OrtRunner) and runner.level == OPTIMIZED
        if not runner.advisory:
            report.settings[runner.level] = runner.settings()
        with _scratch_file() if counting else nullcontext() as saved:
            try:
                opened.append(_open(runner, lowered_model, points, saved if counting else None, report.notes))
            except Exception as exc:  # each runtime raises its own exception types
                _runner_failed(report, runner, f"{runner.runtime} cannot load it: {first_line(exc)}")
                continue
            if counting:
                try:
                    report.kernels = count_kernels(onnx.load(str(saved), load_external_data=False))
                except Exception as exc:  # a graph ORT could not save (> 2 GB) is not counted
                    report.notes.append(f"{OPTIMIZED}: integer kernels not counted: {first_line(exc)}")
    if not opened:
        return report
    lowered_inputs = opened[0].deployed.input_names
    lowered_outputs = set(opened[0].deployed.output_names)
    extra = [name for name in lowered_inputs if name not in reference.input_names]
    if extra:
        report.failures.append(f"lowered model: it needs input {extra[0]!r}, which the original does not have")
        return report
    compared = [name for name in reference.output_names if name in lowered_outputs]
    report.failures.extend(
        f"output {name!r}: missing from the lowered model" for name in reference.output_names if name not in lowered_outputs
    )

    tallies = {(name, run.runner.level): Tally() for run in opened for name in compared}
    tallies.update({(point.original, run.runner.level): Tally() for run in opened for point in run.points})
    exact = {run.runner.level: target == "qcdq" and run.runner.exact_for_qcdq for run in opened}
    # The probe (extra reference runs) only matters where a tolerance applies.
    probing = any(unit.kind == "probe" for unit in units.values()) and not all(exact.values())
    kept = [point.original for point in points]
    progress.stage(f"verifying on {len(feeds_list)} batches", total=len(feeds_list))
    for number, feeds in enumerate(feeds_list):
        expected = reference.run(feeds, keep=kept)
        steps: dict[str, np.ndarray | None] = {}
        if probing:
            steps.update(probe(reference, feeds, expected, units, np.random.default_rng([seed, number])))
        for name in compared:
            unit, value = units[name], expected[name]
            if unit.step is not None and value.dtype.kind in "biuf":
                steps[name] = unit.step(value.astype(np.float64))
        lowered_feeds = {name: feeds[name] for name in lowered_inputs}
        for run in list(opened):
            level = run.runner.level
            try:
                results, inside = run.run(compared, lowered_feeds)
            except Exception as exc:  # each runtime raises its own exception types
                _runner_failed(report, run.runner, f"{run.runner.runtime} failed to run it: {first_line(exc)}")
                opened.remove(run)
                continue
            for name, got in zip(compared, results):
                tallies[(name, level)].add(expected[name], np.asarray(got), steps.get(name), units[name].kind == "grid")
            for point, raw in zip(run.points, inside):
                value = expected.get(point.original)
                if value is not None:
                    step = point.unit.step(value.astype(np.float64))  # type: ignore[misc]
                    tallies[(point.original, level)].add(value, point.lowered_value(raw), step, True)
        progress.advance()

    for run in opened:
        _conclude(report, run, compared, units, tallies, exact[run.runner.level], ranks, index, lowered_model)
    return report


def _runner_failed(report: VerificationReport, runner: Runner, what: str) -> None:
    if runner.advisory:
        report.advisories.append(Advisory(runner.level, runner.settings(), note=what))
    else:
        report.failures.append(f"lowered model at {runner.level}: {what}")


def _conclude(
    report: VerificationReport,
    run: _Opened,
    compared: list[str],
    units: dict[str, Unit],
    tallies: dict[tuple[str, str], Tally],
    exact: bool,
    ranks: dict[int, int],
    index: GraphIndex,
    lowered: onnx.ModelProto,
) -> None:
    """Turn one runner's tallies into records, failure lines and the first divergence."""
    level = run.runner.level
    tolerance = report.tolerance_lsb
    outputs: list[OutputRecord] = []
    failures = []
    for name in compared:
        tally = tallies[(name, level)]
        record = make_record(name, level, tally, units[name], exact, tolerance)
        outputs.append(record)
        if not record.passed:
            failures.append(failure_line(record, tally))
    internal: list[tuple[int, InternalRecord]] = []
    for point in run.points:
        tally = tallies[(point.original, level)]
        if tally.total or tally.note:
            record = make_internal_record(point.original, point.node, point.exposed, level, tally, exact, tolerance)
            internal.append((point.rank, record))
    if not exact:
        _excuse_propagation(index, [record for _, record in internal])
    failing = [record for _, record in internal if not record.passed]
    if failing:
        failures.append(internal_failure_line(failing[0], len(failing) - 1))
    if run.runner.advisory:
        report.advisories.append(Advisory(level, run.runner.settings(), outputs, [record for _, record in internal]))
        return
    report.outputs.extend(outputs)
    report.internal.extend(record for _, record in internal)
    report.failures.extend(failures)
    if failures and report.first_divergence is None:
        located = []
        for record in outputs:
            producer = index.producer.get(record.name)
            rank, node = (ranks.get(producer[0], -1), node_label(producer[1], producer[0])) if producer else (-1, record.name)
            located.append((rank, record, node))
        report.first_divergence = first_divergence(level, internal, located, lowered)



def _excuse_propagation(index: GraphIndex, records: list[InternalRecord]) -> None:
    """Where a tolerance applies, a tap beyond it passes when a nearest tap upstream differs.

    A unit may differ by one step at a rounding tie (its contract); the next units see that
    as an input difference and can move by several of their own steps. What each unit adds
    is held to the tolerance: the first differing tap on a path, not those it feeds.
    """
    differing = {record.tensor: record for record in records if record.differing}
    tapped = {record.tensor for record in records}
    for record in records:
        if record.passed or record.note:
            continue
        nearest = upstream_taps(index, record.tensor, tapped - {record.tensor})
        upstream = [differing[name] for name in nearest if name in differing]
        if upstream:
            record.passed = True
            record.rule += ", grown from a difference upstream"
            record.note = f"grown from {upstream[0].node!r} upstream, which differs by {upstream[0].max_lsb_diff:g} LSB"
