"""The unit each output is measured in: its grid's step, a probe of one step upstream, or float.

The LSB of an output is the step of the quantizer that produces it in the original,
found by walking back through operators that keep values on the grid (Reshape, Transpose,
MaxPool, Relu, Concat, ...). Per-channel steps are compared element by element while the
walk keeps the channel axis in place (Relu, MaxPool, Identity); after a reshaping operator
the finest step is used, which can only overstate a difference. FloatQuant's step is the
minifloat's spacing at each reference value.

In a QCDQ input model (Brevitas's ``export_onnx_qcdq``, ONNX Runtime's QDQ quantizer),
which has no QONNX quantizer, a DequantizeLinear sets the grid of its output the same way.
The probe below moves QONNX quantizer outputs only, so a float output downstream of
such a model's last DequantizeLinear is measured in the float unit.

An output with no grid (float logits, a Softmax after the last quantizer) has no LSB, so
``max_lsb_diff`` is None. Where a tolerance applies it is measured against what one step
upstream does to it: the reference runs twice more with every element of the nearest
activation quantizers upstream (the "frontier"; the weight quantizers when no activation
is quantized) moved by one step with random signs (seeded), and, when the frontier has
more than one tensor, once more per tensor moved alone; the output's largest change in
those runs is the unit for that batch. (Moving all at once can cancel: an Add of two
quantized tensors moved by +1 and -1 step does not move, and a one-step tie difference
in one of them then measured as thousands of units.) So
``tolerance_lsb`` 1 lets a float head
move about as far as one step of error in every element feeding it moves it; gross
errors (a wrong bias scale, weights on the wrong axis) fail. An output with no quantizer
upstream at all is pure float; its unit is 2^-16 of the reference's largest magnitude,
far above what ORT's reassociation of float arithmetic changes and far below a real
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from ..reference import ReferenceExecutor, node_label
from .graph import GraphIndex, quantizer_op

# Operators whose output values are input values (rearranged, selected or maxed): the grid
# of the input is the grid of the output. Concat takes every input; the rest take input 0.
_GRID_KEEPING = frozenset(
    {
        "Reshape", "Flatten", "Transpose", "Identity", "Squeeze", "Unsqueeze", "MaxPool",
        "GlobalMaxPool", "Relu", "Concat", "Slice", "Gather", "Split", "Expand", "Tile",
        "Dropout", "DepthToSpace", "SpaceToDepth", "ReduceMax", "ReduceMin",
    }
)
# Of those, the ones that leave every element on its own channel axis.
_AXIS_KEEPING = frozenset({"Identity", "Relu", "MaxPool", "Dropout"})

StepFunction = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Unit:
    """How one output is measured.

    ``grid``: ``step(reference)`` is the LSB per element. ``probe``: no grid; the unit is
    the output's largest change when the ``frontier`` tensors (the quantized activations
    feeding it) each move by one step. ``float``: ``step`` gives float32 ulps.
    """

    kind: str
    source: str
    step: StepFunction | None = None
    frontier: tuple[tuple[str, StepFunction], ...] = ()


def _step_function(scale: np.ndarray, elementwise: bool) -> StepFunction:
    """The LSB for a uniform grid: the broadcast scale, or the finest scale when it cannot broadcast."""
    magnitude = np.abs(np.asarray(scale, dtype=np.float64))
    finest = np.asarray(magnitude.min())

    def step(reference: np.ndarray) -> np.ndarray:
        if magnitude.size == 1 or not elementwise:
            return finest
        try:
            fits = np.broadcast_shapes(magnitude.shape, reference.shape) == reference.shape
        except ValueError:
            fits = False
        return magnitude if fits else finest

    return step


def _minifloat_step(scale: np.ndarray, mantissa: int, bias: int, elementwise: bool) -> StepFunction:
    """The LSB for FloatQuant: the minifloat's spacing at each reference value, times the scale."""
    uniform = _step_function(scale, elementwise)

    def step(reference: np.ndarray) -> np.ndarray:
        s = uniform(reference)
        _, exponent = np.frexp(np.where(np.isfinite(reference), reference, 0.0) / s)
        return np.ldexp(s, np.maximum(exponent - 1, 1 - bias) - mantissa)

    return step


