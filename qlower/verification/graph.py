"""Lookups into the original model's graph, shared by input drawing and unit detection."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..ir import OP_ALIASES, is_qonnx_node
from ..reference import constant_values, is_constant_node


@dataclass
class GraphIndex:
    """Producer/consumer maps and constant values of the original model's graph."""

    graph: onnx.GraphProto
    constants: dict[str, np.ndarray]
    producer: dict[str, tuple[int, onnx.NodeProto]] = field(default_factory=dict)
    consumers: dict[str, list[tuple[int, onnx.NodeProto]]] = field(default_factory=dict)

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "GraphIndex":
        index = cls(model.graph, constant_values(model.graph))
        for i, node in enumerate(model.graph.node):
            if is_constant_node(node):
                continue
            for name in node.output:
                index.producer[name] = (i, node)
            for name in node.input:
                index.consumers.setdefault(name, []).append((i, node))
        return index

    def constant(self, node: onnx.NodeProto, position: int) -> np.ndarray | None:
        """Input ``position`` of ``node`` if it is a constant, else None."""
        if position >= len(node.input) or node.input[position] not in self.constants:
            return None
        return np.asarray(self.constants[node.input[position]])


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def quantizer_op(node: onnx.NodeProto) -> str | None:
    return OP_ALIASES.get(node.op_type, node.op_type) if is_qonnx_node(node) else None



def topological_ranks(index: GraphIndex) -> dict[int, int]:
    """Each non-constant node's position in a topological order (Kahn's, ties by node index)."""
    pending = {i: len({name for name in node.input if name in index.producer}) for i, node in _nodes(index)}
    ready = sorted(i for i, count in pending.items() if count == 0)
    ranks: dict[int, int] = {}
    queue = deque(ready)
    while queue:
        i = queue.popleft()
        ranks[i] = len(ranks)
        for name in set(index.graph.node[i].output):
            for j in {j for j, _ in index.consumers.get(name, [])}:
                if j in pending:
                    pending[j] -= 1
                    if pending[j] == 0:
                        queue.append(j)
    return ranks


def _nodes(index: GraphIndex) -> list[tuple[int, onnx.NodeProto]]:
    return [(i, node) for i, node in enumerate(index.graph.node) if not is_constant_node(node)]


def input_dependent(index: GraphIndex, inputs: list[str]) -> set[str]:
    """The tensors whose values depend on the graph inputs ``inputs`` (forward reachability)."""
    reached, queue = set(inputs), deque(inputs)
    while queue:
        for _, node in index.consumers.get(queue.popleft(), []):
            for name in node.output:
                if name and name not in reached:
                    reached.add(name)
                    queue.append(name)
    return reached
