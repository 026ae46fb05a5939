"""The verify() entry: run the reference and each runner on every batch and compare.

Per batch the reference runs once (keeping every value it computes: the graph outputs,
every tapped quantizer output and the rest) and, for each level where a tolerance applies,
once more with every tap replaced by that level's lowered value (the unit-local reference;
levels that read the same tap values share it). That run, and the probe's, start from the
first run's values and recompute only the steps that read a value that changed, so where
the lowered taps equal the reference they cost a walk over the steps, not a run.

Each runner runs the lowered model once per batch as deployed. A runner that does not
rewrite the graph (ORT_DISABLE_ALL) reads outputs and taps in that one run. One that does
(ORT_ENABLE_ALL, OpenVINO) must not see the taps as outputs, because exposing a tensor keeps
it from being fused away and would change what the deployed graph computes: ORT's taps are
read from the optimized graph the deployed session saved, reopened as is (see
:func:`_open`); otherwise a second session opens the lowered model with the taps exposed.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx

from ..collector import paused_cycle_collection
from ..errors import UnsupportedError
from ..ir import ModelSource, default_opset, load_model, normalize
from ..large_models import split
from ..progress import Progress
from ..reference import ReferenceExecutor, first_line, identical, node_label
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
from .internal import GRAPH_INPUT_RULE, TapPoint, plan_taps
from .optimized_taps import carried_taps
from .kernels import count_kernels
from .runners import OPTIMIZED, OrtRunner, Runner, Session, runners_for, with_outputs
from .units import Unit, output_unit, probe

TARGETS = ("qcdq", "qop")


@dataclass
class _Opened:
    """A runner with the lowered model open: as deployed, and with the taps exposed.

    With ``fallback``, ``tapped`` is the runner's own optimized graph reopened (see
    :func:`_open`): its graph outputs must equal the deployed session's bit for bit on
    every batch; the first time they do not, ``fallback`` gives the lowered model opened
    with its taps exposed, and the taps are read from that from then on.
    """

    runner: Runner
    deployed: Session
    tapped: Session
    points: list[TapPoint]
    fallback: Callable[[], tuple[Session, list[TapPoint]]] | None = None

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        exposed = [point.exposed for point in self.points]
        if self.tapped is self.deployed:
            results = self.deployed.run(outputs + exposed, feeds)
            return results[: len(outputs)], results[len(outputs) :]
        deployed = self.deployed.run(outputs, feeds)
        if not exposed:
            return deployed, []
        if self.fallback is None:
            return deployed, self.tapped.run(exposed, feeds)
        reopened = self.tapped.run(outputs + exposed, feeds)
        if all(identical(ours, theirs) for ours, theirs in zip(deployed, reopened)):
            return deployed, reopened[len(outputs) :]
        self.tapped, self.points = self.fallback()
        self.fallback = None
        return deployed, self.tapped.run([point.exposed for point in self.points], feeds) if self.points else []


@contextmanager
def _scratch_file() -> Iterator[Path]:
    """A temporary file path for ORT's saved optimized graph (a file: removing a directory costs more),
    and the external data file ORT writes beside it for a model over protobuf's limit."""
    handle, name = tempfile.mkstemp(prefix="qlower-", suffix=".onnx")
    os.close(handle)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)
        Path(f"{name}.data").unlink(missing_ok=True)