def _scale_text(scale: np.ndarray) -> str:
    return f"scale {float(scale.reshape(-1)[0]):.9g}" if scale.size == 1 else f"per-channel scales {list(scale.shape)}"


def output_grid(index: GraphIndex, node: onnx.NodeProto, label: str, elementwise: bool) -> Unit | None:
    """The grid a quantizer's output lies on, when its parameters are constants."""
    op = quantizer_op(node)
    if op == "FloatQuant":
        scale, mantissa, bias = (index.constant(node, i) for i in (1, 3, 4))
        if scale is None or mantissa is None or bias is None or mantissa.size != 1 or bias.size != 1:
            return None
        m, b = int(mantissa.reshape(())), int(bias.reshape(()))
        source = f"FloatQuant {label!r}: minifloat spacing (mantissa {m}, bias {b}), {_scale_text(scale)}"
        return Unit("grid", source, _minifloat_step(scale, m, b, elementwise))
    # Trunc v2 leaves its output on out_scale; Trunc v1 stays in units of the input scale.
    scale = index.constant(node, 4 if op == "Trunc" and len(node.input) == 6 else 1)
    if scale is None:
        return None
    return Unit("grid", f"{op} {label!r}: {_scale_text(scale)}", _step_function(scale, elementwise))


def _dequantize_grid(index: GraphIndex, node: onnx.NodeProto, label: str, elementwise: bool) -> Unit | None:
    """A DequantizeLinear in the original (a QCDQ input model): its output lies on its scale's grid.

    A 1-D scale lies along the node's ``axis`` (default 1) of the reference value.
    """
    scale = index.constant(node, 1)
    if scale is None:
        return None
    magnitude = np.abs(np.asarray(scale, dtype=np.float64))
    finest = np.asarray(magnitude.min())
    axis = int(next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1))

    def step(reference: np.ndarray) -> np.ndarray:
        if magnitude.size == 1 or magnitude.ndim != 1 or not elementwise or reference.ndim == 0:
            return finest
        along = axis % reference.ndim
        if reference.shape[along] != magnitude.size:
            return finest
        shape = [1] * reference.ndim
        shape[along] = magnitude.size
        return magnitude.reshape(shape)

    return Unit("grid", f"DequantizeLinear {label!r}: {_scale_text(scale)}", step)


def _finest(units: list[Unit], why: str) -> Unit:
    def step(reference: np.ndarray) -> np.ndarray:
        return np.asarray(min(float(np.min(unit.step(reference))) for unit in units))  # type: ignore[misc]

    return Unit("grid", f"finest of {why}: " + "; ".join(unit.source for unit in units), step)


def _grid_of(index: GraphIndex, name: str, elementwise: bool = True) -> Unit | None:
    """Walk back from ``name`` through grid-keeping ops to the quantizer that set its grid."""
    while name in index.producer:
        position, node = index.producer[name]
        if quantizer_op(node) is not None:
            return output_grid(index, node, node_label(node, position), elementwise)
        if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx"):
            return _dequantize_grid(index, node, node_label(node, position), elementwise)
        if node.domain not in ("", "ai.onnx") or node.op_type not in _GRID_KEEPING or not node.input:
            return None
        elementwise = elementwise and node.op_type in _AXIS_KEEPING
        if node.op_type == "Concat":
            units = [_grid_of(index, source, False) for source in node.input if source]
            if not units or any(unit is None for unit in units):
                return None
            return units[0] if len(units) == 1 else _finest(units, "Concat inputs")  # type: ignore[arg-type]
        name = node.input[0]
    return None


