"""Move operators that commute with dequantization to the integer side.

    op(DQ(q, s, zp)) == DQ(op(q), s, zp)        (per-tensor s, zp)

holds exactly for ops that only move values (Reshape, Flatten, Transpose, Squeeze,
Unsqueeze), for MaxPool (DQ is increasing), for Concat of inputs sharing one (s, zp,
container), for Relu as ``Clip(q, zp, max)`` (DQ(zp) is +0) and for a float Clip whose
bounds are grid values ``(k - zp) * s``. Afterwards a unit's input is ``DQ(q)`` again, so
the QLinear passes see it; anything else keeps ``DQ -> float op -> Q``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import GraphPass, LoweringContext, UnitRecord
from .integer_units import F32, IntegerActivation, Refused, detach, integer_activation, is_constant, producer, scalar_constant

_VALUE_MOVING = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "MaxPool"})
_HANDLED = _VALUE_MOVING | {"Concat", "Relu", "Clip"}


def _dequantize(q: int, source: IntegerActivation) -> np.float32:
    """What DequantizeLinear gives for the integer ``q``: float(q - zp) * s."""
    return F32(q - int(source.zero_point)) * F32(source.scale)


def _integer_bound(bound: gs.Tensor | None, source: IntegerActivation, lower: bool) -> int:
    """The integer ``k`` with ``Clip`` at ``bound`` == ``Clip`` at ``DQ(k)``; Refused if none."""
    info = np.iinfo(source.dtype)
    extreme = int(info.min) if lower else int(info.max)
    if bound is None or not bound.name:
        return extreme
    value = scalar_constant(bound)
    if value is None:
        raise Refused("the Clip bound is not a constant scalar")
    value = F32(value)
    # Beyond the container's range the bound never acts.
    if (lower and value <= _dequantize(int(info.min), source)) or (not lower and value >= _dequantize(int(info.max), source)):
        return extreme
    nearest = int(np.clip(np.rint(value / source.scale + F32(source.zero_point)), info.min, info.max))
    if _dequantize(nearest, source) != value:
        raise Refused(f"the Clip bound {float(value):g} is not a value of the input's grid (step {float(source.scale):g})")
    return nearest


def _dequantized_activation(tensor: gs.Tensor) -> bool:
    node = producer(tensor)
    return node is not None and node.op == "DequantizeLinear" and not is_constant(node.inputs[0])


class IntegerPassThrough(GraphPass):
    name = "integer_passthrough"
    matches = "DQ(q) -> MaxPool | Reshape | Flatten | Transpose | Squeeze | Unsqueeze | Relu | Clip | Concat(equal qparams)"
    emits = "the op on the integers (Relu and Clip as an integer Clip) -> DQ"

    def run(self, ctx: LoweringContext) -> list[UnitRecord]:
        graph = ctx.graph
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        records = []
        # Topological order, so a chain (DQ -> Reshape -> Transpose) moves one op at a time.
        for node in [n for n in graph.nodes if n.op in _HANDLED and n.domain in (None, "", "ai.onnx")]:
            data = node.inputs if node.op == "Concat" else node.inputs[:1]
            if not data or not all(_dequantized_activation(t) for t in data):
                continue  # a float input or a constant (weights): not a candidate
            try:
                sources = [integer_activation(t, "the input") for t in data]
                became = self._move(graph, node, sources)
            except Refused as refused:
                records.append(UnitRecord(node.name, node.op, self.name, None, str(refused)))
                continue
            records.append(UnitRecord(node.name, node.op, self.name, became))
        return records

    def _move(self, graph: gs.Graph, node: gs.Node, sources: list[IntegerActivation]) -> str:
        """Check, then rewrite ``node`` onto the integers; Refused leaves the graph untouched."""
        first = sources[0]
        if any(
            s.dtype != first.dtype or s.zero_point != first.zero_point or F32(s.scale) != F32(first.scale) for s in sources
        ):
            raise Refused("the Concat inputs have different scales, zero points or containers")
        if len(node.outputs) != 1:
            raise Refused(f"{node.op} has {len(node.outputs)} outputs (e.g. MaxPool indices)")
        op, attrs, inputs = node.op, dict(node.attrs), [s.values for s in sources] + list(node.inputs[len(sources):])
        described = f"{node.op} on {first.dtype}"
        if node.op in ("Relu", "Clip"):
            if node.op == "Relu":
                low, high = int(first.zero_point), int(np.iinfo(first.dtype).max)
            else:
                bounds = list(node.inputs[1:3])
                low = _integer_bound(bounds[0] if bounds else None, first, lower=True)
                high = _integer_bound(bounds[1] if len(bounds) > 1 else None, first, lower=False)
            op, attrs = "Clip", {}
            inputs = [first.values, gs.Constant(f"{node.name}/low", np.asarray(low, first.dtype)),
                      gs.Constant(f"{node.name}/high", np.asarray(high, first.dtype))]
            described = f"integer Clip[{low},{high}] on {first.dtype}"
        output = node.outputs[0]
        integers = gs.Variable(f"{node.name}/integers", dtype=first.dtype)
        detach(node)
        graph.nodes.append(gs.Node(op, node.name, attrs, inputs, [integers]))
        scale, zero_point = first.dq.inputs[1], first.dq.inputs[2]
        graph.nodes.append(gs.Node("DequantizeLinear", f"{node.name}/dequantize", {}, [integers, scale, zero_point], [output]))
        return f"{described} -> DequantizeLinear"
