"""Reading the QCDQ form back as integers: the matching vocabulary of the qop passes.

After the quantizer passes every quantized tensor is ``DequantizeLinear(q, s, zp)``: an
activation's ``q`` is a run-time uint8/int8 tensor, a weight's or bias's ``q`` an integer
initializer (behind Brevitas's range Clip and any Transposes). The helpers here recover
``(q, s, zp)`` and the quantizer after a compute op, and raise :class:`Refused` with a
reason a user understands when a unit does not fit an integer operator. They only read
the graph; the passes decide what to emit.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Generic, Sequence, TypeVar

import numpy as np
import onnx_graphsurgeon as gs

from ..links import detach, replace_input
from .base import INT32_MAX, INT32_MIN, GraphPass, LoweringContext, NodeEmitter, UnitRecord

F32 = np.float32
UINT8 = np.dtype(np.uint8)
EIGHT_BIT = (np.dtype(np.int8), UINT8)
# Largest int8 weight magnitude the u8s8 kernel of x86 CPUs without VNNI sums without
# saturating: it adds pairs of u8*s8 products in int16 (255*64*2 < 2^15 <= 255*65*2).
U8S8_SAFE_MAGNITUDE = 64


class Refused(Exception):
    """A unit does not fit an integer operator; the message is the reason for the report."""


Unit = TypeVar("Unit")


class ComputeUnitPass(GraphPass, Generic[Unit]):
    """A graph pass over compute nodes: match each into a unit (or record why not), rewrite it."""

    compute_ops: ClassVar[tuple[str, ...]]

    @abstractmethod
    def match(self, ctx: LoweringContext, node: gs.Node) -> Unit:
        """The unit around ``node``; raises Refused with the reason it cannot be fused."""

    @abstractmethod
    def rewrite_unit(self, ctx: LoweringContext, unit: Unit) -> tuple[str, str | None]:
        """Emit the integer form of ``unit``; return what it became and an optional note."""

    def run(self, ctx: LoweringContext) -> list[UnitRecord]:
        records = []
        for node in [n for n in ctx.graph.nodes if n.op in self.compute_ops]:
            try:
                unit = self.match(ctx, node)
            except Refused as refused:
                records.append(UnitRecord(node.name, node.op, self.name, None, str(refused)))
                continue
            became, note = self.rewrite_unit(ctx, unit)
            records.append(UnitRecord(node.name, node.op, self.name, became, note))
        return records


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def only_consumer(graph: gs.Graph, tensor: gs.Tensor) -> gs.Node | None:
    """The one node reading ``tensor``; None when it fans out or is also a graph output."""
    if len(tensor.outputs) != 1 or any(out is tensor for out in graph.outputs):
        return None
    return tensor.outputs[0]


def is_constant(tensor: gs.Tensor) -> bool:
    """A constant, or one node of constants (a folded weight behind its range Clip).

    One level is enough: the pipeline folds deeper constant subgraphs before lowering,
    and a bounded look keeps the passes linear on deep graphs.
    """
    if isinstance(tensor, gs.Constant):
        return True
    node = producer(tensor)
    return node is not None and all(isinstance(t, gs.Constant) for t in node.inputs if t.name)


def scalar_constant(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of a one-element constant as a 0-d array, else None."""
    if not isinstance(tensor, gs.Constant) or tensor.values.size != 1:
        return None
    return np.asarray(tensor.values).reshape(())


def _origin(tensor: gs.Tensor) -> str:
    node = producer(tensor)
    if node is None:
        return "an unquantized graph input" if not isinstance(tensor, gs.Constant) else "a float constant"
    if node.op == "Where":
        return "Where (a 1-bit sign select, which has no integer container)"
    return node.op


# ---- activations ---------------------------------------------------------------------


