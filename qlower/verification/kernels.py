"""Which compute units ONNX Runtime runs as integer kernels, read from its optimized graph.

After ``ORT_ENABLE_ALL`` (the graph ORT saves through ``optimized_model_filepath``), a
Conv/MatMul/Gemm runs as an integer kernel when it has become one of
:data:`INTEGER_KERNELS`; it stays float when a float compute op (:data:`FLOAT_KERNELS`,
ORT's fused and layout-transformed forms included) is left. For each float one the count
says what in the optimized graph kept ORT from fusing it: an input that no
DequantizeLinear produces (a float input or weight), or DequantizeLinear inputs with no
QuantizeLinear after the output (Conv/Gemm need one; MatMul only for QLinearMatMul), or,
when both sides are quantized, which container types meet there (on x86 ORT fuses only
uint8 activations: an int8 activation keeps a Conv float, measured with ORT 1.32, with
or without a range Clip between QuantizeLinear and DequantizeLinear); the pipeline adds the
conversion's own record of the unit when there is one (see :meth:`KernelCount.explain`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import onnx

INTEGER_KERNELS = frozenset(
    {"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "QGemm", "DynamicQuantizeMatMul", "QAttention"}
)
FLOAT_KERNELS = frozenset(
    {"Conv", "FusedConv", "NhwcConv", "NhwcFusedConv", "ConvTranspose", "MatMul", "FusedMatMul", "TransposeMatMul", "Gemm", "FusedGemm"}
)
_Q_OPS = frozenset({"QuantizeLinear"})
_DQ_OPS = frozenset({"DequantizeLinear"})


@dataclass
class FloatUnit:
    """A compute node ORT left in float, and why."""

    node: str
    op: str
    why: str

    def to_dict(self) -> dict[str, str]:
        return {"node": self.node, "op": self.op, "why": self.why}


@dataclass
class KernelCount:
    """Integer and float compute kernels in ORT's optimized graph (``ORT_ENABLE_ALL``)."""

    integer: int
    integer_ops: dict[str, int]
    float_units: list[FloatUnit] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.integer + len(self.float_units)

    def summary(self) -> str:
        ops = ", ".join(f"{count} {op}" for op, count in sorted(self.integer_ops.items()))
        return f"{self.integer}/{self.total} Conv/MatMul/Gemm run as integer kernels at ORT_ENABLE_ALL" + (f" ({ops})" if ops else "")

    def explain(self, unit_records: Iterable[Mapping[str, object]]) -> None:
        """Append the conversion's reason for each float unit it recorded (joined by node name)."""
        reasons = {str(record.get("node")): record.get("reason") for record in unit_records if record.get("reason")}
        for unit in self.float_units:
            if unit.node in reasons:
                unit.why += f"; the conversion left it: {reasons[unit.node]}"

    def to_dict(self) -> dict[str, object]:
        return {
            "integer": self.integer,
            "total": self.total,
            "integer_ops": dict(self.integer_ops),
            "float": [unit.to_dict() for unit in self.float_units],
        }


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {value.name: value.type.tensor_type.elem_type for value in [*graph.value_info, *graph.input, *graph.output]}
    types.update({tensor.name: tensor.data_type for tensor in graph.initializer})
    return types


def _why_float(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto], consumers: dict[str, list[onnx.NodeProto]], types: dict[str, int]) -> str:
    data_inputs = [name for name in node.input[:2] if name]
    unquantized = [name for name in data_inputs if producers.get(name) is None or producers[name].op_type not in _DQ_OPS]
    if unquantized:
        name = unquantized[0]
        which = "input" if name == node.input[0] else "weight"
        source = f"{producers[name].op_type} writes it" if name in producers else "a graph input or initializer"
        return f"its {which} is float: {source}, not a DequantizeLinear"
    followers = consumers.get(node.output[0], []) if node.output else []
    if not followers:
        return "its inputs are dequantized but its output is a float graph output, not requantized"
    if any(follower.op_type not in _Q_OPS for follower in followers):
        other = next(follower.op_type for follower in followers if follower.op_type not in _Q_OPS)
        return f"its inputs are dequantized but its output goes to {other}, not only to QuantizeLinear"
    containers = []
    for name in data_inputs:
        source = producers[name].input[0]
        containers.append(onnx.TensorProto.DataType.Name(types.get(source, 0)).lower())
    output_type = onnx.TensorProto.DataType.Name(types.get(followers[0].output[0], 0)).lower()
    why = f"DequantizeLinear -> {node.op_type} -> QuantizeLinear with {' x '.join(containers)} -> {output_type} containers is not fused by ORT"
    if containers and containers[0] == "int8":
        why += " (ORT's CPU fusion on x86 takes uint8 activations)"
    return why


def count_kernels(optimized: onnx.ModelProto) -> KernelCount:
    """Count the compute kernels of ORT's saved optimized graph."""
    graph = optimized.graph
    producers = {name: node for node in graph.node for name in node.output if name}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    types = _elem_types(graph)
    integer_ops: dict[str, int] = {}
    float_units = []
    for index, node in enumerate(graph.node):
        if node.op_type in INTEGER_KERNELS:
            integer_ops[node.op_type] = integer_ops.get(node.op_type, 0) + 1
        elif node.op_type in FLOAT_KERNELS:
            label = node.name or f"{node.op_type}#{index}"
            float_units.append(FloatUnit(label, node.op_type, _why_float(node, producers, consumers, types)))
    return KernelCount(sum(integer_ops.values()), integer_ops, float_units)
