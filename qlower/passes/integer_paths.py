"""A unit's input read back to integers through operators that commute with dequantization.

    op(DQ(q, s, zp)) == DQ(op(q), s, zp)        (one s, zp for every input)

holds exactly for ops that only move values (Reshape, Flatten, Transpose, Squeeze,
Unsqueeze), for MaxPool (DQ is increasing), for Concat of inputs sharing (s, zp,
container), for Relu as ``Clip(q, zp, max)`` (DQ(zp) is +0) and for a float Clip whose
bounds are grid values ``(k - zp) * s``. A fused unit moves such ops onto the integers
when its input reaches a DequantizeLinear through them; nothing moves for units that stay
QCDQ, so the rest of the graph keeps its layout (and ORT its usual fusions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..taps import Tap
from .base import LoweringContext, NodeEmitter
from .integer_units import (
    F32,
    IntegerActivation,
    IntegerWeight,
    OutputQuantizer,
    Refused,
    detach,
    int8_regions,
    integer_activation,
    producer,
    requantized_output,
    scalar_constant,
)
from .binary_output import binary_target, binary_weights, describe_binary, match_binary_output
from .unit_requant import Affine, ExactWeights, UnitOutput, describe_choice, exact_weights, match_unit_output

PASS_THROUGH = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "Concat", "Relu", "Clip"})
# Ops that keep every element in its channel, so per-channel scales pass through them.
PER_CHANNEL_THROUGH = frozenset({"MaxPool", "Relu"})


def _dequantize(q: int, source: IntegerActivation) -> np.float32:
    """What DequantizeLinear gives for the integer ``q``: float(q - zp) * s."""
    return F32(q - int(source.zero_point)) * F32(source.scale)


def _integer_bound(bound: gs.Tensor | None, source: IntegerActivation, lower: bool) -> int:
    """The integer ``k`` with Clip at ``bound`` == Clip at ``DQ(k)``; Refused if there is none."""
    info = np.iinfo(source.dtype)
    extreme = int(info.min) if lower else int(info.max)
    if bound is None or not bound.name:
        return extreme
    value = scalar_constant(bound)
    if value is None:
        raise Refused("a Clip on the input has a bound that is not a constant scalar")
    value = F32(value)
    # Beyond the container's range the bound never acts.
    if (lower and value <= _dequantize(int(info.min), source)) or (not lower and value >= _dequantize(int(info.max), source)):
        return extreme
    nearest = int(np.clip(np.rint(value / source.scale + F32(source.zero_point)), info.min, info.max))
    if _dequantize(nearest, source) != value:
        raise Refused(f"a Clip on the input has the bound {float(value):g}, which is not on the input's grid (step {float(source.scale):g})")
    return nearest


def _integer_clip(node: gs.Node, source: IntegerActivation) -> tuple[int, int]:
    """Relu or Clip as integer bounds on the source's container."""
    if node.op == "Relu":
        return int(source.zero_point), int(np.iinfo(source.dtype).max)
    bounds = list(node.inputs[1:3])
    low = _integer_bound(bounds[0] if bounds else None, source, lower=True)
    high = _integer_bound(bounds[1] if len(bounds) > 1 else None, source, lower=False)
    return low, high