@dataclass
class IntegerActivation:
    """A run-time 8-bit tensor ``q`` with one zero point: ``x = (q - zp) * s``, where ``s``
    is one scale (0-d) or one per channel along ``axis`` (the DequantizeLinear's attribute,
    possibly negative; only depthwise convs take such an input)."""

    values: gs.Tensor
    scale: np.ndarray  # 0-d float32, or 1-d along axis
    zero_point: np.ndarray  # 0-d, the container type
    dq: gs.Node
    axis: int | None = None

    @property
    def dtype(self) -> np.dtype:
        return self.zero_point.dtype

    def as_uint8(self) -> IntegerActivation:
        """The same activation once its int8 region is stored as uint8 (zero point + 128)."""
        return IntegerActivation(self.values, self.scale, _uint8_zero_point(self.zero_point), self.dq, self.axis)


def equal_zero_point(tensor: gs.Tensor) -> np.ndarray | None:
    """One zero point for a constant whose values are all equal (per-channel Q/DQ), else None."""
    if not isinstance(tensor, gs.Constant) or tensor.values.size == 0:
        return None
    values = np.asarray(tensor.values).reshape(-1)
    return values[0].reshape(()) if np.all(values == values[0]) else None


def _why_not_eight_bit(dtype: np.dtype) -> str:
    if np.dtype(dtype).name.startswith("float8"):
        return "not an integer: ONNX Runtime has no float8 QLinearConv/QLinearMatMul on CPU, so the unit stays QCDQ"
    return "wider than 8 bits"


def integer_activation(tensor: gs.Tensor, what: str) -> IntegerActivation:
    """``tensor`` as ``DequantizeLinear(q, s, zp)`` of a run-time 8-bit tensor with one zero point."""
    dq = producer(tensor)
    if dq is None or dq.op != "DequantizeLinear":
        raise Refused(f"{what} comes from {_origin(tensor)}, not from an integer (DequantizeLinear) tensor")
    values = dq.inputs[0]
    if is_constant(values):
        raise Refused(f"{what} is a constant, not a run-time activation")
    params = dq.inputs[1:3]
    if len(params) != 2 or not all(isinstance(p, gs.Constant) for p in params):
        raise Refused(f"{what}'s DequantizeLinear has no constant scale and zero point")
    zero_point = equal_zero_point(params[1])
    if zero_point is None:
        raise Refused(f"{what} has per-channel zero points that differ; integer operators take one zero point per activation")
    if zero_point.dtype not in EIGHT_BIT:
        raise Refused(f"{what} is quantized to {zero_point.dtype}, {_why_not_eight_bit(zero_point.dtype)}")
    scale = scalar_constant(params[0])
    if scale is not None:
        return IntegerActivation(values, scale.astype(F32), zero_point, dq)
    return IntegerActivation(values, np.asarray(params[0].values, F32).reshape(-1), zero_point, dq, int(dq.attrs.get("axis", 1)))


# ---- one activation container: uint8 ----------------------------------------------
#
#   Q(x, s, zp, int8) -> [Clip(lo, hi)] -> [integer ops] -> DQ(s, zp)
#     ==  Q(x, s, zp + 128, uint8) -> [Clip(lo + 128, hi + 128)] -> [integer ops] -> DQ(s, zp + 128)
#
# Bit-identical: QuantizeLinear adds the zero point after rounding and saturates, so every
# integer moves by exactly 128, int8's saturation bounds become uint8's, and
# (q + 128) - (zp + 128) == q - zp; MaxPool, Concat and the reshaping ops commute with
# the shift. ORT's QLinear kernels want uint8 activations in and out (u8s8 or u8u8; s8s8
# is several times slower). Only the regions a fused unit touches are shifted: the rest
# of the graph keeps the portable QCDQ layout, because a uint8 Q/DQ invites ORT's own
# fusions of the remaining float ops, some of which fail on edge cases (QGemm with int32
# weights, QLinearAveragePool with extreme scale ratios).

