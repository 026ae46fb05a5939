"""Comparison of results with the reference, the per-output records and the report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import VerificationError
from ..report_schema import header
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
class VerificationReport:
    """The verdict: per-output records, the settings used, and one-line failure reasons."""

    target: str
    tolerance_lsb: float
    batches: int
    seed: int
    outputs: list[OutputRecord] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, object]:
        return {
            **header("verify"),
            "passed": self.passed,
            "target": self.target,
            "tolerance_lsb": self.tolerance_lsb,
            "batches": self.batches,
            "seed": self.seed,
            "outputs": [record.to_dict() for record in self.outputs],
            "failures": list(self.failures),
        }

    def raise_if_failed(self) -> None:
        """Raise VerificationError with the first failure line when verification failed."""
        if self.failures:
            raise VerificationError(self.failures[0])


@dataclass
class Tally:
    """Running comparison of one output at one level."""

    max_abs: float = 0.0
    max_units: float = 0.0
    differing: int = 0
    total: int = 0
    note: str | None = None

    def add(self, reference: np.ndarray, got: np.ndarray, step: np.ndarray | None, grid: bool) -> None:
        """Fold in one batch; ``step`` (broadcastable to the output) converts |diff| to units.

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
        if reference.size == 0:
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
        with np.errstate(divide="ignore", invalid="ignore"):
            units = np.where(diff == 0, 0.0, diff / step)
            if grid and reference.dtype.kind == "f":
                rounding = (np.spacing(np.abs(reference)) + np.spacing(np.abs(got))).astype(np.float64) / step
                whole = np.rint(units)
                units = np.where(np.abs(units - whole) <= rounding, whole, units)
        self.max_units = max(self.max_units, float(np.nan_to_num(units, nan=np.inf, posinf=np.inf).max()))


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