def _open(runner: Runner, model: onnx.ModelProto, points: list[TapPoint], saved_graph: Path | None, report: VerificationReport) -> _Opened:
    """Open ``model`` in ``runner``; raises what the runtime raises when it cannot load the model.

    ``saved_graph`` (ORT at ``ORT_ENABLE_ALL``): where the deployed session writes its
    optimized graph, whose integer kernels the report counts. Exposing a tap as an output
    can change what an optimizing runtime fuses, so the taps are not read from the deployed
    session. They are read from that saved graph reopened without optimizing it again, with
    the taps as extra outputs, when it still holds every tap (the integers, or the
    DequantizeLinear output they decode to); it runs what the deployed session runs, which
    :class:`_Opened` checks on the graph outputs of every batch. Otherwise the lowered
    model is opened a second time with the taps exposed, and optimized again.
    """
    if not runner.reads_integer_taps:
        points = [point.reading_float() for point in points]
    exposed = list(dict.fromkeys(point.exposed for point in points))
    if not runner.optimizes:
        session = runner.open(with_outputs(model, exposed) if exposed else model, saved_graph)
        return _Opened(runner, session, session, points)
    deployed = runner.open(model, saved_graph)
    saved = _read_saved_graph(saved_graph, report) if saved_graph is not None else None
    if not exposed:
        return _Opened(runner, deployed, deployed, [])

    def expose_in_lowered() -> tuple[Session, list[TapPoint]]:
        try:
            return runner.open(with_outputs(model, exposed)), points
        except Exception as exc:  # the runtime's own exception types; the deployed model loads
            report.notes.append(f"{runner.level}: internal tensors not compared, exposing them failed: {first_line(exc)}")
            return deployed, []

    carried = carried_taps(points, model, saved) if saved is not None and isinstance(runner, OrtRunner) else None
    if carried is not None:
        saved.graph.output.extend(  # type: ignore[union-attr]
            onnx.ValueInfoProto(name=name) for name in dict.fromkeys(point.exposed for point in carried)
        )
        try:
            reopened = runner.reopen(saved)  # type: ignore[attr-defined, arg-type]
        except Exception:  # the runtime's own exception types: then the taps are exposed in the lowered model
            pass
        else:
            return _Opened(runner, deployed, reopened, carried, expose_in_lowered)
    tapped, chosen = expose_in_lowered()
    return _Opened(runner, deployed, tapped, chosen)


def _read_saved_graph(path: Path, report: VerificationReport) -> onnx.ModelProto | None:
    """The optimized graph ORT saved at ``path``, with its integer kernels counted in ``report``."""
    try:
        saved = onnx.load(str(path), load_external_data=False)
        report.kernels = count_kernels(saved)
    except Exception as exc:  # a graph ORT could not save (> 2 GB) is not counted
        report.notes.append(f"{OPTIMIZED}: integer kernels not counted: {first_line(exc)}")
        return None
    return saved


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
                opened.append(_open(runner, lowered_model, points, saved if counting else None, report))
            except Exception as exc:  # each runtime raises its own exception types
                _runner_failed(report, runner, f"{runner.runtime} cannot load it: {first_line(exc)}")
    if not opened:
        return report
    if not isinstance(lowered, onnx.ModelProto):
        # The runtimes hold their own copies of the weights, and what follows reads only the
        # lowered graph's nodes: a model verify loaded itself keeps none of its weights.
        lowered_model = split(lowered_model, arrays=False)[0]
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
    drifts = {(point.original, run.runner.level): Tally() for run in opened for point in run.points}
    exact = {run.runner.level: target == "qcdq" and run.runner.exact_for_qcdq for run in opened}
    # The probe (extra reference runs) only matters where a tolerance applies.
    probing = any(unit.kind == "probe" for unit in units.values()) and not all(exact.values())
    kept = [point.original for point in points]
    progress.stage(f"verifying on {len(feeds_list)} batches", total=len(feeds_list))
    for number, feeds in enumerate(feeds_list):
        base = reference.trace(feeds)  # the probe and unit-local runs recompute only what they change
        expected = {name: np.array(base[name]) for name in (*reference.output_names, *kept) if name in base}
        steps: dict[str, np.ndarray | None] = {}
        if probing:
            steps.update(probe(reference, feeds, expected, units, np.random.default_rng([seed, number]), base))
        for name in compared:
            unit, value = units[name], expected[name]
            if unit.step is not None and value.dtype.kind in "biuf":
                steps[name] = unit.step(value.astype(np.float64))
        lowered_feeds = {name: feeds[name] for name in lowered_inputs}
        local_runs: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []  # (replacements, local reference)
        for run in list(opened):
            level = run.runner.level
            try:
                results, inside = run.run(compared, lowered_feeds)
            except Exception as exc:  # each runtime raises its own exception types
                _runner_failed(report, run.runner, f"{run.runner.runtime} failed to run it: {first_line(exc)}")
                opened.remove(run)
                continue
            got_taps = {point.original: point.lowered_value(raw) for point, raw in zip(run.points, inside)}
            local = expected if exact[level] else _local_reference(
                reference, feeds, base, points, tolerance_lsb, expected, got_taps, local_runs
            )
            for name, got in zip(compared, results):
                value = local[name]
                step = steps.get(name)
                if units[name].kind != "probe" and units[name].step is not None and value.dtype.kind in "biuf":
                    step = units[name].step(value.astype(np.float64))  # type: ignore[misc]
                tallies[(name, level)].add(value, np.asarray(got), step, units[name].kind == "grid")
            for point in run.points:
                value, drifted = local.get(point.original), expected.get(point.original)
                if value is None or drifted is None:
                    continue
                got, step = got_taps[point.original], point.unit.step
                tallies[(point.original, level)].add(value, got, lambda: step(value.astype(np.float64)), True)  # type: ignore[misc]
                drift = drifts[(point.original, level)]
                drift.add(drifted, got, lambda: step(drifted.astype(np.float64)), True)  # type: ignore[misc]
        progress.advance()

    for run in opened:
        _conclude(report, run, compared, units, tallies, drifts, exact[run.runner.level], ranks, index, lowered_model)
    return report


