"""Lookups into the original model's graph, shared by input drawing and unit detection."""

from __future__ import annotations

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

