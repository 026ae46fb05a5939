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
:func:`qlower.verification.sessions.open_runner`); otherwise a second session opens the
lowered model with the taps exposed.

Each ORT runner opens and runs its sessions on a thread of its own while the reference runs
on the caller's (ORT releases the GIL while it creates or runs a session; OpenVINO's runners
work in line, see :mod:`qlower.verification.sessions`): the optimizing
runner's deployed session, the slowest to create, starts before the reference is built, and
the runners run batch n + 1 while batch n is compared. Only the caller's thread writes the
report, in runner and batch order, so it is the same whatever the threads' timing. ORT is
given the lowered weights as arrays (see :mod:`qlower.verification.sessions` for which
sessions copy them).
"""

from __future__ import annotations

from concurrent.futures import Executor, Future
from contextlib import ExitStack
from typing import Callable, Sequence

import numpy as np
import onnx

from ..collector import paused_cycle_collection
from ..errors import UnsupportedError
from ..ir import ModelSource, default_opset, load_model, normalize
from ..large_models import share_original, split
from ..progress import Progress
from ..reference import ReferenceExecutor, all_identical, first_line, node_label
from .compare import (
    Advisory,
    InternalRecord,
    OutputRecord,
    Tally,
    add_taps,
    VerificationReport,
    failure_line,
    internal_failure_line,
    make_internal_record,
    make_record,
)
from .divergence import first_divergence
from .graph import GraphIndex, input_dependent, topological_ranks
from .inputs import conform_inputs, make_inputs
from .internal import GRAPH_INPUT_RULE, TapPoint, lowered_values, plan_taps
from .runners import OPTIMIZED, OrtRunner, Runner, runners_for
from .sessions import InLine, Lowered, Opened, open_deployed, open_runner, runner_thread, scratch_file
from .units import Unit, output_unit, probe

TARGETS = ("qcdq", "qop")
# The reference's values the verifier may hold for batches it traced ahead (see _trace_ahead).
TRACE_AHEAD_BYTES = 64 << 20


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
    if not isinstance(lowered, onnx.ModelProto) and runtime == "onnxruntime":
        # a model verify read itself: its weights kept as they were are read from the
        # original's data file (as the reference reads them), its own copies dropped
        lowered_model = share_original(lowered_model, original_model)
    with ExitStack() as stack:
        # Each ORT runner opens and runs its sessions on a thread of its own, in order. ORT
        # releases the GIL while it creates a session or runs one, so they overlap the
        # reference, which runs here; the report is built here alone, in runner and batch
        # order, so it does not depend on how the threads are timed.
        scratch = stack.enter_context(ExitStack())  # removed once every runner is open (or after its thread ends)
        saved_graphs = {
            runner.level: scratch.enter_context(scratch_file())
            for runner in runners
            if isinstance(runner, OrtRunner) and runner.level == OPTIMIZED
        }
        threads: dict[str, Executor] = {runner.level: runner_thread(stack) if isinstance(runner, OrtRunner) else InLine() for runner in runners}
        opening = Lowered.of(lowered_model, runtime, original_model)
        # An optimizing runner's deployed session needs no taps and takes longest to create
        # (ORT_ENABLE_ALL's graph transformers): it starts first.
        deployed = {
            runner.level: threads[runner.level].submit(open_deployed, runner, opening, saved_graphs.get(runner.level))
            for runner in runners
            if runner.optimizes
        }
        wanted_opset = default_opset(lowered_model) if reference_opset is None else reference_opset
        if wanted_opset > default_opset(original_model):
            reference = ReferenceExecutor(normalize(original_model, wanted_opset))
        else:
            reference = ReferenceExecutor(original_model)
        index = GraphIndex.of(original_model)
        feeds_list = conform_inputs(original_model, inputs) if inputs is not None else make_inputs(original_model, batches, seed, index)
        report = VerificationReport(target, tolerance_lsb, len(feeds_list), seed, runtime=runtime)
        ranks = topological_ranks(index)
        units = {name: output_unit(index, name) for name in reference.output_names}
        points = plan_taps(index, ranks, input_dependent(index, list(reference.input_names)), lowered_model)
        finishing = [
            threads[runner.level].submit(
                open_runner, runner, opening, points, deployed.get(runner.level), saved_graphs.get(runner.level), feeds_list
            )
            for runner in runners
        ]
        opened: list[Opened] = []
        for runner, future in zip(runners, finishing):
            if not runner.advisory:
                report.settings[runner.level] = runner.settings()
            try:
                run = future.result()
            except Exception as exc:  # each runtime raises its own exception types
                _runner_failed(report, runner, f"{runner.runtime} cannot load it: {first_line(exc)}")
                continue
            report.notes.extend(run.notes)
            report.kernels = run.kernels or report.kernels
            opened.append(run)
        scratch.close()
        del deployed, finishing, opening  # the weights handed to the runtimes (each holds its copy)
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

        def submit_batch(number: int) -> list[tuple[Opened, Future[tuple[list[np.ndarray], list[np.ndarray], list[str]] | None]]]:
            lowered_feeds = {name: feeds_list[number][name] for name in lowered_inputs}
            return [(run, threads[run.runner.level].submit(run.run_batch, compared, lowered_feeds)) for run in opened]

        progress.stage(f"verifying on {len(feeds_list)} batches", total=len(feeds_list))
        running = submit_batch(0)
        ahead: dict[int, tuple[dict[str, np.ndarray], int]] = {}  # traces (and their bytes) made while a runner ran
        for number, feeds in enumerate(feeds_list):
            # The runners run the next batch while this one is compared (one batch ahead at most).
            this_batch, running = running, submit_batch(number + 1) if number + 1 < len(feeds_list) else []
            # the probe and unit-local runs recompute only what they change
            base = ahead.pop(number)[0] if number in ahead else reference.trace(feeds)
            expected = {name: np.asarray(base[name]) for name in (*reference.output_names, *kept) if name in base}  # (read, never written)
            steps: dict[str, np.ndarray | None] = {}
            if probing:
                steps.update(probe(reference, feeds, expected, units, np.random.default_rng([seed, number]), base))
            for name in compared:
                unit, value = units[name], expected[name]
                if unit.step is not None and value.dtype.kind in "biuf":
                    steps[name] = unit.step(value.astype(np.float64))
            local_runs: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []  # (replacements, local reference)
            for run, future in this_batch:
                if run not in opened:  # it failed on an earlier batch
                    continue
                level = run.runner.level
                _trace_ahead(reference, feeds_list, number, ahead, future)
                try:
                    ran = future.result()
                except Exception as exc:  # each runtime raises its own exception types
                    _runner_failed(report, run.runner, f"{run.runner.runtime} failed to run it: {first_line(exc)}")
                    opened.remove(run)
                    continue
                assert ran is not None  # (None only after a failure, which removed the runner)
                results, inside, notes = ran
                report.notes.extend(notes)
                got_taps = lowered_values(run.points, inside)
                local = expected if exact[level] else _local_reference(
                    reference, feeds, base, points, tolerance_lsb, expected, got_taps, local_runs
                )
                for name, got in zip(compared, results):
                    value = local[name]
                    step = steps.get(name)
                    if units[name].kind != "probe" and units[name].step is not None and value.dtype.kind in "biuf":
                        step = units[name].step(value.astype(np.float64))  # type: ignore[misc]
                    tallies[(name, level)].add(value, np.asarray(got), step, units[name].kind == "grid")
                read = [point for point in run.points if point.original in local and point.original in expected]
                got = [got_taps[point.original] for point in read]
                unit_steps = [point.unit.step for point in read]
                references = [expected[point.original] for point in read]
                # Where the local reference is the plain run, both comparisons are the same one.
                same = all_identical(references, got) if local is expected else None
                add_taps([tallies[(point.original, level)] for point in read], [local[point.original] for point in read], got, unit_steps, same)  # type: ignore[misc]
                add_taps([drifts[(point.original, level)] for point in read], references, got, unit_steps, same)  # type: ignore[misc]
            progress.advance()

    for run in opened:
        _conclude(report, run, compared, units, tallies, drifts, exact[run.runner.level], ranks, index, lowered_model)
    return report


def _trace_ahead(
    reference: ReferenceExecutor,
    feeds_list: Sequence[dict[str, np.ndarray]],
    number: int,
    ahead: dict[int, tuple[dict[str, np.ndarray], int]],
    busy: Future[object],
) -> None:
    """While ``busy`` (a runner's run of batch ``number``) is not done, trace the batches after
    ``number`` into ``ahead``, holding at most ``TRACE_AHEAD_BYTES`` of their values: the time
    the reference would otherwise spend waiting (at the start, for ORT to open the lowered
    model) shortens its work per batch later. Traces are deterministic, so when one is made
    changes nothing in the report."""
    following = number + 1 + len(ahead)
    while not busy.done() and following < len(feeds_list) and sum(size for _, size in ahead.values()) < TRACE_AHEAD_BYTES:
        values = reference.trace(feeds_list[following])
        ahead[following] = (values, reference.trace_bytes(values))
        following += 1


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
    read = [point.original for point in points if point.original in got_taps and point.original in expected]
    if all_identical([got_taps[name] for name in read], [expected[name] for name in read]):
        return expected  # the common case: every tap is what the plain run computed, so the run is the plain one
    lowered = {
        point.original: (np.asarray(got_taps[point.original], dtype=expected[point.original].dtype), point.unit)
        for point in points
        if point.original in got_taps and point.original in expected and np.shape(got_taps[point.original]) == expected[point.original].shape
    }
    if all_identical([value for value, _ in lowered.values()], [expected[name] for name in lowered]):
        return expected  # every tap of the plain run's shape is its value, once cast to its type
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
    run: Opened,
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
