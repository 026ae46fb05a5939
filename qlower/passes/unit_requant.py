"""What a compute unit computes after its accumulator, and the exact integers that compute it.

    acc -> [+ bias] -> [BatchNormalization | Mul c | Add c | Sub c | Div c]* -> [Relu] -> Q(s_y, zp)

Every op between the compute op and its output quantizer that multiplies or offsets each
output channel by a constant is an affine map ``y -> a[c] * y + b[c]``; composed (float64,
from the model's float32 constants) they make the unit's real output
``a[c] * s_x * s_w[c] * acc + b[c]``, i.e. ``M[c] * acc + C[c]`` output steps with
``M = a * s_x * s_w / s_y`` and ``C = b / s_y`` (the bias is part of ``b``: it need not lie
on the accumulator grid). BatchNormalization (inference form) is
``a = gamma / sqrt(var + eps)``, ``b = beta - a * mean``; Gemm's ``alpha``/``beta`` are
affine too. :func:`exact_weights` then asks :mod:`qlower.requant` for each channel's
``(k, B, M')``, so the integer operator reproduces ``round(M * acc + C)`` for every
reachable accumulator (the contract and its proof are in that module). The reference's
own float32 arithmetic (the float conv, the float BatchNorm) can still land on the other
side of a rounding tie; that is the only difference left.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..requant import UnitChoice, accumulator_range, choose_unit
from .integer_units import (
    F32,
    IntegerWeight,
    OutputQuantizer,
    Refused,
    U8S8_SAFE_MAGNITUDE,
    constant_float,
    only_consumer,
    output_quantizer,
    scalar_constant,
    skip_relu,
)

AFFINE_OPS = ("BatchNormalization", "Mul", "Add", "Sub", "Div")


def channel_vector(value: np.ndarray, channels: int, out_rank: int | None, channel_axis: int) -> np.ndarray | None:
    """A constant that broadcasts against the unit's output along its channels only, as [C]
    float64; None when it varies along another axis or would broadcast the output up.

    ``channel_axis`` counts from the right (-1 for MatMul's last axis, 1 - rank for Conv).
    """
    shape = value.shape
    if out_rank is None and len(shape) > 1 or out_rank is not None and len(shape) > out_rank:
        return None
    padded = (1,) * (-channel_axis - len(shape)) + shape if len(shape) < -channel_axis else shape
    for position in range(-len(padded), 0):
        size = padded[position]
        if position == channel_axis:
            if size not in (1, channels):
                return None
        elif size != 1:
            return None
    flat = value.astype(np.float64).reshape(-1)
    return np.broadcast_to(flat, (channels,)).copy() if flat.size in (1, channels) else None


@dataclass
class Affine:
    """``y -> scale * y + offset`` per output channel (float64 [C]), and the ops it replaces."""

    scale: np.ndarray
    offset: np.ndarray
    nodes: list[gs.Node]

    def describe(self) -> str:
        return "" if not self.nodes else " -> ".join(node.op for node in self.nodes) + " folded"


def _affine_step(node: gs.Node, result: gs.Tensor, channels: int, out_rank: int | None,
                 channel_axis: int) -> tuple[np.ndarray, np.ndarray] | None:
    """One op as ``(a, b)`` with ``op(y) = a * y + b``, or None when it is not such an op."""
    if node.op == "BatchNormalization":
        if node.inputs[0] is not result or len([t for t in node.outputs if t.name]) != 1 or node.attrs.get("training_mode", 0):
            return None
        if out_rank is not None and channel_axis != 1 - out_rank:
            return None  # BatchNormalization normalizes axis 1
        params = [constant_float(t) for t in node.inputs[1:5]]
        if any(p is None or p.size != channels for p in params):
            return None
        gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)  # type: ignore[union-attr]
        epsilon = float(F32(node.attrs.get("epsilon", 1e-5)))
        a = gamma / np.sqrt(var + epsilon)
        return a, beta - a * mean
    others = [t for t in node.inputs if t is not result]
    if len(node.inputs) != 2 or len(others) != 1:
        return None
    constant = constant_float(others[0])
    vector = None if constant is None else channel_vector(constant, channels, out_rank, channel_axis)
    if vector is None:
        return None
    ones, zeros = np.ones(channels), np.zeros(channels)
    result_first = node.inputs[0] is result
    if node.op == "Mul":
        return vector, zeros
    if node.op == "Add":
        return ones, vector
    if node.op == "Sub":
        return (ones, -vector) if result_first else (-ones, vector)
    if node.op == "Div" and result_first and np.all(vector != 0):
        return 1.0 / vector, zeros
    return None


def _starts_requantization(graph: gs.Graph, div: gs.Node) -> bool:
    """A Div by a scalar followed (after an optional Add) by a non-affine op is a
    quantizer's first step (the QCDQ zero-point form or the exact float path), not an affine."""
    if scalar_constant(div.inputs[1]) is None:
        return False
    after = only_consumer(graph, div.outputs[0])
    if after is not None and after.op == "Add":
        after = only_consumer(graph, after.outputs[0])
    return after is None or after.op not in (*AFFINE_OPS, "Relu")


def match_affine(graph: gs.Graph, result: gs.Tensor, channels: int, out_rank: int | None, channel_axis: int,
                 start: Affine) -> tuple[Affine, gs.Tensor]:
    """Fold the constant per-channel affine ops that alone consume ``result``, in order."""
    scale, offset, nodes = start.scale.copy(), start.offset.copy(), list(start.nodes)
    while True:
        node = only_consumer(graph, result)
        if node is None or node.op not in AFFINE_OPS or node.domain not in (None, "", "ai.onnx"):
            return Affine(scale, offset, nodes), result
        if node.op == "Div" and _starts_requantization(graph, node):
            return Affine(scale, offset, nodes), result
        step = _affine_step(node, result, channels, out_rank, channel_axis)
        if step is None:
            return Affine(scale, offset, nodes), result
        a, b = step
        scale, offset = a * scale, a * offset + b
        nodes.append(node)
        result = node.outputs[0]


@dataclass
class UnitOutput:
    """The unit from its accumulator to its 8-bit output: the real map in output steps."""

    affine: Affine
    relu: gs.Node | None
    out: OutputQuantizer
    multiplier: np.ndarray  # float64 [C]: output steps per accumulator step
    offset: np.ndarray  # float64 [C]: output steps
    low: int  # output integers relative to the zero point, after saturation, range Clip and Relu
    high: int
    # A binary quantizer (BipolarQuant, signed 1-bit Quant): the output is +1 where
    # multiplier * acc + offset >= 0, else -1, not a rounding (see binary_output.py).
    binary: bool = False


def _output_range(graph: gs.Graph, out: OutputQuantizer, relu: bool) -> tuple[int, int]:
    info = np.iinfo(out.zero_point.dtype)
    low, high = int(info.min), int(info.max)
    clip = only_consumer(graph, out.output)
    if clip is not None and clip.op == "Clip":
        bounds = [scalar_constant(t) if t.name else None for t in clip.inputs[1:3]]
        if len(bounds) > 0 and bounds[0] is not None:
            low = max(low, int(bounds[0]))
        if len(bounds) > 1 and bounds[1] is not None:
            high = min(high, int(bounds[1]))
    zero_point = int(out.zero_point)
    if relu:
        low = max(low, zero_point)
    return low - zero_point, high - zero_point


def match_unit_output(graph: gs.Graph, result: gs.Tensor, accumulator_scale: np.ndarray, start: Affine,
                      out_rank: int | None, channel_axis: int) -> UnitOutput:
    """From the compute op's float ``result``: affine ops, an optional Relu, the output
    quantizer; the per-channel multiplier and offset in output steps."""
    channels = start.scale.size
    affine, result = match_affine(graph, result, channels, out_rank, channel_axis, start)
    relu, result = skip_relu(graph, result)
    out = output_quantizer(graph, result)
    if out.scale.ndim and (out.scale.size != channels or out_rank is None or out.axis is None
                           or out.axis % out_rank != out_rank + channel_axis):
        raise Refused("the result's quantizer has per-channel scales along another axis than the output channels")
    # A per-channel output step goes into the per-channel multiplier (QLinear ops take one y_scale).
    step = np.broadcast_to(out.scale.astype(np.float64), (channels,))
    multiplier = affine.scale * np.broadcast_to(accumulator_scale.astype(np.float64), (channels,)) / step
    offset = affine.offset / step
    low, high = _output_range(graph, out, relu is not None)
    if low > high:
        raise Refused(
            "the Relu's zero floor lies above the output range (a zero point outside the integer range, valid "
            "QONNX): every output is the top of the range, so the unit stays QCDQ"
        )
    return UnitOutput(affine, relu, out, multiplier, offset, low, high)


# ---- the integers the operator gets ---------------------------------------------------


@dataclass
class ExactWeights:
    """Weights times ``k`` per channel, with the int32 bias and float32 multiplier per channel."""

    values: np.ndarray  # the weight layout of the unit, int8 (or uint8 with zero point 128)
    zero_point: np.ndarray  # 0-d, or the original per-channel zero points when kept
    bias: np.ndarray  # int32 [C]
    multiplier: np.ndarray  # float32 [C]
    choice: UnitChoice
    note: str | None


def centred_weights(weight: IntegerWeight) -> np.ndarray:
    zero_point = weight.zero_point.astype(np.int64)
    if weight.axis is not None:
        shape = [1] * weight.values.ndim
        shape[weight.axis] = -1
        zero_point = zero_point.reshape(shape)
    # One pass: each value cast to int64 as astype casts it, then the zero point subtracted.
    return np.subtract(weight.values, zero_point, dtype=np.int64, casting="unsafe")


# The float reference computes a unit's real value with a few float32 roundings (the
# float Conv/Gemm, BatchNorm's subtract, divide, multiply and add), each off by at most half
# an ulp of the value it rounds. Near the output range those values are of the order of
# |M * acc| + |C| output steps (the accumulator term and the offset cancel there), so
# 2^-21 of that (8 ulps) estimates their sum with room to spare. An estimate, not a proof
# (a BatchNorm mean far larger than the offset it leaves is rounded on a coarser ulp):
# verification holds every unit to the unit-local tolerance either way.
REFERENCE_ROUNDING = 2.0**-21


def reference_rounding(acc_low: np.ndarray, acc_high: np.ndarray, output: UnitOutput) -> np.ndarray:
    """Per channel, about how many output steps the float reference's own rounding can move the
    unit's real value where that can change its clipped output: at the accumulators whose
    real value ``M * acc + C`` lies within 1.5 steps of ``[low, high]`` (0 when none does)."""
    m, c = output.multiplier, output.offset
    with np.errstate(divide="ignore", invalid="ignore"):
        ends = np.sort(np.stack([(output.low - 1.5 - c) / m, (output.high + 1.5 - c) / m]), axis=0)
    first, last = np.maximum(ends[0], acc_low), np.minimum(ends[1], acc_high)
    near = (m != 0) & (first <= last)
    size = np.maximum(np.abs(m * np.where(near, first, 0)), np.abs(m * np.where(near, last, 0))) + np.abs(c)
    return np.where(near, REFERENCE_ROUNDING * size, 0.0)


def _check_reference_rounding(flat: np.ndarray, x_range: tuple[int, int], output: UnitOutput) -> None:
    """A unit whose accumulator step is worth a whole output step or more (``|M| >= 1``) is
    exact like any other (the search of :mod:`qlower.requant` holds for every ``M``); it is
    refused only where the float reference's rounding near its output range could reach half
    a step, so that the exact unit and the reference could be more than one step apart, or
    where the requantized value can leave int32 (ORT converts it to an integer there, which
    :func:`qlower.requant.ort_output` does not model: a fuzz-found unit with ``M ~ 3e36``
    overflowed float32 and ORT gave the zero point where the reference saturates)."""
    if float(np.max(np.abs(output.multiplier), initial=0)) < 1:
        return
    acc_low, acc_high = accumulator_range(flat, *x_range)
    finest = float(np.max(np.abs(output.multiplier)))
    worst = float(np.max(reference_rounding(acc_low, acc_high, output), initial=0))
    if worst >= 0.5:
        raise Refused(
            f"one accumulator step moves the output by {finest:g} steps (>= 1) and the float reference's own "
            f"float32 rounding near the output range can reach {worst:.2g} steps, so the reference, not the unit, "
            "decides outputs at that resolution"
        )
    widest = np.abs(output.multiplier) * np.maximum(np.abs(acc_low), np.abs(acc_high)) + np.abs(output.offset)
    if float(np.max(widest, initial=0)) >= 2.0**31:
        raise Refused(
            f"one accumulator step moves the output by {finest:g} steps (>= 1) and the requantized value can reach "
            f"{float(np.max(widest)):.3g} steps, beyond int32, where ONNX Runtime's float-to-integer conversion is "
            "not modelled"
        )


def exact_weights(weight: IntegerWeight, output_axis: int, x_range: tuple[int, int], output: UnitOutput,
                  x86_without_vnni: bool) -> ExactWeights:
    """Choose ``(k, B, M')`` per channel and store ``k * (w - zw)`` as int8 (zero point 0).

    ``x86_without_vnni``: ORT's u8s8 kernel on x86 CPUs without VNNI adds pairs of u8*s8
    products in int16 and saturates beyond |w| = 64; such units then keep ``k * w`` within
    +-64 when the weights allow, else store uint8 (zero point 128) for the u8u8 kernel.
    """
    centred = centred_weights(weight)
    rows = np.moveaxis(centred, output_axis, 0)
    flat = rows.reshape(rows.shape[0], -1)
    smallest, biggest = int(flat.min(initial=0)), int(flat.max(initial=0))
    largest = max(-smallest, biggest)
    fits_int8 = smallest >= -128 and biggest <= 127
    if not fits_int8:  # uint8 weights spanning more than int8: keep them, k = 1
        bounds = (smallest, biggest)
    elif x86_without_vnni and largest <= U8S8_SAFE_MAGNITUDE:
        bounds = (-U8S8_SAFE_MAGNITUDE, U8S8_SAFE_MAGNITUDE)
    else:
        bounds = (-128, 127)
    _check_reference_rounding(flat, x_range, output)
    try:
        choice = choose_unit(flat, x_range[0], x_range[1], output.multiplier, output.offset, output.low, output.high,
                             *bounds)
    except OverflowError:
        raise Refused("the int32 accumulator could overflow for some input; the float model does not wrap") from None
    if np.any(choice.worst > 1):
        raise Refused(
            "no int32 bias and float32 multiplier reproduce the unit within one output step "
            f"(off by up to {int(choice.worst.max())} steps: an offset too large for its multiplier)"
        )
    notes = [choice.describe()]
    scaled = np.moveaxis(choice.scaled_weights(rows), 0, output_axis)
    if not fits_int8:
        # k * (w - zw) stays within the centred span (k is 0 for a constant channel, and may
        # exceed 1 for a narrow one), so it fits uint8 around one zero point when the span does.
        low, high = int(scaled.min(initial=0)), int(scaled.max(initial=0))
        if high - low > 255:
            raise Refused(f"weights span {bounds[0]}..{bounds[1]} around their zero point, wider than 8 bits")
        values, zero_point = (scaled - low).astype(np.uint8), np.asarray(-low, np.uint8)
        notes.append(f"weights span {bounds[0]}..{bounds[1]} around their zero point, wider than int8: "
                     f"stored as uint8 (zero point {-low})")
    else:
        if x86_without_vnni and int(np.abs(scaled).max(initial=0)) > U8S8_SAFE_MAGNITUDE:
            values, zero_point = (scaled + 128).astype(np.uint8), np.asarray(128, np.uint8)
            notes.append(f"weights reach |w| = {largest} > {U8S8_SAFE_MAGNITUDE}: stored as uint8 (zero point 128) for the "
                         "u8u8 kernel, exact on x86 without VNNI and slower")
        else:
            values, zero_point = scaled.astype(np.int8), np.asarray(0, np.int8)
    note = "; ".join(n for n in notes if n) or None
    return ExactWeights(values, zero_point, choice.bias, choice.multiplier, choice, note)


def describe_choice(choice: UnitChoice) -> str:
    k = choice.k[choice.k > 0]
    largest = int(k.max()) if k.size else 0
    zero = int(np.count_nonzero(choice.k == 0))
    parts = [f"exact requantization (weights x k, k <= {largest})" if not np.any(choice.missed)
             else "closest requantization"]
    if zero:
        parts.append(f"{zero} constant channels")
    if np.any(choice.multiplier < 0):
        parts.append(f"{int(np.count_nonzero(choice.multiplier < 0))} negative channel multipliers")
    return ", ".join(parts)
