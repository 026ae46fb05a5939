"""Comparison of results with the reference, the per-output records and the report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..errors import VerificationError
from ..reference import all_identical
from ..report_schema import header
from .kernels import KernelCount
from .units import Unit


@dataclass
class OutputRecord:
    """How one graph output compared at one ORT optimization level, over all batches.

    ``max_lsb_diff`` is in steps of the output's own grid (None when it has none);
    ``max_unit_diff`` is in the unit the rule used (the LSB, the probe or float32 ulps, as
    ``lsb_source`` says); ``rule`` is what the output was held to; ``note`` explains a
    shape or dtype mismatch.
    """

    name: str
    level: str
    max_abs_diff: float
    max_lsb_diff: float | None
    max_unit_diff: float
    differing_share: float
    lsb_source: str
    rule: str
    passed: bool
    note: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {key: _json_number(value) for key, value in self.__dict__.items()}


def _json_number(value: object) -> object:
    """Non-finite floats as strings ("inf", "nan"): strict JSON has no Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


@dataclass
class InternalRecord:
    """How one tapped internal activation compared at one level, over all batches.

    ``tensor`` is the quantizer output's name in the original, ``node`` that quantizer,
    ``lowered_tensor`` what was read in the lowered model (an integer tensor dequantized
    with its recorded scale and zero point, or the float tensor itself). Differences are
    in steps of that quantizer (``max_lsb_diff``) and, where a tolerance applies, against
    the tap's unit-local reference: what the reference computes for it from the lowered
    model's values of the taps upstream. ``end_to_end_*`` compare it with the reference
    run on the inputs alone (information: rounding ties upstream grow downstream).
    """

    tensor: str
    node: str
    lowered_tensor: str
    level: str
    max_abs_diff: float
    max_lsb_diff: float
    differing: int
    elements: int
    end_to_end_max_lsb_diff: float
    end_to_end_differing: int
    rule: str
    passed: bool
    note: str | None = None

    @property
    def differing_share(self) -> float:
        return self.differing / self.elements if self.elements else 0.0

    @property
    def end_to_end_share(self) -> float:
        return self.end_to_end_differing / self.elements if self.elements else 0.0

    def amount(self) -> str:
        if self.note:
            return self.note
        return f"{self.differing} of {self.elements} elements differ (max |diff| {self.max_abs_diff:g}, {self.max_lsb_diff:g} LSB)"

    def to_dict(self) -> dict[str, object]:
        return {key: _json_number(value) for key, value in self.__dict__.items()} | {
            "differing_share": self.differing_share, "end_to_end_share": self.end_to_end_share,
        }


def internal_summary(records: list[InternalRecord], level: str) -> dict[str, object]:
    """Per level: how many taps and elements were compared, how many differ, and the worst tap."""
    at_level = [record for record in records if record.level == level]
    elements = sum(record.elements for record in at_level)
    differing = sum(record.differing for record in at_level)
    worst = max(at_level, key=lambda record: (record.max_lsb_diff, record.differing), default=None)
    drift = max(at_level, key=lambda record: (record.end_to_end_max_lsb_diff, record.end_to_end_differing), default=None)
    drifting = sum(record.end_to_end_differing for record in at_level)
    return {
        "level": level,
        "tensors": len(at_level),
        "elements": elements,
        "differing": differing,
        "differing_share": differing / elements if elements else 0.0,
        "failed": sum(not record.passed for record in at_level),
        "worst": None if worst is None or not worst.differing else {
            "tensor": worst.tensor, "node": worst.node, "max_lsb_diff": _json_number(worst.max_lsb_diff),
            "differing_share": worst.differing_share,
        },
        "end_to_end_differing": drifting,
        "end_to_end_share": drifting / elements if elements else 0.0,
        "worst_end_to_end": None if drift is None or not drift.end_to_end_differing else {
            "tensor": drift.tensor, "node": drift.node, "max_lsb_diff": _json_number(drift.end_to_end_max_lsb_diff),
            "differing_share": drift.end_to_end_share,
        },
    }