SHIFT = 128
# Ops between a QuantizeLinear and its DequantizeLinears that carry the same integers.
_INTEGER_DOMAIN_OPS = frozenset({"Clip", "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat"})


def _uint8_zero_point(zero_point: np.ndarray) -> np.ndarray:
    if zero_point.dtype == UINT8:
        return zero_point
    return np.asarray(int(zero_point) + SHIFT, np.uint8)


def _int8_parameters(node: gs.Node) -> list[int]:
    """Inputs holding int8 parameters: a Clip's bounds, a Q's or DQ's zero point."""
    positions = [1, 2] if node.op == "Clip" else [2] if node.op in ("QuantizeLinear", "DequantizeLinear") else []
    return [i for i in positions if i < len(node.inputs) and node.inputs[i].name]


@dataclass
class Int8Region:
    """Connected int8 activation integers: the QuantizeLinears that make them, the integer
    ops between, the DequantizeLinears that read them. Shifting one part alone would break
    the others, so a region moves to uint8 as a whole."""

    nodes: list[gs.Node]
    tensors: list[gs.Tensor]

    def to_uint8(self) -> None:
        """Shift in place; idempotent, so overlapping regions of one unit are safe."""
        for node in self.nodes:
            for i in _int8_parameters(node):
                values = np.asarray(node.inputs[i].values)
                if values.dtype == np.int8:
                    shifted = np.asarray(values.astype(np.int16) + SHIFT, np.uint8)
                    replace_input(node, i, gs.Constant(f"{node.name}/input{i}_uint8", shifted))
        for tensor in self.tensors:
            tensor.dtype = np.uint8


def int8_region(graph: gs.Graph, start: gs.Tensor) -> Int8Region:
    """The int8 region around ``start``, checked to be shiftable; Refused when it is not."""
    nodes: dict[int, gs.Node] = {}
    tensors: dict[int, gs.Tensor] = {}
    pending = [start]
    while pending:
        tensor = pending.pop()
        if id(tensor) in tensors:
            continue
        if any(out is tensor for out in graph.outputs):
            raise Refused("an int8 activation is also a graph output, so it cannot move to uint8")
        tensors[id(tensor)] = tensor
        for node in [*tensor.inputs, *tensor.outputs]:
            if id(node) in nodes:
                continue
            nodes[id(node)] = node
            if node.op == "QuantizeLinear" and node.outputs[0] is tensor:
                continue  # the region starts here
            if node.op == "DequantizeLinear" and node.inputs[0] is tensor:
                continue  # and ends here
            if node.op not in _INTEGER_DOMAIN_OPS:
                raise Refused(f"the int8 activation also feeds {node.op}, so it cannot move to uint8")
            pending.extend(node.inputs if node.op == "Concat" else node.inputs[:1])
            pending.extend(node.outputs)
    for node in nodes.values():
        for i in _int8_parameters(node):
            parameter = node.inputs[i]
            if not isinstance(parameter, gs.Constant) or parameter.values.dtype != np.int8:
                raise Refused(f"{node.op} {node.name!r} has no int8 constant to shift to uint8")
    return Int8Region(list(nodes.values()), list(tensors.values()))


def int8_regions(graph: gs.Graph, inputs: Sequence[IntegerActivation], out: OutputQuantizer) -> list[Int8Region]:
    """The int8 regions of a unit's inputs and output, which its rewrite moves to uint8."""
    ends = [(x.values, x.dtype) for x in inputs] + [(out.output, out.zero_point.dtype)]
    return [int8_region(graph, tensor) for tensor, dtype in ends if dtype == np.int8]


# ---- constant weights and biases ------------------------------------------------------


@dataclass
class IntegerWeight:
    """Constant 8-bit integers with their scale and zero point (0-d, or 1-d along ``axis``)."""

    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None

    def transposed(self, perm: list[int]) -> IntegerWeight:
        axis = None if self.axis is None else perm.index(self.axis)
        return IntegerWeight(np.ascontiguousarray(self.values.transpose(perm)), self.scale, self.zero_point, axis)


