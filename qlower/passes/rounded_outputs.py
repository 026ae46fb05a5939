"""Give a compute unit integers where a float-path quantizer feeds it (Trunc, e.g. after a
TruncAvgPool before the classifier; non-ROUND activation quantizers).

    Mul(rnd(Clip(t, lo, hi)), s)  |  Mul(Clip(rnd(t), lo, hi), s)       rnd in {Round, Floor, Ceil}
      ==>  Cast([Add(rnd(..), 128)], uint8) -> DequantizeLinear(s, 0 | 128)

The exact float path ends by scaling an integer-valued float ``r`` in ``[lo, hi]`` (integer
bounds, zero point 0); when ``[lo, hi]`` fits uint8 (or int8, stored as uint8 with zero point
128: ``r + 128`` is exact for such small integers) the Cast is exact and
``DequantizeLinear(q, s, z) = float32((q - z) * s) = float32(r * s)``, bit for bit the Mul it
replaces. Only outputs that reach a Conv/MatMul/Gemm input (through ops that commute with
dequantization) are rewritten, and those ops move onto the integers, so the qop unit passes
after this one read an integer activation (and ORT's own QDQ fusion, e.g. QGemm for a Gemm
whose output is the float logits, sees the DequantizeLinear right before the unit); the
original output tensor is recorded as a tap.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..links import detach
from ..taps import Tap
from .base import GraphPass, LoweringContext, NodeEmitter, UnitRecord
from .integer_paths import PASS_THROUGH, integer_path
from .integer_units import F32, Refused, producer, scalar_constant

ROUNDING = frozenset({"Round", "Floor", "Ceil"})


def _integer_bounds(clip: gs.Node) -> tuple[int, int] | None:
    bounds = [scalar_constant(t) if t.name else None for t in clip.inputs[1:3]]
    if len(bounds) != 2 or any(b is None or float(b) != round(float(b)) for b in bounds):
        return None
    return int(bounds[0]), int(bounds[1])


def _rounded_range(tensor: gs.Tensor) -> tuple[int, int] | None:
    """``[lo, hi]`` when ``tensor`` is rnd(Clip(.., lo, hi)) or Clip(rnd(..), lo, hi), else None."""
    outer = producer(tensor)
    inner = producer(outer.inputs[0]) if outer is not None and outer.inputs else None
    if outer is None or inner is None:
        return None
    if outer.op in ROUNDING and inner.op == "Clip":
        return _integer_bounds(inner)
    if outer.op == "Clip" and inner.op in ROUNDING:
        return _integer_bounds(outer)
    return None


def _feeding_mul(tensor: gs.Tensor) -> gs.Node | None:
    """The Mul that makes a compute unit's input, through ops that commute with dequantization."""
    node = producer(tensor)
    while node is not None and node.op in PASS_THROUGH and node.op != "Concat":
        node = producer(node.inputs[0])
    return node if node is not None and node.op == "Mul" else None


class RoundedOutputsAsIntegers(GraphPass):
    name = "rounded_outputs_as_integers"
    matches = "Mul(Round|Floor|Ceil and Clip(integer bounds within 8 bits), scalar s) reaching a Conv/MatMul/Gemm input"
    emits = "[Add(128) ->] Cast(uint8) -> DequantizeLinear(s, 0 | 128), the same float values"

    def run(self, ctx: LoweringContext) -> list[UnitRecord]:
        records = []
        done: set[int] = set()
        for node in [n for n in ctx.graph.nodes if n.op in ("Conv", "MatMul", "Gemm")]:
            mul = _feeding_mul(node.inputs[0])
            if mul is None or id(mul) in done or len(mul.inputs) != 2:
                continue
            scales = [scalar_constant(t) for t in mul.inputs]
            index = 1 if scales[1] is not None else 0 if scales[0] is not None else None
            if index is None:
                continue
            rounded = mul.inputs[1 - index]
            found = _rounded_range(rounded)
            if found is None:
                continue
            low, high = found
            offset = 0 if 0 <= low and high <= 255 else 128 if -128 <= low and high <= 127 else None
            if offset is None:
                continue
            done.add(id(mul))
            em = NodeEmitter(ctx.graph, mul.name)
            output = mul.outputs[0]
            scale = np.asarray(scales[index], F32)
            detach(mul)  # run_graph_pass relinks the constants it read
            shifted = rounded if offset == 0 else em.node("Add", [rounded, em.constant("shift", np.asarray(offset, F32))])
            integers = em.node("Cast", [shifted], {"to": onnx.TensorProto.UINT8}, dtype=np.uint8)
            em.write("DequantizeLinear", [integers, em.constant("scale", scale), em.constant("zero_point", np.asarray(offset, np.uint8))],
                     output, name=f"{mul.name}/dequantize")
            ctx.taps.append(Tap.of(output.name, integers.name, scale, np.asarray(offset)))
            moved = ""
            try:  # ops between it and the unit move onto the integers, so the DequantizeLinear
                path = integer_path(node.inputs[0])  # sits right before the unit (ORT's QDQ
                moved = path.describe()  # fusions, e.g. QGemm, need that)
                path.materialize(ctx.graph)
            except Refused:
                pass
            records.append(UnitRecord(mul.name, "Mul", self.name,
                                      f"integers [{low}, {high}] as uint8 (zero point {offset}) -> DequantizeLinear, exact"
                                      + (f"; {moved}" if moved else "")))
        return records