@dataclass
class Divergence:
    """The first tensor, in the original's topological order, that departs from the reference.

    ``node`` is the original node writing it (a quantizer for an internal tap);
    ``suspects`` are nodes of the lowered model between the last tensors that still
    matched and this one, where the difference arose; ``first_difference`` names an
    earlier tap that differs within the tolerance (where a difference that grew began).
    """

    level: str
    node: str
    tensor: str
    amount: str
    suspects: list[str] = field(default_factory=list)
    first_difference: str | None = None

    def line(self) -> str:
        text = f"first divergence at {self.level}: node {self.node!r} (tensor {self.tensor!r}): {self.amount}"
        if self.suspects:
            text += f"; lowered nodes since the last matching tensors: {', '.join(self.suspects)}"
        if self.first_difference:
            text += f"; the first difference: {self.first_difference}"
        return text

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class Advisory:
    """A setting run for information, not held to a rule (OpenVINO's default precision hint)."""

    level: str
    settings: dict[str, str]
    outputs: list[OutputRecord] = field(default_factory=list)
    internal: list[InternalRecord] = field(default_factory=list)
    note: str | None = None

    def summary(self) -> str:
        if self.note:
            return f"{self.level}: {self.note}"
        hint = self.settings.get("INFERENCE_PRECISION_HINT", "")
        differing = [record for record in self.outputs if record.differing_share]
        text = f"{self.level} ({hint}): {len(differing)} of {len(self.outputs)} outputs differ"
        if differing:
            worst = max(differing, key=lambda record: record.max_unit_diff)
            unit = "LSB" if worst.max_lsb_diff is not None else "x unit"
            text += f" (worst {worst.name!r}: {worst.differing_share:.2%} of elements, {worst.max_unit_diff:g} {unit})"
        inside = internal_summary(self.internal, self.level)
        if inside["tensors"]:
            text += f"; {inside['differing_share']:.2%} of {inside['elements']} internal elements differ"
            if inside["worst"]:
                text += f" (worst {inside['worst']['node']!r}: {inside['worst']['max_lsb_diff']} LSB)"  # type: ignore[index]
        return text

    def to_dict(self) -> dict[str, object]:
        return {
            "level": self.level,
            "settings": dict(self.settings),
            "summary": self.summary(),
            "outputs": [record.to_dict() for record in self.outputs],
            "internal_summary": internal_summary(self.internal, self.level),
            "note": self.note,
        }


@dataclass
class VerificationReport:
    """The verdict: per-output and per-tap records, the settings used, and one-line failure reasons.

    JSON fields (``to_dict``): ``passed``; ``target``, ``tolerance_lsb``, ``batches``,
    ``seed``; ``runtime`` ("onnxruntime" or "openvino") and ``settings`` (per level, what
    the runner ran with); ``outputs`` (an :class:`OutputRecord` per graph output and
    level); ``internal_summary`` (per level: taps and elements compared, differing, the
    worst tap) and ``internal`` (the :class:`InternalRecord` of each tap that differs or
    fails); ``first_divergence`` (a :class:`Divergence`, or null); ``kernels`` (a
    :class:`~qlower.verification.kernels.KernelCount` at ``ORT_ENABLE_ALL``, or null);
    ``advisories`` (settings run for information only); ``notes``; ``failures``.
    """

    target: str
    tolerance_lsb: float
    batches: int
    seed: int
    runtime: str = "onnxruntime"
    settings: dict[str, dict[str, str]] = field(default_factory=dict)
    outputs: list[OutputRecord] = field(default_factory=list)
    internal: list[InternalRecord] = field(default_factory=list)
    first_divergence: Divergence | None = None
    kernels: KernelCount | None = None
    advisories: list[Advisory] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def failure_message(self) -> str:
        """The first failure, with the first divergence when one was located."""
        if not self.failures:
            return ""
        if self.first_divergence is None:
            return self.failures[0]
        return f"{self.failures[0]}; {self.first_divergence.line()}"

    def to_dict(self) -> dict[str, object]:
        levels = list(self.settings)
        return {
            **header("verify"),
            "passed": self.passed,
            "target": self.target,
            "tolerance_lsb": self.tolerance_lsb,
            "batches": self.batches,
            "seed": self.seed,
            "runtime": self.runtime,
            "settings": {level: dict(values) for level, values in self.settings.items()},
            "outputs": [record.to_dict() for record in self.outputs],
            "internal_summary": [internal_summary(self.internal, level) for level in levels],
            "internal": [
                record.to_dict() for record in self.internal if record.differing or record.end_to_end_differing or not record.passed
            ],
            "first_divergence": self.first_divergence.to_dict() if self.first_divergence else None,
            "kernels": self.kernels.to_dict() if self.kernels else None,
            "advisories": [advisory.to_dict() for advisory in self.advisories],
            "notes": list(self.notes),
            "failures": list(self.failures),
        }

    def raise_if_failed(self) -> None:
        """Raise VerificationError with the failure message when verification failed."""
        if self.failures:
            raise VerificationError(self.failure_message())