@dataclass
class IntegerPath:
    """How a unit's input reaches integers: DequantizeLinears of run-time integers (the
    leaves, all with one scale, zero point and container), then ``moves``, the ops
    between, producers first, that :meth:`materialize` rewrites onto the integers."""

    leaves: list[IntegerActivation]
    moves: list[gs.Node]

    @property
    def scale(self) -> np.ndarray:
        return self.leaves[0].scale

    @property
    def zero_point(self) -> np.ndarray:
        return self.leaves[0].zero_point

    @property
    def dtype(self) -> np.dtype:
        return self.leaves[0].dtype

    @property
    def axis(self) -> int | None:
        return self.leaves[0].axis

    def describe(self) -> str:
        return "" if not self.moves else "input through integer " + " -> ".join(node.op for node in self.moves)

    def materialize(self, graph: gs.Graph) -> IntegerActivation:
        """Move every op onto the integers; return the DequantizeLinear the unit now reads."""
        current = {id(leaf.dq.outputs[0]): leaf for leaf in self.leaves}
        result = self.leaves[0]
        for node in self.moves:
            data = node.inputs if node.op == "Concat" else node.inputs[:1]
            sources = [current[id(t)] for t in data]
            first = sources[0]
            op, attrs, inputs = node.op, dict(node.attrs), [s.values for s in sources] + list(node.inputs[len(sources):])
            if node.op in ("Relu", "Clip"):
                low, high = _integer_clip(node, first)
                op, attrs = "Clip", {}
                inputs = [first.values, gs.Constant(f"{node.name}/low", np.asarray(low, first.dtype)),
                          gs.Constant(f"{node.name}/high", np.asarray(high, first.dtype))]
            output = node.outputs[0]
            integers = gs.Variable(f"{node.name}/integers", dtype=first.dtype)
            detach(node)
            graph.nodes.append(gs.Node(op, node.name, attrs, inputs, [integers]))
            dq = gs.Node("DequantizeLinear", f"{node.name}/dequantize", dict(first.dq.attrs), [integers, *first.dq.inputs[1:3]],
                         [output])
            graph.nodes.append(dq)
            result = IntegerActivation(integers, first.scale, first.zero_point, dq, first.axis)
            current[id(output)] = result
        return result


def integer_path(tensor: gs.Tensor) -> IntegerPath:
    """``tensor`` as integers, directly or through ops that commute with DequantizeLinear.

    The ops are walked back depth first, each input of a Concat in order, with a stack of
    our own (a run of a thousand Reshapes is unusual, not invalid: recursion overflowed)."""
    paths: dict[int, IntegerPath] = {}
    pending: list[tuple[gs.Tensor, bool]] = [(tensor, False)]  # (tensor, its inputs' paths are known)
    while pending:
        current, inputs_known = pending.pop()
        node = producer(current)
        if not inputs_known:
            if node is None or node.op not in PASS_THROUGH or node.domain not in (None, "", "ai.onnx"):
                paths[id(current)] = IntegerPath([integer_activation(current, "the input")], [])
                continue
            if len(node.outputs) != 1:
                raise Refused(f"the input comes from {node.op} with {len(node.outputs)} outputs (e.g. MaxPool indices)")
            pending.append((current, True))
            pending.extend((source, False) for source in reversed(_data_inputs(node)))
            continue
        assert node is not None
        paths[id(current)] = _through(node, [paths[id(source)] for source in _data_inputs(node)])
    return paths[id(tensor)]


def _data_inputs(node: gs.Node) -> list[gs.Tensor]:
    return list(node.inputs) if node.op == "Concat" else list(node.inputs[:1])


def _through(node: gs.Node, inputs: list[IntegerPath]) -> IntegerPath:
    """The path of ``node``'s output from the paths of its data inputs, or Refused."""
    leaves = {id(leaf.dq): leaf for path in inputs for leaf in path.leaves}
    moves = {id(move): move for path in inputs for move in path.moves}
    first = inputs[0].leaves[0]
    if first.axis is not None and node.op not in PER_CHANNEL_THROUGH:
        raise Refused(f"the input has per-channel scales and goes through {node.op}, which may move its channel axis")
    if any(leaf.dtype != first.dtype or leaf.zero_point != first.zero_point or leaf.axis != first.axis
           or not np.array_equal(leaf.scale.astype(F32), first.scale.astype(F32)) for leaf in leaves.values()):
        raise Refused("the Concat before the input joins tensors with different scales, zero points or containers")
    if node.op == "Clip":
        _integer_clip(node, first)  # refuses bounds off the grid
    moves[id(node)] = node
    return IntegerPath(list(leaves.values()), list(moves.values()))


def integer_range(path: IntegerPath) -> tuple[int, int]:
    """The integers ``q - zp`` the input can take: the range Clip after each leaf's
    QuantizeLinear (sub-8-bit ranges), or the two constants of a binary quantizer's Where
    select, else the container; the union over Concat leaves."""
    lows, highs = [], []
    for leaf in path.leaves:
        info = np.iinfo(leaf.dtype)
        low, high = int(info.min), int(info.max)
        clip = producer(leaf.values)
        branches = [scalar_constant(t) for t in clip.inputs[1:3]] if clip is not None and clip.op == "Where" else []
        if len(branches) == 2 and all(b is not None for b in branches):
            low, high = sorted(int(b) for b in branches)  # type: ignore[arg-type]
        elif clip is not None and clip.op == "Clip":
            bounds = [scalar_constant(t) if t.name else None for t in clip.inputs[1:3]]
            if bounds and bounds[0] is not None:
                low = max(low, int(bounds[0]))
            if len(bounds) > 1 and bounds[1] is not None:
                high = min(high, int(bounds[1]))
        lows.append(low - int(leaf.zero_point))
        highs.append(high - int(leaf.zero_point))
    return min(lows), max(highs)


