"""Drop a Relu that the QuantizeLinear after it already applies (qop: units left float).

    Relu -> QuantizeLinear(s, zp at the container's minimum)  ==>  QuantizeLinear(s, zp)

QuantizeLinear saturates ``rint(x / s) + zp`` to its container; with every zero point at
the container's minimum (uint8 0, int8 -128) and ``s > 0``, any ``x <= 0`` (``-0.0``
included) quantizes to the minimum, which is what ``Relu(x) = 0`` quantizes to, and a
positive ``x`` is unchanged by the Relu: ``Q(Relu(x)) == Q(x)`` for every float ``x``.
(NaN aside: QONNX gives NaN there and no integer tensor can, the known NaN-into-integer
limitation; both forms feed the same NaN to the same QuantizeLinear's saturation.)
The units the qop passes fuse already fold their Relu; this is for the ones left float,
e.g. the first conv of a network on the float image (Conv -> BatchNorm -> Relu -> Q),
where ONNX Runtime would run the Relu as a node of its own.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import GraphPass, LoweringContext, UnitRecord
from .integer_units import EIGHT_BIT, only_consumer


def _saturates_at_zero(quantize: gs.Node) -> bool:
    """Every zero point of ``quantize`` is its container's minimum (and the scales are positive)."""
    if len(quantize.inputs) < 3 or not all(isinstance(t, gs.Constant) for t in quantize.inputs[1:3]):
        return False
    scale, zero_point = (np.asarray(t.values) for t in quantize.inputs[1:3])
    if zero_point.dtype not in EIGHT_BIT or not np.all(scale > 0):
        return False
    return bool(np.all(zero_point == np.iinfo(zero_point.dtype).min))


class SaturatedRelu(GraphPass):
    name = "saturated_relu"
    matches = "Relu whose only consumer is a QuantizeLinear with every zero point at the container's minimum"
    emits = "the QuantizeLinear reading the Relu's input (its saturation is the Relu)"

    def run(self, ctx: LoweringContext) -> list[UnitRecord]:
        records = []
        for relu in [node for node in ctx.graph.nodes if node.op == "Relu" and node.outputs]:
            quantize = only_consumer(ctx.graph, relu.outputs[0])
            if quantize is None or quantize.op != "QuantizeLinear" or quantize.inputs[0] is not relu.outputs[0]:
                continue
            if not _saturates_at_zero(quantize):
                continue
            source = relu.inputs[0]
            quantize.inputs[0] = source
            relu.inputs.clear()
            relu.outputs.clear()
            records.append(UnitRecord(relu.name, "Relu", self.name, f"dropped: {quantize.name}'s saturation at its zero point is the Relu"))
        return records