@dataclass
class Tally:
    """Running comparison of one output at one level."""

    max_abs: float = 0.0
    max_units: float = 0.0
    differing: int = 0
    total: int = 0
    note: str | None = None

    def add(
        self, reference: np.ndarray, got: np.ndarray, step: np.ndarray | Callable[[], np.ndarray] | None, grid: bool
    ) -> None:
        """Fold in one batch; ``step`` (broadcastable to the output) converts |diff| to units
        (a function giving it is called only when the values differ).

        On a ``grid`` both values are whole steps apart up to their float32 rounding, so a
        difference within that rounding of a whole number of steps counts as exactly that
        number (a one-LSB flip is 1, not 1.0000001).
        """
        if got.shape != reference.shape or got.dtype != reference.dtype:
            self.note = self.note or (
                f"got {got.dtype}{list(got.shape)}, the reference is {reference.dtype}{list(reference.shape)}"
            )
            self.max_abs = self.max_units = math.inf
            self.differing += reference.size
            self.total += reference.size
            return
        self.total += reference.size
        if reference.size == 0 or np.array_equal(reference, got):  # the common case, cheaply
            return
        if reference.dtype.kind not in "biuf":  # strings: equal or not
            differing = int(np.count_nonzero(reference != got))
            self.differing += differing
            if differing:
                self.max_abs = self.max_units = math.inf
            return
        ref, new = reference.astype(np.float64), got.astype(np.float64)
        both_nan = np.isnan(ref) & np.isnan(new)
        same = (ref == new) | both_nan
        with np.errstate(invalid="ignore"):
            diff = np.where(same, 0.0, np.abs(ref - new))
        diff = np.where(np.isnan(diff), np.inf, diff)  # NaN against a number, or inf - inf
        self.differing += int(np.count_nonzero(~same))
        self.max_abs = max(self.max_abs, float(diff.max()))
        if step is None:
            return
        if callable(step):
            step = step()
        with np.errstate(divide="ignore", invalid="ignore"):
            units = np.where(diff == 0, 0.0, diff / step)
            if grid and reference.dtype.kind == "f":
                rounding = (np.spacing(np.abs(reference)) + np.spacing(np.abs(got))).astype(np.float64) / step
                whole = np.rint(units)
                units = np.where(np.abs(units - whole) <= rounding, whole, units)
        self.max_units = max(self.max_units, float(np.nan_to_num(units, nan=np.inf, posinf=np.inf).max()))


