"""The shape every lowering pass has, and the small graph-building vocabulary they share.

A pass is a rule: ``applies_to`` is the pattern (which quantizers it is about), ``check``
returns ``None`` to go or a reason in words a user understands, ``rewrite`` emits the
replacement and returns a one-line description of it. ``run_pass`` applies a rule to the
quantizers still pending and returns the records for the report. Passes never call each
other; the pipeline orders them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from ..analysis import Quantizer
from ..links import constant_links_deferred, detach, new_constant, new_node, new_variable
from ..profiles import PORTABLE, Profile
from ..taps import Tap

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@dataclass
class QuantizerRecord:
    """What became of one quantizer: the pass that lowered it and why others passed it by."""

    node: str
    op: str
    role: str
    bits: float | None
    lowered_by: str | None = None
    emitted: str | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    float_path: bool = False
    # The quantizer's parameters as analysis.describe gives them (tensor, signed, layout, ...).
    details: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "node": self.node,
            "op": self.op,
            "role": self.role,
            "bits": self.bits,
            **self.details,
            "lowered_by": self.lowered_by,
            "emitted": self.emitted,
            "float_path": self.float_path,
            "skipped": [{"pass": name, "reason": reason} for name, reason in self.skipped],
        }


@dataclass
class LoweringContext:
    """What every pass may read: the graph being rewritten and the output settings.

    ``taps`` collects where quantizer outputs a pass turned into integer tensors now live
    (see :mod:`qlower.taps`); the pipeline writes them into the lowered model.
    ``x86_without_vnni``: integer units must also be exact on x86 CPUs without VNNI, whose
    u8s8 kernel saturates int8 weights above magnitude 64 (qop only).
    """

    graph: gs.Graph
    opset: int
    target: str
    taps: list[Tap] = field(default_factory=list)
    x86_without_vnni: bool = False
    profile: Profile = PORTABLE


class QuantizerPass(ABC):
    """A rewrite of one QONNX quantizer into standard ONNX."""

    name: ClassVar[str]
    matches: ClassVar[str]
    emits: ClassVar[str]
    uses_float_path: ClassVar[bool] = False
    # Only passes that read parameters as tensors may see a quantizer whose scale, zero
    # point or bit width is computed at run time (its ``Quantizer`` fields are None).
    takes_runtime_parameters: ClassVar[bool] = False

    @abstractmethod
    def applies_to(self, q: Quantizer) -> bool:
        """The pattern: op type, role and constness this pass is about."""

    def check(self, q: Quantizer, ctx: LoweringContext) -> str | None:
        """``None`` to go ahead, else the reason the pass leaves ``q`` alone."""
        return None

    @abstractmethod
    def rewrite(self, q: Quantizer, ctx: LoweringContext) -> str:
        """Emit the replacement for ``q`` (its output tensor keeps its name); describe it."""


def run_pass(
    rule: QuantizerPass, pending: list[Quantizer], ctx: LoweringContext, records: dict[str, QuantizerRecord]
) -> list[Quantizer]:
    """Apply ``rule`` to every pending quantizer it matches; return those still pending."""
    still_pending = []
    with constant_links_deferred():  # detach leaves the constants it read to one rebuild at the end
        for q in pending:
            if not rule.applies_to(q):
                still_pending.append(q)
                continue
            record = records[q.name]
            if q.runtime and not rule.takes_runtime_parameters:
                record.skipped.append((rule.name, f"{' and '.join(q.runtime)} computed at run time"))
                still_pending.append(q)
                continue
            reason = rule.check(q, ctx)
            if reason is not None:
                record.skipped.append((rule.name, reason))
                still_pending.append(q)
                continue
            record.emitted = rule.rewrite(q, ctx)
            record.lowered_by = rule.name
            record.float_path = rule.uses_float_path
            detach(q.node)
    return still_pending


@dataclass
class UnitRecord:
    """What a graph pass did to one compute unit (or why it left it alone)."""

    node: str
    op: str
    pass_name: str
    became: str | None
    reason: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {"node": self.node, "op": self.op, "pass": self.pass_name, "became": self.became, "reason": self.reason}


class GraphPass(ABC):
    """A rewrite over standard ops after every quantizer is lowered (e.g. QLinear units)."""

    name: ClassVar[str]
    matches: ClassVar[str]
    emits: ClassVar[str]

    @abstractmethod
    def run(self, ctx: LoweringContext) -> list[UnitRecord]:
        """Rewrite every match in ``ctx.graph``; one record per match or near-match."""


def run_graph_pass(rule: GraphPass, ctx: LoweringContext) -> list[UnitRecord]:
    """Run ``rule`` over the graph; every constant's consumer list is exact again after it."""
    with constant_links_deferred():
        return rule.run(ctx)


# ---- graph-building vocabulary shared by the passes ----------------------------------


class NodeEmitter:
    """Builds nodes named after ``prefix`` (what they replace), so names are deterministic."""

    def __init__(self, graph: gs.Graph, prefix: str) -> None:
        self.graph = graph
        self.prefix = prefix
        self.counter = 0

    def constant(self, suffix: str, value: np.ndarray) -> gs.Constant:
        return new_constant(f"{self.prefix}/{suffix}", np.array(value, order="C"))

    def node(
        self,
        op: str,
        inputs: Sequence[gs.Tensor],
        attrs: dict[str, object] | None = None,
        dtype: np.dtype | type | None = np.float32,
    ) -> gs.Variable:
        """Append ``op`` with a new output tensor of ``dtype``."""
        name = self._next_name(op)
        output = new_variable(f"{name}:0", dtype)
        self.write(op, inputs, output, attrs, name=name)
        return output

    def write(self, op: str, inputs: Sequence[gs.Tensor], output: gs.Tensor, attrs: dict[str, object] | None = None, *, name: str) -> None:
        """Append ``op`` named ``name``, writing into an existing tensor (a replaced node's output)."""
        self.graph.nodes.append(new_node(op, name, attrs or {}, list(inputs), [output]))

    def _next_name(self, op: str) -> str:
        self.counter += 1
        return f"{self.prefix}/{op}_{self.counter}"


class Emitter(NodeEmitter):
    """A NodeEmitter for one quantizer: named after it, and able to write its output tensor."""

    def __init__(self, ctx: LoweringContext, q: Quantizer) -> None:
        super().__init__(ctx.graph, q.name)
        self.final_output = q.output

    def node(
        self,
        op: str,
        inputs: Sequence[gs.Tensor],
        attrs: dict[str, object] | None = None,
        dtype: np.dtype | type | None = np.float32,
        final: bool = False,
    ) -> gs.Variable:
        """Append ``op``; when ``final`` its output is the quantizer's own output tensor."""
        if not final:
            return super().node(op, inputs, attrs, dtype)
        self.write(op, inputs, self.final_output, attrs, name=self._next_name(op))
        return self.final_output


def scalar_or_vector(value: np.ndarray, axis: int | None, dtype: np.dtype | type) -> np.ndarray:
    """A Q/DQ parameter: 0-d for per-tensor, 1-d along ``axis`` for per-axis."""
    array = np.asarray(value)
    return (array.reshape(()) if axis is None else array.reshape(-1)).astype(dtype)


def broadcast_pair(scale: np.ndarray, zero_point: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point broadcast to one shape, as Q/DQ require them equal-shaped."""
    if scale.shape == zero_point.shape:
        return scale, zero_point  # (numpy's broadcasting costs more than the rest of a rewrite)
    shape = np.broadcast_shapes(scale.shape, zero_point.shape)
    return np.broadcast_to(scale, shape), np.broadcast_to(zero_point, shape)