# ---- the steps every compute unit shares (QLinearConv, MatMulInteger) --------------------


@dataclass
class ExactUnit:
    """A matched unit's input, output and the integers its operator gets."""

    x: IntegerPath
    output: UnitOutput
    weights: ExactWeights

    @property
    def out(self) -> OutputQuantizer:
        return self.output.out


def match_exact_unit(
    graph: gs.Graph,
    result: gs.Tensor,
    x: IntegerPath,
    x_scale: np.ndarray,
    weight: IntegerWeight,
    output_axis: int,
    start: Affine,
    out_rank: int | None,
    channel_axis: int,
    x86_without_vnni: bool,
) -> ExactUnit:
    """The checks that end every unit's match, from the compute op's float ``result``: the
    affine ops and optional Relu before the 8-bit output quantizer, int8 regions that can
    move to uint8, and the exact per-channel requantization (:mod:`qlower.requant`).
    ``x_scale`` is the input scale each output channel sees (0-d, or [C] for a depthwise
    conv with per-channel input scales). Refused names the first check that fails."""
    accumulator_scale = (x_scale.astype(F32) * weight.scale).astype(F32)
    output = (match_binary_output(graph, result, accumulator_scale, start, out_rank, channel_axis)
              or match_unit_output(graph, result, accumulator_scale, start, out_rank, channel_axis))
    int8_regions(graph, x.leaves, output.out)  # refuses a region that cannot move to uint8
    choose = binary_weights if output.binary else exact_weights
    weights = choose(weight, output_axis, integer_range(x), output, x86_without_vnni)
    return ExactUnit(x, output, weights)


@dataclass
class UnitRewrite:
    """A matched unit after the first steps of its rewrite: the input on the integers and
    every int8 region of the unit stored as uint8."""

    em: NodeEmitter
    x: IntegerActivation
    out: OutputQuantizer
    path_note: str


def output_target(em: NodeEmitter, unit: ExactUnit) -> tuple[gs.Tensor, str]:
    """Where the unit's integer operator writes, and the range note for the report."""
    if unit.output.binary:
        return binary_target(em, unit.out.as_uint8())
    return requantized_output(em, unit.out.as_uint8(), relu=unit.output.relu is not None)


def start_rewrite(graph: gs.Graph, name: str, unit: ExactUnit) -> UnitRewrite:
    path_note = unit.x.describe()
    activation = unit.x.materialize(graph)
    for region in int8_regions(graph, [activation], unit.out):
        region.to_uint8()
    return UnitRewrite(NodeEmitter(graph, name), activation.as_uint8(), unit.out.as_uint8(), path_note)


def unit_note(unit: ExactUnit) -> str:
    """What the unit folded and how it requantizes, for the report's ``became``."""
    choice = unit.weights.choice
    parts = [unit.output.affine.describe(), describe_binary(choice) if unit.output.binary else describe_choice(choice)]
    return "; ".join(part for part in parts if part)


def record_taps(ctx: LoweringContext, output: gs.Tensor, x: IntegerActivation) -> None:
    """Record where the unit's quantizers now live as integers: the DequantizeLinear of its
    input, and those of its output (after the range Clip, if any), may disappear once the
    units around them read the integers directly."""
    dqs = [x.dq]
    tensor = output
    clips = [node for node in tensor.outputs if node.op == "Clip"]
    if len(clips) == 1 and len(tensor.outputs) == 1:
        tensor = clips[0].outputs[0]
    dqs += [node for node in tensor.outputs if node.op == "DequantizeLinear"]
    for dq in dqs:
        params = dq.inputs[1:3]
        if dq.outputs and len(params) == 2 and all(isinstance(p, gs.Constant) for p in params):
            ctx.taps.append(Tap.of(dq.outputs[0].name, dq.inputs[0].name, params[0].values, params[1].values,
                                   dq.attrs.get("axis", 1) if params[0].values.size > 1 else None))