def add_taps(
    tallies: Sequence[Tally],
    references: Sequence[np.ndarray],
    gots: Sequence[np.ndarray],
    steps: Sequence[Callable[[np.ndarray], np.ndarray]],
    identical: bool | None = None,
) -> None:
    """``Tally.add(reference, got, step of the reference, grid=True)`` for each tap of one batch;
    in the common case (every tap bit-identical, see :func:`qlower.reference.all_identical`)
    that adds only the element counts, which is what each ``add`` would do then (equal NaNs
    and zeros included: they add no difference). ``identical``: ``all_identical(references,
    gots)`` when the caller knows it already."""
    if identical if identical is not None else all_identical(references, gots):
        for tally, reference in zip(tallies, references):
            tally.total += reference.size
        return
    for tally, reference, got, step in zip(tallies, references, gots, steps, strict=True):
        tally.add(reference, got, _step_of(step, reference), True)


def _step_of(step: Callable[[np.ndarray], np.ndarray], reference: np.ndarray) -> Callable[[], np.ndarray]:
    return lambda: step(reference.astype(np.float64))


def make_record(name: str, level: str, tally: Tally, unit: Unit, exact: bool, tolerance: float) -> OutputRecord:
    if exact:
        rule, passed = "bit-identical", tally.differing == 0 and tally.note is None
    elif unit.kind == "grid":
        rule, passed = f"<= {tolerance:g} LSB", tally.max_units <= tolerance and tally.note is None
    else:
        rule, passed = f"<= {tolerance:g} x unit", tally.max_units <= tolerance and tally.note is None
    return OutputRecord(
        name=name,
        level=level,
        max_abs_diff=tally.max_abs,
        max_lsb_diff=tally.max_units if unit.kind == "grid" else None,
        max_unit_diff=tally.max_units,
        differing_share=tally.differing / tally.total if tally.total else 0.0,
        lsb_source=unit.source,
        rule=rule,
        passed=passed,
        note=tally.note,
    )


def failure_line(record: OutputRecord, tally: Tally) -> str:
    """One line naming the output and level, with what differed."""
    where = f"output {record.name!r} at {record.level}"
    if record.note:
        return f"{where}: {record.note}"
    amount = f"{tally.differing} of {tally.total} elements differ (max |diff| {record.max_abs_diff:g}"
    amount += f", {record.max_lsb_diff:g} LSB)" if record.max_lsb_diff is not None else f", {record.max_unit_diff:g} x unit)"
    if record.rule == "bit-identical":
        return f"{where}: {amount}; must be bit-identical to the reference"
    return f"{where}: {amount}; exceeds the tolerance {record.rule}"



def make_internal_record(
    point_tensor: str, node: str, lowered_tensor: str, level: str, tally: Tally, drift: Tally, exact: bool, tolerance: float,
    why_exact: str | None = None,
) -> InternalRecord:
    """``tally`` compares the tap with its local reference (the plain reference when ``exact``), ``drift`` end to end.
    ``why_exact`` says why a tap is held bit-identical at a level where a tolerance applies."""
    if exact:
        rule = "bit-identical" + (f" ({why_exact})" if why_exact else "")
        passed = tally.differing == 0 and tally.note is None
    else:
        rule, passed = f"<= {tolerance:g} LSB of its local reference", tally.max_units <= tolerance and tally.note is None
    return InternalRecord(
        tensor=point_tensor,
        node=node,
        lowered_tensor=lowered_tensor,
        level=level,
        max_abs_diff=tally.max_abs,
        max_lsb_diff=tally.max_units,
        differing=tally.differing,
        elements=tally.total,
        end_to_end_max_lsb_diff=drift.max_units,
        end_to_end_differing=drift.differing,
        rule=rule,
        passed=passed,
        note=tally.note,
    )


def internal_failure_line(first: InternalRecord, others: int) -> str:
    """One line naming the first failing tap at a level (topologically) and how many more fail."""
    line = f"internal tensor {first.tensor!r} (quantizer {first.node!r}) at {first.level}: {first.amount()}"
    exact = first.rule.startswith("bit-identical")
    line += "; must be bit-identical to the reference" + first.rule.removeprefix("bit-identical") if exact else f"; exceeds the tolerance {first.rule}"
    return line + (f" ({others} more internal tensors fail there)" if others else "")
