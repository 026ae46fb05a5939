"""Keep an AveragePool on dequantized integers in float, for runtimes that would round its mean.

    DequantizeLinear -> AveragePool   ->   DequantizeLinear -> Max(x, x) -> AveragePool

Only under a profile with ``average_pool_in_float`` (openvino). OpenVINO's low-precision
transformations move a DequantizeLinear's multiply past an AveragePool and run the pool
on the uint8 integers, which rounds the mean to an integer; the Trunc that Brevitas puts
after the pool (TruncAvgPool2d) then sees a value off by up to half a step and differs
by one step on about half of the elements (measured, OpenVINO 2026.4 CPU, f32 hint).
They do not move a dequantization through Max, so the pool runs in float32 as in the
reference. ``Max(x, x) == x`` for every float, NaN included: the rewrite is exact.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import GraphPass, LoweringContext, NodeEmitter, UnitRecord

POOLS = ("AveragePool", "GlobalAveragePool")


class FloatAveragePool(GraphPass):
    name = "float_average_pool"
    matches = "AveragePool | GlobalAveragePool whose input is a DequantizeLinear output, under a profile with average_pool_in_float"
    emits = "Max(x, x) between the DequantizeLinear and the pool"

    def run(self, ctx: LoweringContext) -> list[UnitRecord]:
        if not ctx.profile.average_pool_in_float:
            return []
        records = []
        pools = [node for node in ctx.graph.nodes if node.op in POOLS and node.inputs and node.inputs[0].inputs]
        for pool in pools:
            source = pool.inputs[0]
            if source.inputs[0].op != "DequantizeLinear":
                continue
            em = NodeEmitter(ctx.graph, pool.name)
            guarded = em.node("Max", [source, source], dtype=source.dtype)
            guarded.shape = source.shape
            pool.inputs[0] = guarded
            records.append(UnitRecord(pool.name, pool.op, self.name, "Max(x, x) -> " + pool.op, "keeps the mean in float32 on OpenVINO"))
        return records