def integer_weight(tensor: gs.Tensor) -> IntegerWeight:
    """A weight input as integers: ``[Transpose ->] DequantizeLinear([Clip](int constant))``."""
    perms: list[list[int] | None] = []
    node = producer(tensor)
    while node is not None and node.op == "Transpose":
        perms.append(node.attrs.get("perm"))
        tensor = node.inputs[0]
        node = producer(tensor)
    if node is None or node.op != "DequantizeLinear":
        raise Refused(f"the weight comes from {_origin(tensor)}, not from a quantized constant")
    stored, bounds = node.inputs[0], []
    clip = producer(stored)
    if clip is not None and clip.op == "Clip":
        stored, bounds = clip.inputs[0], [scalar_constant(t) for t in clip.inputs[1:3]]
    params = node.inputs[1:3]
    if not isinstance(stored, gs.Constant) or len(params) != 2 or not all(isinstance(p, gs.Constant) for p in params):
        raise Refused("the weight is computed at run time; integer operators need a constant weight")
    values = np.asarray(stored.values)
    if values.dtype not in EIGHT_BIT:
        raise Refused(f"the weight is stored as {values.dtype}, {_why_not_eight_bit(values.dtype)}")
    # The Clip is Brevitas's range marker (a no-op on folded weights); applying it keeps
    # the graph's exact meaning whatever produced the integers.
    for index, bound in enumerate(bounds):
        if bound is not None:
            values = np.maximum(values, bound) if index == 0 else np.minimum(values, bound)
    scale = np.asarray(params[0].values, F32)
    zero_point = np.asarray(params[1].values)
    if scale.size == 1 and zero_point.size == 1:
        weight = IntegerWeight(values, scale.reshape(()), zero_point.reshape(()), None)
    else:
        weight = IntegerWeight(values, scale.reshape(-1), zero_point.reshape(-1), int(node.attrs.get("axis", 1)) % values.ndim)
    for perm in reversed(perms):  # innermost (nearest the DequantizeLinear) first
        weight = weight.transposed(list(perm) if perm is not None else list(range(values.ndim))[::-1])
    return weight


def constant_float(tensor: gs.Tensor) -> np.ndarray | None:
    """The float32 values a constant tensor (or DequantizeLinear of one) holds, else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values, F32)
    node = producer(tensor)
    if node is None or node.op != "DequantizeLinear" or not all(isinstance(t, gs.Constant) for t in node.inputs):
        return None
    stored = np.asarray(node.inputs[0].values)
    scale = np.asarray(node.inputs[1].values, F32)
    zero_point = np.asarray(node.inputs[2].values) if len(node.inputs) > 2 else np.zeros((), stored.dtype)
    if scale.size > 1:  # per-axis: line the parameters up with their axis
        shape = [1] * stored.ndim
        shape[int(node.attrs.get("axis", 1)) % stored.ndim] = scale.size
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    # DequantizeLinear: (q - zp) in integers, converted to float, times the scale.
    return ((stored.astype(np.int64) - zero_point.astype(np.int64)).astype(F32) * scale).astype(F32)


def accumulator_bias(tensor: gs.Tensor, accumulator_scale: np.ndarray) -> np.ndarray:
    """A bias as int32 multiples of ``accumulator_scale`` (= float32(s_x * s_w)).

    Accepted when ``DequantizeLinear(b_int32, accumulator_scale)`` gives back every bias
    value bit for bit, so the integer accumulator plus the bias means exactly what the
    float Conv/Gemm plus the bias meant. Brevitas's int32 bias at scale s_x*s_w passes
    as is; a bias on a coarser power-of-two grid (QKeras) is rescaled exactly.
    """
    bias = constant_float(tensor)
    if bias is None:
        raise Refused(f"the bias comes from {_origin(tensor)}, not from a constant")
    dq = producer(tensor)
    if dq is not None and len(dq.inputs) > 2:
        stored, scale, zero_point = (np.asarray(t.values) for t in dq.inputs[:3])
        aligned = scale.size == 1 or stored.ndim == 1  # a per-axis scale lines up with a vector bias
        if stored.dtype == np.int32 and not np.any(zero_point) and aligned and _equal(scale, accumulator_scale):
            return stored  # already int32 on the accumulator grid, as Brevitas exports it
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        units = np.rint(bias.astype(np.float64) / accumulator_scale.astype(np.float64))
    if not np.all(np.isfinite(units)) or np.any(units < INT32_MIN) or np.any(units > INT32_MAX):
        raise Refused("the bias does not fit int32 at the accumulator scale s_x*s_w")
    candidate = units.astype(np.int32)
    if not np.array_equal((candidate.astype(F32) * accumulator_scale).astype(F32), np.broadcast_to(bias, candidate.shape)):
        raise Refused("the bias is not a whole multiple of the accumulator scale s_x*s_w, so no int32 bias equals it")
    return candidate


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal after broadcasting; False when the shapes do not broadcast."""
    try:
        return bool(np.all(np.asarray(a, F32) == np.asarray(b, F32)))
    except ValueError:
        return False


