"""Quantize a graph input by comparing it with exact thresholds, for runtimes that divide by multiplying.

    x -> [Div(c) | Mul(c) | Add(c) | Sub(c) | Clip(a, b)]* -> QuantizeLinear(s, zp) [-> Clip(lo, hi)] -> DQ
      ->   x -> <the same chain> -> Div(s) -> Round -> [Add(zp)] -> Clip(lo, hi)         (estimate q0)
           q = q0 - (x < below[q0]) + (x >= above[q0])                                   (exact)
           q -> QuantizeLinear(1, 0) [-> Clip(lo, hi)] -> DQ

Only under a profile with ``exact_input_quantizers`` (openvino), for a QuantizeLinear with a
constant per-tensor scale whose input is a graph input, directly under a scale that is not
a power of two, or through Div/Mul/Add/Sub/Clip by constant scalars (the form a non-zero zero
point or a 16-bit container takes: OpenVINO folds such ops into the FakeQuantize's range, in its own order). OpenVINO's CPU plugin runs a QuantizeLinear as a FakeQuantize that multiplies by
a precomputed reciprocal, and in a quantized model it rewrites every float Divide into
a multiply by the reciprocal too (ConvertDivide; measured on 2026.4: a Divide by a
constant, by a DequantizeLinear, even by a graph input). ``x * (1/s)`` may differ from
``x / s`` in the last bit, and a graph input lying on a rounding tie (the verifier puts
many there; so do images on a pixel grid) then lands one step off.

The quantizer is a monotone step function of ``x``, so it is decided by comparing ``x``
with the smallest float32 reaching each level, found here by bisection over float32 with
the reference's own arithmetic (numpy float32: IEEE division, round half to even,
saturation, clamp). Every runtime compares floats exactly. The estimate ``q0`` may be
wrong only where ``x`` lies within a few float32 ulps of a threshold, by one level, which
the two comparisons put right: ``q`` equals the QuantizeLinear's integers for every
non-NaN ``x``, infinities included (the outermost thresholds are -inf and +inf, and a
final Clip keeps +inf at the top level). NaN takes the same path as before (QuantizeLinear of NaN, then the
integer Clip). The QuantizeLinear of the integer-valued ``q`` with scale 1 stays, so a
runtime still sees Q -> DQ and runs the next convolution on int8.

Cost: about a dozen elementwise ops and two table lookups on the graph input, once.
Quantizers inside the network keep their QuantizeLinear: their input is a runtime's own
float arithmetic (an int8 convolution's dequantization), which rounds differently from
the reference's float convolution anyway; each one whose scale is not a power of two is
reported, with the bound (1 step on values within float rounding of a tie).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from .base import GraphPass, LoweringContext, NodeEmitter, UnitRecord

_CONSTANT_OPS = {
    "Div": np.divide,
    "Mul": np.multiply,
    "Add": np.add,
    "Sub": np.subtract,
}
_CONTAINERS = {np.dtype(t): (int(np.iinfo(t).min), int(np.iinfo(t).max)) for t in (np.int8, np.uint8, np.int16, np.uint16)}


def is_power_of_two(values: np.ndarray) -> bool:
    mantissa, _ = np.frexp(np.asarray(values, dtype=np.float32))
    return bool(np.all(mantissa == 0.5))


def _scalar(tensor: gs.Tensor) -> np.float32 | None:
    if not isinstance(tensor, gs.Constant) or np.asarray(tensor.values).size != 1:
        return None
    return np.float32(np.asarray(tensor.values, dtype=np.float32).reshape(()))


Step = tuple[str, tuple[np.float32, ...]]


def _step(node: gs.Node) -> Step | None:
    """``node`` as a monotone non-decreasing float32 step with scalar constants, if it is one."""
    if node.op == "Clip" and len(node.inputs) == 3:
        bounds = tuple(_scalar(bound) for bound in node.inputs[1:])
        return None if None in bounds else ("Clip", bounds)  # type: ignore[return-value]
    if node.op not in _CONSTANT_OPS or len(node.inputs) != 2:
        return None
    constant = _scalar(node.inputs[1])
    # No division or product by a non-positive constant (it would reverse the order).
    if constant is None or (node.op in ("Div", "Mul") and not constant > 0):
        return None
    return node.op, (constant,)


def _input_chain(quantize: gs.Node, graph_inputs: set[str]) -> tuple[gs.Tensor, list[Step]] | None:
    """The graph input feeding ``quantize`` and the constant steps between them (in order), if any."""
    chain: list[Step] = []
    tensor = quantize.inputs[0]
    while tensor.name not in graph_inputs:
        if len(tensor.inputs) != 1:
            return None
        node = tensor.inputs[0]
        step = _step(node)
        if step is None:
            return None
        chain.insert(0, step)
        tensor = node.inputs[0]
    if tensor.dtype != np.float32:
        return None
    return tensor, chain


def _reference(chain: list[Step], scale: np.float32, zero_point: int, low: int, high: int) -> Callable[[np.ndarray], np.ndarray]:
    """The integers the lowered chain gives a float32 input, in float32 as ONNX computes them."""

    def quantized(x: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # the bisection starts at the largest floats
            value = x.astype(np.float32)
            for op, constants in chain:
                if op == "Clip":
                    value = np.clip(value, *constants).astype(np.float32)
                else:
                    value = _CONSTANT_OPS[op](value, constants[0]).astype(np.float32)
            return np.clip(np.rint(value / scale).astype(np.float64) + zero_point, low, high)

    return quantized


def _ordered(x: np.ndarray) -> np.ndarray:
    """float32 -> int64 keys in the same order (+0 and -0 share one)."""
    bits = np.asarray(x, np.float32).view(np.int32).astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def _from_ordered(keys: np.ndarray) -> np.ndarray:
    bits = np.where(keys < 0, (-keys) | 0x80000000, keys).astype(np.uint32)
    return bits.view(np.float32)


def levels_reached(quantized: Callable[[np.ndarray], np.ndarray]) -> tuple[int, int]:
    """The lowest and highest integer ``quantized`` gives any float32 (at -inf and +inf: it is monotone)."""
    low, high = quantized(np.array([-np.inf, np.inf], np.float32))
    return int(low), int(high)


def smallest_reaching(monotone: Callable[[np.ndarray], np.ndarray], targets: np.ndarray, start: float = -np.inf) -> np.ndarray:
    """For each target: the smallest float32 x >= ``start`` (+inf included) with monotone(x) >= target.

    ``monotone`` is non-decreasing on [start, +inf], below every target at ``start`` and at
    or above every target at +inf; bisection over the ordered float32 values keeps
    monotone(lo) < target <= monotone(hi).
    """
    targets = np.asarray(targets)
    lo = np.full(targets.shape, int(_ordered(np.float32(start))), np.int64)
    hi = np.full(targets.shape, int(_ordered(np.float32(np.inf))), np.int64)
    while np.any(hi - lo > 1):
        middle = lo + (hi - lo) // 2
        reached = monotone(_from_ordered(middle)) >= targets
        hi = np.where(reached, middle, hi)
        lo = np.where(reached, lo, middle)
    return _from_ordered(hi).astype(np.float32)


def thresholds(quantized: Callable[[np.ndarray], np.ndarray], low: int, high: int) -> np.ndarray:
    """For each level k in (low, high]: the smallest float32 x (+inf included) with quantized(x) >= k;
    ``low`` and ``high`` are what -inf and +inf give (:func:`levels_reached`)."""
    return smallest_reaching(quantized, np.arange(low + 1, high + 1, dtype=np.float64))


def _range_clip(quantize: gs.Node, graph: gs.Graph) -> tuple[int, int] | None:
    """The bounds of the integer Clip that alone reads ``quantize``'s output, if there is one."""
    output = quantize.outputs[0]
    if len(output.outputs) != 1 or output in graph.outputs:
        return None
    clip = output.outputs[0]
    if clip.op != "Clip" or len(clip.inputs) != 3 or not all(isinstance(b, gs.Constant) for b in clip.inputs[1:]):
        return None
    return int(np.asarray(clip.inputs[1].values)), int(np.asarray(clip.inputs[2].values))


