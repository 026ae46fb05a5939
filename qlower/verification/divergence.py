"""Where a failing lowering departs from the reference (issue 11).

The tensors compared in both models (internal taps and graph outputs) are ordered by the
topological position of the original node that writes them; the first one that fails
its rule at a level is the first divergence. The nodes of the lowered model that lie
between it and the tensors that still matched (a backward walk from the diverging
tensor that stops at matching taps, graph inputs and initializers) are where the
difference arose: a corrupted weight names its DequantizeLinear and the Conv reading it.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable

import onnx

from .compare import Divergence, InternalRecord, OutputRecord

# Ops that only carry a value between units; listed after the compute nodes among suspects.
_PLUMBING = frozenset({"QuantizeLinear", "DequantizeLinear", "Clip", "Identity", "Reshape", "Flatten", "Transpose", "Cast"})
MAX_SUSPECTS = 5


def _output_amount(record: OutputRecord) -> str:
    if record.note:
        return record.note
    unit = f"{record.max_lsb_diff:g} LSB" if record.max_lsb_diff is not None else f"{record.max_unit_diff:g} x unit"
    return f"{record.differing_share:.2%} of elements differ (max |diff| {record.max_abs_diff:g}, {unit})"


def suspects(lowered: onnx.ModelProto, start: str, matched: set[str], limit: int = MAX_SUSPECTS) -> list[str]:
    """Lowered nodes upstream of ``start`` and downstream of the ``matched`` tensors, compute ops first."""
    graph = lowered.graph
    producers = {name: (i, node) for i, node in enumerate(graph.node) for name in node.output if name}
    stops = matched | {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer}
    seen_nodes: dict[int, onnx.NodeProto] = {}
    queue, seen = deque([start]), {start}
    while queue:
        tensor = queue.popleft()
        if tensor not in producers or (tensor in stops and tensor != start):
            continue
        i, node = producers[tensor]
        seen_nodes[i] = node
        for name in node.input:
            if name and name not in seen:
                seen.add(name)
                queue.append(name)
    ordered = sorted(seen_nodes.items(), key=lambda item: (item[1].op_type in _PLUMBING, item[0]))
    return [f"{node.name or f'{node.op_type}#{i}'} ({node.op_type})" for i, node in ordered[:limit]]


def first_divergence(
    level: str,
    internal: Iterable[tuple[int, InternalRecord]],
    outputs: Iterable[tuple[int, OutputRecord, str]],
    lowered: onnx.ModelProto,
) -> Divergence | None:
    """The earliest failing tensor at ``level``: taps as ``(rank, record)``, outputs as ``(rank, record, node)``."""
    taps = list(internal)
    candidates: list[tuple[int, str, str, str, str]] = []  # rank, node, tensor, amount, lowered tensor
    candidates += [(rank, r.node, r.tensor, r.amount(), r.lowered_tensor) for rank, r in taps if not r.passed]
    candidates += [(rank, node, r.name, _output_amount(r), r.name) for rank, r, node in outputs if not r.passed]
    if not candidates:
        return None
    rank, node, tensor, amount, lowered_tensor = min(candidates, key=lambda item: item[0])
    matched = {name for _, r in taps if r.passed for name in (r.lowered_tensor, r.tensor)}
    # A difference within the tolerance further up often is where it started (a tie gone
    # the other way that later layers grow): name the earliest one too.
    earlier = [(r_rank, r) for r_rank, r in taps if r.passed and r.differing and r_rank < rank]
    first_difference = None
    if earlier:
        first = min(earlier, key=lambda item: item[0])[1]
        first_difference = f"node {first.node!r}: {first.amount()}, within the tolerance"
    return Divergence(level, node, tensor, amount, suspects(lowered, lowered_tensor, matched), first_difference)
