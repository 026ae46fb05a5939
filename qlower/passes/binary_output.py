"""A compute unit whose output quantizer is binary (BipolarQuant, signed 1-bit Quant): the
sign of its real output, decided exactly by an integer threshold on the accumulator.

    acc -> [+ bias] -> [BatchNormalization | Mul | Add | Sub | Div]* -> [Relu]
      -> [Div(s) -> [Add(zp)]] -> GreaterOrEqual(t, 0) -> Where(uint8 129, uint8 127)
      ==>  unit(weights x 2, int32 bias B, multiplier M' = +-1, y_zero_point 128) -> Clip(127, 129)

(the Where form is what :mod:`.bipolar_activation` emits for ``--to qop``: the codes
``128 + q`` of the grid value ``q`` in {-1, +1}, read by a DequantizeLinear).

**What the unit means.** Per output channel the affine ops make the real value
``y = a * s_x * s_w * acc + b`` and the quantizer tests ``t = p * relu?(y) + r >= 0``
(``p = 1/s``, ``r = zp`` for the 1-bit Quant; ``p = 1``, ``r = 0`` for BipolarQuant;
``p > 0`` because scales are positive). Without a Relu that is ``M * acc + C >= 0`` with
``M = p * a * s_x * s_w``, ``C = p * b + r``. With a Relu, ``relu(y) >= c`` (``c = -r/p``)
always holds when ``c <= 0`` and is ``y >= c`` otherwise. ``H(acc) = [M * acc + C >= 0]``
is evaluated in float64 from the model's float32 parameters (the real-valued unit up to
float64 rounding, as in :mod:`qlower.requant`); BipolarQuant(0) is +1, so a real value of
exactly 0 is +1. ``H`` is monotone in ``acc``, so over the reachable range
``[acc_low, acc_high]`` it is constant or switches once, at a threshold found exactly on
``H`` itself (a float estimate, then stepped until ``H`` changes between neighbours).

**What the integer unit computes, and why it is exact.** For ``M > 0`` and threshold ``t``
(``H(acc) = 1`` iff ``acc >= t``) the weights are doubled and ``B = 1 - 2t``, so the
int32 sum is ``v = 2 * acc + 1 - 2t``: odd, never 0, ``v >= 1`` iff ``acc >= t``.
ONNX Runtime requantizes ``rint(float32(v) * 1) + 128``, saturated to uint8;
``|float32(v)| >= 1`` with the sign of ``v`` (float32 conversion is monotone and exact
near 0), so the result is >= 129 or <= 127, and the Clip to [127, 129] gives exactly
``128 + (+1 | -1)``. For ``M < 0`` (threshold ``u``, ``H = 1`` iff ``acc <= u``)
``B = -(2u + 1)`` (``u = t - 1``) and ``M' = -1`` (a negative per-channel multiplier, which QLinearConv
accepts): ``-(2 * acc - 2u - 1) >= 1`` iff ``acc <= u``. A channel constant over its
range gets zero weights and ``B = +-1``. ``2 * acc + B`` is checked to fit int32 at both
ends of the range, and ``2 * w`` to fit the weight container, else the unit is refused.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..requant import INT32_MAX, INT32_MIN, UnitChoice, accumulator_range
from .base import NodeEmitter
from .bipolar_activation import CENTRE
from .integer_units import (
    F32,
    U8S8_SAFE_MAGNITUDE,
    IntegerWeight,
    OutputQuantizer,
    Refused,
    only_consumer,
    scalar_constant,
    skip_relu,
)
from .unit_requant import Affine, ExactWeights, UnitOutput, centred_weights, match_affine

CODES = (CENTRE - 1, CENTRE + 1)


def _sign_select(graph: gs.Graph, tensor: gs.Tensor) -> tuple[float, float, list[gs.Node]] | None:
    """``(p, r, nodes)`` when ``tensor`` alone feeds ``[Div(s) -> [Add(zp)]] ->
    GreaterOrEqual(., 0) -> Where(uint8 129, uint8 127)``, else None."""
    p, r, nodes = 1.0, 0.0, []
    node = only_consumer(graph, tensor)
    if node is not None and node.op == "Div" and node.inputs[0] is tensor:
        scale = scalar_constant(node.inputs[1])
        if scale is None or not float(scale) > 0:
            return None
        p, tensor = 1.0 / float(F32(scale)), node.outputs[0]
        nodes.append(node)
        node = only_consumer(graph, tensor)
        if node is not None and node.op == "Add":
            others = [t for t in node.inputs if t is not tensor]
            offset = scalar_constant(others[0]) if len(others) == 1 else None
            if offset is None:
                return None
            r, tensor = float(F32(offset)), node.outputs[0]
            nodes.append(node)
            node = only_consumer(graph, tensor)
    if node is None or node.op != "GreaterOrEqual" or node.inputs[0] is not tensor:
        return None
    zero = scalar_constant(node.inputs[1])
    select = only_consumer(graph, node.outputs[0])
    if zero is None or float(zero) != 0 or select is None or select.op != "Where" or select.inputs[0] is not node.outputs[0]:
        return None
    branches = [scalar_constant(t) for t in select.inputs[1:3]]
    if any(b is None or b.dtype != np.uint8 for b in branches) or (int(branches[1]), int(branches[0])) != CODES:
        return None
    return p, r, [*nodes, node, select]


def match_binary_output(graph: gs.Graph, result: gs.Tensor, accumulator_scale: np.ndarray, start: Affine,
                        out_rank: int | None, channel_axis: int) -> UnitOutput | None:
    """The unit's output as a sign test ``M * acc + C >= 0`` when its quantizer is binary, else None."""
    channels = start.scale.size
    affine, after_affine = match_affine(graph, result, channels, out_rank, channel_axis, start)
    relu, tested = skip_relu(graph, after_affine)
    found = _sign_select(graph, tested)
    if found is None:
        return None
    p, r, nodes = found
    slope = affine.scale * np.broadcast_to(accumulator_scale.astype(np.float64), (channels,))
    if relu is None:
        multiplier, offset = p * slope, p * affine.offset + r
    else:
        floor = -r / p  # relu(y) >= floor
        if floor <= 0:
            multiplier, offset = np.zeros(channels), np.ones(channels)  # always +1
        else:
            multiplier, offset = slope, affine.offset - floor
    out = OutputQuantizer(nodes, nodes[-1].outputs[0], np.ones((), F32), np.asarray(CENTRE, np.uint8))
    return UnitOutput(affine, relu, out, multiplier, offset, -1, 1, binary=True)