class ExactInputQuantizers(GraphPass):
    name = "input_quantizer_thresholds"
    matches = (
        "QuantizeLinear with a constant per-tensor scale that is not a power of two, reading a graph input "
        "(directly or through constant Div/Mul/Add/Sub/Clip) (profile exact_input_quantizers); other such QuantizeLinears are reported"
    )
    emits = "the estimate Div -> Round -> Clip corrected by two threshold comparisons, then QuantizeLinear(scale 1)"

    def run(self, ctx: LoweringContext) -> list[UnitRecord]:
        if not ctx.profile.exact_input_quantizers:
            return []
        graph_inputs = {tensor.name for tensor in ctx.graph.inputs}
        records = []
        for quantize in [node for node in ctx.graph.nodes if node.op == "QuantizeLinear"]:
            scale = quantize.inputs[1]
            if not isinstance(scale, gs.Constant):
                continue
            values = np.asarray(scale.values)
            chain = _input_chain(quantize, graph_inputs) if values.size == 1 else None
            zero = quantize.inputs[2] if len(quantize.inputs) > 2 else None
            container = np.asarray(zero.values).dtype if isinstance(zero, gs.Constant) else None
            if chain is not None and container in _CONTAINERS and (chain[1] or not is_power_of_two(values)):
                became = self._rewrite(quantize, chain, container, ctx)
                reason = f"it reads graph input {chain[0].name!r} " + (
                    f"through {' -> '.join(op for op, _ in chain[1])}" if chain[1] else f"under scale {float(values.ravel()[0]):.6g}"
                )
                records.append(UnitRecord(quantize.name, quantize.op, self.name, became, reason + ", which a runtime may compute with its own float rounding"))
            elif not is_power_of_two(values):
                records.append(UnitRecord(
                    quantize.name, quantize.op, self.name, None,
                    f"scale {float(values.ravel()[0]):.6g}{' (per axis)' if values.size > 1 else ''} is not a power of two: a runtime "
                    "that multiplies by the reciprocal (OpenVINO) may move a value within float32 rounding of a tie by 1 step",
                ))
        return records

    @staticmethod
    def _rewrite(quantize: gs.Node, chain: tuple[gs.Tensor, list[Step]], container: np.dtype, ctx: LoweringContext) -> str:
        source, ops = chain
        scale = np.float32(np.asarray(quantize.inputs[1].values).reshape(()))
        zero_point = int(np.asarray(quantize.inputs[2].values).reshape(()))
        quantized = _reference(ops, scale, zero_point, *(_range_clip(quantize, ctx.graph) or _CONTAINERS[container]))
        low, high = levels_reached(quantized)
        limits = thresholds(quantized, low, high)
        # level low + j is reached at below[j], level low + j + 1 at above[j]; no NaN sentinels
        # (OpenVINO's GreaterOrEqual is true for NaN, measured): +inf reaches one past the top,
        # which the final Clip takes back.
        below = np.concatenate([[-np.inf], limits]).astype(np.float32)
        above = np.concatenate([limits, [np.inf]]).astype(np.float32)

        em = NodeEmitter(ctx.graph, quantize.name)
        f32 = lambda suffix, value: em.constant(suffix, np.array(value, np.float32))  # noqa: E731
        estimate = em.node("Round", [em.node("Div", [quantize.inputs[0], f32("scale", scale)])])
        if zero_point:
            estimate = em.node("Add", [estimate, f32("zero_point", zero_point)])
        estimate = em.node("Clip", [estimate, f32("low", low), f32("high", high)])
        index = em.node("Cast", [em.node("Sub", [estimate, f32("first_level", low)])], {"to": 7}, dtype=np.int64)
        # NaN casts to an unspecified integer: keep the lookup in the table (the comparisons with NaN are false).
        index = em.node("Clip", [index, em.constant("first_index", np.array(0, np.int64)), em.constant("last_index", np.array(high - low, np.int64))], dtype=np.int64)
        lower = em.node("Less", [source, em.node("Gather", [em.constant("below", below), index])], dtype=np.bool_)
        upper = em.node("GreaterOrEqual", [source, em.node("Gather", [em.constant("above", above), index])], dtype=np.bool_)
        as_float = lambda flag: em.node("Cast", [flag], {"to": 1})  # noqa: E731
        exact = em.node("Add", [em.node("Sub", [estimate, as_float(lower)]), as_float(upper)])
        exact = em.node("Clip", [exact, f32("lowest", low), f32("highest", high)])
        exact.shape = source.shape
        quantize.inputs[0] = exact
        quantize.inputs[1] = f32("unit_scale", 1.0)
        quantize.inputs[2] = em.constant("no_zero_point", np.array(0, container))
        return f"estimate -> 2 threshold comparisons ({high - low} levels) -> QuantizeLinear(scale 1)"