def _local_reference(
    reference: ReferenceExecutor,
    feeds: dict[str, np.ndarray],
    base: dict[str, np.ndarray],
    points: list[TapPoint],
    tolerance: float,
    expected: dict[str, np.ndarray],
    got_taps: dict[str, np.ndarray],
    cache: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
) -> dict[str, np.ndarray]:
    """The reference run where every tap, once computed, is replaced by the lowered model's value.

    Each tap's value in the result is what the reference computes for it from the lowered
    model's values of the taps upstream (its unit-local reference); the graph outputs
    likewise. A lowered tap beyond the tolerance of what the reference computed for it (or
    of another shape) is not fed on: it fails where it is, and what follows it is compared
    with what the reference computes from correct values. Levels whose taps read the same
    values share one run (``cache``, per batch).
    """
    lowered = {
        point.original: (np.asarray(got_taps[point.original], dtype=expected[point.original].dtype), point.unit)
        for point in points
        if point.original in got_taps and point.original in expected and np.shape(got_taps[point.original]) == expected[point.original].shape
    }
    for known, local in cache:
        if known.keys() == lowered.keys() and all(np.array_equal(known[name], lowered[name][0]) for name in known):
            return local

    def feed_lowered(name: str) -> Callable[[np.ndarray], np.ndarray]:
        got, unit = lowered[name]

        def choose(computed: np.ndarray) -> np.ndarray:
            if computed.shape != got.shape:
                return computed
            if np.array_equal(got, computed):  # the common case, and within any tolerance
                return got
            allowed = tolerance * unit.step(computed.astype(np.float64)) + np.spacing(np.abs(computed)) + np.spacing(np.abs(got))  # type: ignore[misc]
            return got if bool(np.all(np.abs(got.astype(np.float64) - computed) <= allowed)) else computed

        return choose

    replace = {name: feed_lowered(name) for name in lowered}
    local = reference.run(feeds, keep=[point.original for point in points], replace=replace, base=base)
    cache.append(({name: value for name, (value, _) in lowered.items()}, local))
    return local


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
    drifts: dict[tuple[str, str], Tally],
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
            drift = drifts[(point.original, level)]
            held_exact = not exact and point.reads_graph_input and run.runner.exact_graph_input_quantizers
            record = make_internal_record(
                point.original, point.node, point.exposed, level, tally, drift, exact or held_exact, tolerance,
                GRAPH_INPUT_RULE if held_exact else None,
            )
            internal.append((point.rank, record))
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