def _frontier(index: GraphIndex, name: str) -> list[tuple[str, str, StepFunction]]:
    """The quantizers feeding ``name``: ``(tensor, node label, step)`` for the nearest
    quantizers upstream with constant parameters. Activation quantizers if there are any
    (weights and biases fold exactly, so one step of error per element is an activation's
    allowance); otherwise the weight and bias quantizers, as when a float input meets a
    quantized weight and only the weight's step gives the computation a scale."""
    activations: list[tuple[str, str, StepFunction]] = []
    constants: list[tuple[str, str, StepFunction]] = []
    queue, seen = deque([name]), {name}
    while queue:
        tensor = queue.popleft()
        if tensor not in index.producer:
            continue
        position, node = index.producer[tensor]
        if quantizer_op(node) is not None:
            label = node_label(node, position)
            grid = output_grid(index, node, label, True)
            if grid is not None and grid.step is not None:
                (constants if node.input[0] in index.constants else activations).append((tensor, label, grid.step))
            continue
        for source in node.input:
            if source and source not in seen and source not in index.constants:
                seen.add(source)
                queue.append(source)
    return activations or constants


FLOAT_UNIT = 2.0**-16  # of the largest reference magnitude: far above float reassociation noise


def _float_unit(reference: np.ndarray) -> np.ndarray:
    """2^-16 of the largest finite magnitude: the unit for float results without a grid."""
    finite = np.abs(reference[np.isfinite(reference)])
    return np.asarray(FLOAT_UNIT * float(finite.max()) if finite.size else 0.0)


def output_unit(index: GraphIndex, name: str) -> Unit:
    grid = _grid_of(index, name)
    if grid is not None:
        return grid
    frontier = _frontier(index, name)
    if frontier:
        labels = ", ".join(repr(label) for _, label, _ in frontier)
        how = "random signs" if len(frontier) == 1 else "random signs; together and one at a time"
        source = f"no grid on this output; unit = its largest change when {labels} move by one step ({how})"
        return Unit("probe", source, frontier=tuple((tensor, step) for tensor, _, step in frontier))
    return Unit("float", "no quantizer on or upstream of this output; unit = 2^-16 of its largest magnitude", _float_unit)


def probe(
    reference: ReferenceExecutor,
    feeds: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    units: dict[str, Unit],
    rng: np.random.Generator,
    base: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Per probed output, the largest change when its frontier moves by one step with random
    signs: every frontier tensor at once, and each alone (moving all at once can cancel).
    ``base`` (:meth:`ReferenceExecutor.trace` of ``feeds``) lets each run recompute only
    what the moved tensors reach."""
    steps = {tensor: step for unit in units.values() for tensor, step in unit.frontier}

    def nudge(step: StepFunction) -> Callable[[np.ndarray], np.ndarray]:
        def move(values: np.ndarray) -> np.ndarray:
            signs = rng.choice(np.array([-1.0, 1.0]), size=values.shape)
            return (values + signs * step(values)).astype(values.dtype)

        return move

    runs = [list(steps)] + ([[tensor] for tensor in steps] if len(steps) > 1 else [])
    largest: dict[str, float] = {name: 0.0 for name, unit in units.items() if unit.kind == "probe"}
    for moved_tensors in runs:
        moved = reference.run(feeds, perturb={tensor: nudge(steps[tensor]) for tensor in moved_tensors}, base=base)
        for name in largest:
            with np.errstate(invalid="ignore"):
                change = np.abs(moved[name].astype(np.float64) - expected[name].astype(np.float64))
            measured = change[~np.isnan(change)]  # NaN where the reference itself is NaN
            if measured.size:
                largest[name] = max(largest[name], float(measured.max()))
    # A saturated head (Softmax at 0 and 1) barely moves: never below the float unit.
    return {
        name: np.asarray(max(change, float(_float_unit(expected[name].astype(np.float64)))))
        for name, change in largest.items()
    }