def _threshold(acc_low: int, acc_high: int, multiplier: float, offset: float) -> tuple[int, int, int]:
    """``(k, B, sign of M')`` for one channel (see the module docstring)."""

    def h(acc: int) -> bool:
        return multiplier * float(acc) + offset >= 0

    if multiplier == 0 or h(acc_low) == h(acc_high):
        return 0, 1 if h(acc_low) else -1, 1
    rising = multiplier > 0
    # The first acc with H == rising's target: the switch point, estimated then stepped exactly.
    estimate = -offset / multiplier
    switch = int(np.clip(np.ceil(estimate) if rising else np.floor(estimate) + 1, acc_low + 1, acc_high))
    while switch > acc_low + 1 and h(switch - 1) != h(acc_low):
        switch -= 1
    while switch < acc_high and h(switch) == h(acc_low):
        switch += 1
    # H(acc) == H(acc_high) iff acc >= switch.
    if rising:  # +1 iff acc >= switch
        return 2, 1 - 2 * switch, 1
    return 2, 1 - 2 * switch, -1  # +1 iff acc <= switch - 1: -(2 * acc + 1 - 2 * switch) >= 1


def binary_weights(weight: IntegerWeight, output_axis: int, x_range: tuple[int, int], output: UnitOutput,
                   x86_without_vnni: bool) -> ExactWeights:
    """Doubled int8 weights, int32 thresholds and multipliers +-1 per channel (exact, see above)."""
    rows = np.moveaxis(centred_weights(weight), output_axis, 0)
    flat = rows.reshape(rows.shape[0], -1)
    limit = (-U8S8_SAFE_MAGNITUDE, U8S8_SAFE_MAGNITUDE) if x86_without_vnni else (-128, 127)
    if 2 * int(flat.min(initial=0)) < limit[0] or 2 * int(flat.max(initial=0)) > limit[1]:
        raise Refused(f"a binary output needs the weights doubled, and 2 * w leaves [{limit[0]}, {limit[1]}]")
    acc_low, acc_high = accumulator_range(flat, *x_range)
    choices = [_threshold(int(lo), int(hi), float(m), float(c))
               for lo, hi, m, c in zip(acc_low, acc_high, output.multiplier, output.offset)]
    k = np.array([c[0] for c in choices], np.int64)
    bias = np.array([c[1] for c in choices], np.int64)
    ends = np.stack([k * acc_low + bias, k * acc_high + bias])
    if np.any(ends < INT32_MIN) or np.any(ends > INT32_MAX):
        raise Refused("the int32 accumulator could overflow for some input; the float model does not wrap")
    multiplier = np.array([c[2] for c in choices], F32)
    zeros = np.zeros(k.size, np.int64)
    choice = UnitChoice(k, bias.astype(np.int32), multiplier, zeros, np.full(k.size, 2, np.int64), zeros)
    scaled = np.moveaxis(choice.scaled_weights(rows), 0, output_axis)
    return ExactWeights(scaled.astype(np.int8), np.asarray(0, np.int8), choice.bias, multiplier, choice, None)


def describe_binary(choice: UnitChoice) -> str:
    constant = int(np.count_nonzero(choice.k == 0))
    return "sign threshold on the accumulator (weights x 2, exact)" + (f", {constant} constant channels" if constant else "")


def binary_target(em: NodeEmitter, out: OutputQuantizer) -> tuple[gs.Tensor, str]:
    """Where the integer operator writes: a raw uint8 tensor that Clip(127, 129) turns into the codes."""
    raw = gs.Variable(f"{em.prefix}/requantized", dtype=np.uint8)
    em.write("Clip", [raw, em.constant("sign_low", np.asarray(CODES[0], np.uint8)),
                      em.constant("sign_high", np.asarray(CODES[1], np.uint8))], out.output, name=f"{em.prefix}/sign_clip")
    return raw, "binary output as uint8 codes 127 | 129 (Clip)"