# ---- the quantizer after a compute op -------------------------------------------------


@dataclass
class OutputQuantizer:
    """The 8-bit requantization of a unit's result: ``q = saturate(round(y/s) + zp)``.

    ``nodes`` (a QuantizeLinear, or ``Div(s) -> Add(zp) -> QuantizeLinear(1, zq)``, the
    form the QCDQ passes emit for non-zero zero points) are what an integer operator's own
    requantization replaces; ``output`` is their integer result, which keeps its consumers.
    """

    nodes: list[gs.Node]
    output: gs.Tensor
    scale: np.ndarray  # 0-d, or 1-d along axis (a per-channel QuantizeLinear, one zero point)
    zero_point: np.ndarray
    axis: int | None = None

    def as_uint8(self) -> OutputQuantizer:
        """The same quantizer once its int8 region is stored as uint8 (zero point + 128)."""
        return OutputQuantizer(self.nodes, self.output, self.scale, _uint8_zero_point(self.zero_point), self.axis)


def output_quantizer(graph: gs.Graph, tensor: gs.Tensor) -> OutputQuantizer:
    """Match the quantizer that is the only consumer of a unit's float result."""
    node = only_consumer(graph, tensor)
    if node is None:
        used = "is a graph output" if any(out is tensor for out in graph.outputs) else f"feeds {len(tensor.outputs)} nodes"
        raise Refused(f"the result {used} without being requantized")
    if node.op == "QuantizeLinear" and node.inputs[0] is tensor:
        zero_point = equal_zero_point(node.inputs[2]) if len(node.inputs) > 2 else None
        scale = scalar_constant(node.inputs[1])
        if scale is None and isinstance(node.inputs[1], gs.Constant) and zero_point is not None:
            vector = np.asarray(node.inputs[1].values, F32).reshape(-1)
            found = _output([node], vector, zero_point)
            found.axis = int(node.attrs.get("axis", 1))
            return found
        return _output([node], scale, zero_point)
    if node.op != "Div" or node.inputs[0] is not tensor:
        raise Refused(f"the result goes through {node.op} before it is quantized")
    nodes = [node]
    offset: np.ndarray | None = np.zeros((), F32)
    after = only_consumer(graph, node.outputs[0])
    if after is not None and after.op == "Add":
        nodes.append(after)
        offset = scalar_constant(after.inputs[1] if after.inputs[0] is node.outputs[0] else after.inputs[0])
        after = only_consumer(graph, after.outputs[0])
    if after is None or after.op != "QuantizeLinear":
        path = " -> ".join(n.op for n in nodes) + (f" -> {after.op}" if after is not None else "")
        raise Refused(
            f"the result is requantized by float ops ({path}: the exact float path, or a container wider "
            "than 8 bits), not by an 8-bit QuantizeLinear"
        )
    nodes.append(after)
    unit_scale = scalar_constant(after.inputs[1])
    inner = scalar_constant(after.inputs[2]) if len(after.inputs) > 2 else None
    if unit_scale is None or float(unit_scale) != 1.0 or offset is None or inner is None:
        raise Refused("the result's Div -> Add -> QuantizeLinear is not the zero-point form (scale 1, constant zero point)")
    if float(offset) != round(float(offset)):
        raise Refused(f"the result's zero point {float(offset):g} is not an integer")
    # QuantizeLinear(y/s + zp, 1, zq) is QuantizeLinear(y, s, zp + zq) up to float rounding.
    return _output(nodes, scalar_constant(node.inputs[1]), np.asarray(int(offset) + int(inner)), inner.dtype)


