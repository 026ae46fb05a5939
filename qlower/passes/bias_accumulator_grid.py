"""Put every quantized bias on its unit's accumulator grid, exactly.

    DQ(b, s_b, zp_b)  ->  DQ(b', float32(s_x * s_w), 0)   when DQ(b') == DQ(b) bit for bit

Integer kernels add the bias to the int32 accumulator, i.e. in units of s_x*s_w, and
ONNX Runtime's own QDQ fusion (QGemm, QLinearConv) assumes that scale without checking
it (SPEC 2.2/4): a QKeras bias on its own power-of-two grid comes out wrong by tens of
LSB at ORT_ENABLE_ALL. Rescaling the stored integers is exact whenever every bias value
is a whole multiple of s_x*s_w; then the QLinear passes take the bias as is, and units
that stay QCDQ (a float output, BatchNormalization before the quantizer) fuse correctly.
A bias that cannot move is reported, since ORT may still fuse it with the wrong scale.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..links import replace_input
from .base import GraphPass, LoweringContext, NodeEmitter, UnitRecord
from .integer_paths import integer_path
from .integer_units import (
    F32,
    IntegerWeight,
    Refused,
    accumulator_bias,
    constant_float,
    integer_weight,
    is_constant,
    only_consumer,
    producer,
)


def _output_channel_weight(node: gs.Node) -> IntegerWeight:
    """The weight with its scale along the output channels the bias runs along."""
    weight = integer_weight(node.inputs[1])
    output_axis = 0 if node.op == "Conv" or (node.op == "Gemm" and node.attrs.get("transB", 0)) else weight.values.ndim - 1
    if weight.axis not in (None, output_axis):
        raise Refused(f"the weight scale varies along axis {weight.axis}, not along the output channels")
    return weight


def _bias_input(graph: gs.Graph, node: gs.Node) -> tuple[gs.Node, int] | None:
    """Which node input carries the bias: Conv/Gemm input 2, or the Add after a MatMul."""
    if node.op in ("Conv", "Gemm"):
        return (node, 2) if len(node.inputs) > 2 and node.inputs[2].name else None
    add = only_consumer(graph, node.outputs[0])
    if add is None or add.op != "Add":
        return None
    index = 1 if add.inputs[0] is node.outputs[0] else 0
    return (add, index) if constant_float(add.inputs[index]) is not None else None


class BiasAccumulatorGrid(GraphPass):
    name = "bias_accumulator_grid"
    matches = "DQ(int bias, s_b) into Conv | Gemm | Add-after-MatMul whose x and w are DQ'd integers, s_b != s_x*s_w"
    emits = "DQ(int32 bias', float32(s_x*s_w), 0), the same float values"

    def run(self, ctx: LoweringContext) -> list[UnitRecord]:
        records = []
        for node in [n for n in ctx.graph.nodes if n.op in ("Conv", "Gemm", "MatMul")]:
            found = _bias_input(ctx.graph, node)
            if found is None:
                continue
            consumer, index = found
            bias = consumer.inputs[index]
            dq = producer(bias)
            if dq is None or dq.op != "DequantizeLinear" or not is_constant(dq.inputs[0]):
                continue  # a float bias: ORT's integer fusions leave it alone
            try:
                x = integer_path(node.inputs[0])
                weight = _output_channel_weight(node)
            except Refused:
                continue  # no integer accumulator to align with
            if x.axis is not None:
                continue  # per-channel input scales: no one accumulator grid along the output channels
            accumulator_scale = (F32(x.scale) * weight.scale).astype(F32)
            stored_scale = np.asarray(dq.inputs[1].values, F32)
            zero_point = np.asarray(dq.inputs[2].values) if len(dq.inputs) > 2 else np.zeros(())
            if not np.any(zero_point) and stored_scale.size == accumulator_scale.size and np.array_equal(
                stored_scale.reshape(-1), accumulator_scale.reshape(-1)
            ):
                continue  # already on the grid (Brevitas)
            try:
                rescaled = accumulator_bias(bias, accumulator_scale)
            except Refused as refused:
                records.append(UnitRecord(node.name, node.op, self.name, None,
                                          f"{refused}; ORT's integer fusion may add it at the wrong scale"))
                continue
            em = NodeEmitter(ctx.graph, f"{node.name}/bias")
            attrs = {} if accumulator_scale.ndim == 0 else {"axis": rescaled.ndim - 1}
            replace_input(consumer, index, em.node(
                "DequantizeLinear",
                [em.constant("int32", rescaled), em.constant("scale", accumulator_scale),
                 em.constant("zero_point", np.zeros(accumulator_scale.shape, np.int32))],
                attrs,
            ))
            records.append(UnitRecord(node.name, node.op, self.name,
                                      f"bias moved to int32 at the accumulator scale s_x*s_w (exact, was scale {float(stored_scale.reshape(-1)[0]):g})"))
        return records
