"""The verify() entry: run the reference and ONNX Runtime on every batch and compare."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import UnsupportedError
from ..ir import ModelSource, default_opset, load_model, normalize
from ..reference import ReferenceExecutor, first_line, make_session
from .compare import Tally, VerificationReport, failure_line, make_record
from .graph import GraphIndex
from .inputs import conform_inputs, make_inputs
from .units import output_unit, probe

TARGETS = ("qcdq", "qop")
UNOPTIMIZED = "ORT_DISABLE_ALL"
OPTIMIZED = "ORT_ENABLE_ALL"


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
) -> VerificationReport:
    """Compare ``lowered`` (in ONNX Runtime) with the QONNX reference running ``original``.

    ``inputs`` (a list of feeds, one per batch) replaces the ``batches`` random feeds drawn
    by :func:`make_inputs` with ``seed``. ``reference_opset`` (default: the lowered model's
    opset) is the opset the reference runs the original's standard ops at; the original is
    never run below its own. The rules are in the module docstring. A lowered
    model that ORT cannot load or run is a failed verification carrying ORT's message, not
    an exception; problems with the original model or the inputs raise QlowerError.
    """
    if target not in TARGETS:
        raise UnsupportedError(f"unknown verification target {target!r}; choose one of {', '.join(TARGETS)}")
    original_model = load_model(original)
    lowered_model = load_model(lowered)
    wanted_opset = default_opset(lowered_model) if reference_opset is None else reference_opset
    if wanted_opset > default_opset(original_model):
        reference = ReferenceExecutor(normalize(original_model, wanted_opset))
    else:
        reference = ReferenceExecutor(original_model)
    feeds_list = conform_inputs(original_model, inputs) if inputs is not None else make_inputs(original_model, batches, seed)
    report = VerificationReport(target, tolerance_lsb, len(feeds_list), seed)
    index = GraphIndex.of(original_model)
    units = {name: output_unit(index, name) for name in reference.output_names}

    levels = [UNOPTIMIZED] + ([OPTIMIZED] if check_optimized else [])
    serialized = lowered_model.SerializeToString()
    sessions = {}
    for level in levels:
        try:
            sessions[level] = make_session(serialized, optimized=level == OPTIMIZED)
        except Exception as exc:  # ORT raises its own exception types
            report.failures.append(f"lowered model at {level}: ONNX Runtime cannot load it: {first_line(exc)}")
    if not sessions:
        return report
    some_session = next(iter(sessions.values()))
    lowered_inputs = [meta.name for meta in some_session.get_inputs()]
    lowered_outputs = {meta.name for meta in some_session.get_outputs()}
    extra = [name for name in lowered_inputs if name not in reference.input_names]
    if extra:
        report.failures.append(f"lowered model: it needs input {extra[0]!r}, which the original does not have")
        return report
    compared = [name for name in reference.output_names if name in lowered_outputs]
    report.failures.extend(
        f"output {name!r}: missing from the lowered model" for name in reference.output_names if name not in lowered_outputs
    )

    tallies = {(name, level): Tally() for level in sessions for name in compared}
    # The probe (one extra reference run) only matters where a tolerance applies.
    probing = any(unit.kind == "probe" for unit in units.values()) and (target == "qop" or OPTIMIZED in sessions)
    for number, feeds in enumerate(feeds_list):
        expected = reference.run(feeds)
        steps: dict[str, np.ndarray | None] = {}
        if probing:
            steps.update(probe(reference, feeds, expected, units, np.random.default_rng([seed, number])))
        for name in compared:
            unit, value = units[name], expected[name]
            if unit.step is not None and value.dtype.kind in "biuf":
                steps[name] = unit.step(value.astype(np.float64))
        for level, session in list(sessions.items()):
            try:
                results = session.run(compared, {name: feeds[name] for name in lowered_inputs})
            except Exception as exc:  # ORT raises its own exception types
                report.failures.append(f"lowered model at {level}: ONNX Runtime failed to run it: {first_line(exc)}")
                del sessions[level]
                continue
            for name, got in zip(compared, results):
                tallies[(name, level)].add(expected[name], np.asarray(got), steps.get(name), units[name].kind == "grid")

    for level in levels:
        if level not in sessions:
            continue
        exact = target == "qcdq" and level == UNOPTIMIZED
        for name in compared:
            tally = tallies[(name, level)]
            record = make_record(name, level, tally, units[name], exact, tolerance_lsb)
            report.outputs.append(record)
            if not record.passed:
                report.failures.append(failure_line(record, tally))
    return report