def _output(
    nodes: list[gs.Node], scale: np.ndarray | None, zero_point: np.ndarray | None, dtype: np.dtype | None = None
) -> OutputQuantizer:
    if scale is None or zero_point is None:
        raise Refused("the result's quantizer has non-constant parameters or per-channel zero points that differ")
    container = np.dtype(dtype or zero_point.dtype)
    if container not in EIGHT_BIT:
        raise Refused(f"the result is quantized to {container}, wider than 8 bits")
    info = np.iinfo(container)
    if not info.min <= int(zero_point) <= info.max:
        raise Refused(f"the result's zero point {int(zero_point)} does not fit {container}")
    return OutputQuantizer(nodes, nodes[-1].outputs[0], np.asarray(scale, F32), np.asarray(int(zero_point), container))


def skip_relu(graph: gs.Graph, tensor: gs.Tensor) -> tuple[gs.Node | None, gs.Tensor]:
    """The Relu that alone consumes ``tensor`` (and its output), or (None, ``tensor``)."""
    node = only_consumer(graph, tensor)
    if node is not None and node.op == "Relu":
        return node, node.outputs[0]
    return None, tensor


def requantized_output(em: NodeEmitter, out: OutputQuantizer, relu: bool) -> tuple[gs.Tensor, str]:
    """Where the integer operator writes, and the range note for the report.

    ``Relu`` before the quantizer is ``max(q, zp)`` after it (quantization is monotone and
    maps 0 to zp), so it becomes the lower bound of an integer Clip: an existing range
    Clip (sub-8-bit outputs keep theirs) is tightened, otherwise one is added. When zp is
    the container's minimum the Relu is already implied by saturation.
    """
    zero_point = out.zero_point
    if not relu or int(zero_point) == int(np.iinfo(zero_point.dtype).min):
        return out.output, "Relu implied by saturation" if relu else ""
    clip = only_consumer(em.graph, out.output)
    low = scalar_constant(clip.inputs[1]) if clip is not None and clip.op == "Clip" and len(clip.inputs) > 1 else None
    if clip is not None and low is not None and low.dtype == zero_point.dtype:
        tightened = max(int(low), int(zero_point))
        replace_input(clip, 1, em.constant("relu_low", np.asarray(tightened, zero_point.dtype)))
        return out.output, f"Relu folded into the range Clip (low {tightened})"
    raw = gs.Variable(f"{em.prefix}/requantized", dtype=zero_point.dtype)
    high = np.asarray(np.iinfo(zero_point.dtype).max, zero_point.dtype)
    em.write("Clip", [raw, em.constant("relu_low", zero_point), em.constant("relu_high", high)], out.output, name=f"{em.prefix}/relu_clip")
    return raw, f"Relu folded into Clip[{int(zero_point)},{int(high)}]"


def describe_weight(weight: IntegerWeight) -> str:
    layout = "per-tensor" if weight.axis is None else f"per-channel (axis {weight.axis})"
    return f"{weight.values.dtype} {layout} weights"
