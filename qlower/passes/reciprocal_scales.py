"""Report each QuantizeLinear whose scale a reciprocal multiply does not divide exactly.

Only under a profile with ``report_reciprocal_scales`` (openvino). ONNX's QuantizeLinear
divides by the scale; OpenVINO computes it as a FakeQuantize that multiplies by a
precomputed reciprocal. For a power-of-two scale both are exact; otherwise ``x * (1/s)``
and ``x / s`` may differ in the last float32 bit, which moves a value lying on a rounding
tie (or within one float32 ulp of it) to the other side: the output differs by at most 1
step there, and only there. Nothing is rewritten (dividing in a separate op first would
cost the int8 kernels); the report names each such node with that bound.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import GraphPass, LoweringContext, UnitRecord


def _is_power_of_two(values: np.ndarray) -> bool:
    mantissa, _ = np.frexp(np.asarray(values, dtype=np.float32))
    return bool(np.all(mantissa == 0.5))


class ReportReciprocalScales(GraphPass):
    name = "reciprocal_scales"
    matches = "QuantizeLinear with a constant scale that is not a power of two (profile report_reciprocal_scales)"
    emits = "nothing; one report record per node"

    def run(self, ctx: LoweringContext) -> list[UnitRecord]:
        if not ctx.profile.report_reciprocal_scales:
            return []
        records = []
        for node in ctx.graph.nodes:
            if node.op != "QuantizeLinear" or not isinstance(node.inputs[1], gs.Constant):
                continue
            scale = np.asarray(node.inputs[1].values)
            if _is_power_of_two(scale):
                continue
            records.append(UnitRecord(
                node.name, node.op, self.name, None,
                f"scale {float(scale.ravel()[0]):.6g}{' (per channel)' if scale.size > 1 else ''} is not a power of two: "
                "a reciprocal multiply (OpenVINO) may move a value on a tie by 1 step",
            ))
        return records
