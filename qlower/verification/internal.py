"""Internal taps: the quantized activations present in both models, compared in their own steps.

Graph outputs are not enough (SPEC section 4): one-step flips compound inside a network
and an average pool or float logits can hide them. Every activation quantizer of the
original (its data input depends on a graph input, its parameters are constants, its
output is not a graph output) is a tap when the lowered model still holds its value:

* a :class:`qlower.taps.Tap` record in the lowered model names the integer tensor;
* else, when the tensor keeps its name and a DequantizeLinear with constant 8/16-bit
  parameters writes it, the DequantizeLinear's integer input is read and dequantized
  exactly as DequantizeLinear does (reading the integers, not the float, leaves ORT's
  fusion of that DequantizeLinear into the next unit intact);
* else, when a node of the lowered model writes a tensor of that name, it is read as is.

All taps are read in the same run as the graph outputs, as extra graph outputs. A runner
that reads no integer taps (OpenVINO: exposing a QuantizeLinear's integer output makes its
CPU plugin run that QuantizeLinear on its own, with different rounding, measured) reads
the float tensor the DequantizeLinear writes instead, snapped to the tap's grid.

A quantizer that reads a graph input directly (``reads_graph_input``) does one float
operation per element, the division QuantizeLinear defines, with nothing upstream that a
runtime may round differently: on a runner with ``exact_graph_input_quantizers``
(OpenVINO, which multiplies by the reciprocal instead) the verifier holds it
bit-identical, ties included, where other taps get the tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .. import taps
from ..reference import node_label
from .graph import GraphIndex, quantizer_op
from .units import Unit, output_grid

# Why a quantizer of a graph input is held bit-identical where a tolerance applies elsewhere.
GRAPH_INPUT_RULE = "quantizes a graph input: one IEEE division per element, nothing to round differently"

# DequantizeLinear inputs whose integers Tap.dequantize reproduces exactly.
_TAPPABLE_INTEGERS = frozenset(
    {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32}
)


@dataclass(frozen=True)
class TapPoint:
    """One quantized activation compared inside the models.

    ``original`` is the quantizer's output in the original model, ``node`` that quantizer's
    label and ``rank`` its topological position; ``exposed`` is the lowered model's tensor
    that is read, decoded by ``tap`` when it holds integers (None: the float tensor itself).
    ``dequantized``: a DequantizeLinear of the lowered model writes ``original`` from the
    tap's integers; ``snapped``: ``exposed`` is that float tensor, read back onto the grid.
    """

    original: str
    node: str
    rank: int
    unit: Unit
    exposed: str
    tap: taps.Tap | None
    reads_graph_input: bool = False
    dequantized: bool = False
    snapped: bool = False

    def reading_float(self) -> "TapPoint":
        """This tap read from the DequantizeLinear's float output instead of its integers."""
        return replace(self, exposed=self.original, snapped=True) if self.dequantized else self

    @cached_property
    def single_parameters(self) -> tuple[float, int] | None:
        """The tap's one scale and zero point when it decodes integers with one of each (such
        taps are decoded together by :func:`lowered_values`); None otherwise."""
        if self.tap is None or self.snapped or len(self.tap.scale) != 1:
            return None
        return self.tap.scale[0], self.tap.zero_point[0]

    def lowered_value(self, raw: np.ndarray) -> np.ndarray:
        if self.tap is None:
            return raw
        if self.snapped:
            return self.tap.snap(raw)
        return self.tap.dequantize(raw)


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name == name), default)


def _dequantize_tap(original: str, node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto], produced: set[str]) -> taps.Tap | None:
    """The integers a DequantizeLinear with constant parameters reads, as a tap, if exact to decode."""
    if len(node.input) < 2 or node.input[1] not in initializers or node.input[0] not in produced:
        return None
    scale = numpy_helper.to_array(initializers[node.input[1]])
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in initializers:
            return None
        zero = initializers[node.input[2]]
        if zero.data_type not in _TAPPABLE_INTEGERS:
            return None
        zero_point = numpy_helper.to_array(zero)
    else:
        zero_point = np.zeros((), np.uint8)
    if scale.dtype != np.float32 or scale.ndim > 1 or _attribute(node, "block_size", 0):
        return None
    return taps.Tap.of(original, node.input[0], scale, zero_point, _attribute(node, "axis", 1))


def plan_taps(index: GraphIndex, ranks: dict[int, int], live: set[str], lowered: onnx.ModelProto) -> list[TapPoint]:
    """The taps shared by the original and ``lowered``, in topological order.

    ``index`` and ``ranks`` describe the original (see :mod:`.graph`); ``live`` holds the
    tensors that depend on its graph inputs.
    """
    records = {tap.original: tap for tap in taps.read(lowered)}
    lowered_producers = {name: node for node in lowered.graph.node for name in node.output if name}
    produced = set(lowered_producers) | {value.name for value in lowered.graph.input}
    initializers = {tensor.name: tensor for tensor in lowered.graph.initializer}
    outputs = {value.name for value in index.graph.output}
    graph_inputs = {value.name for value in index.graph.input}
    points, exposed = [], set()
    for position, node in enumerate(index.graph.node):
        if quantizer_op(node) is None or position not in ranks or not node.input or node.input[0] not in live:
            continue
        name = node.output[0]
        label = node_label(node, position)
        grid = output_grid(index, node, label, True)
        if name in outputs or grid is None:
            continue
        tap = records.get(name)
        dequantized = False
        if tap is None and name in lowered_producers:
            writer = lowered_producers[name]
            if writer.op_type == "DequantizeLinear" and writer.domain in ("", "ai.onnx"):
                tap = _dequantize_tap(name, writer, initializers, produced)
                dequantized = tap is not None
        reads = tap.tensor if tap else name
        if (tap is None and name not in lowered_producers) or reads in exposed:
            continue
        exposed.add(reads)
        reads_input = node.input[0] in graph_inputs
        points.append(TapPoint(name, label, ranks[position], grid, tap.tensor if tap else name, tap, reads_input, dequantized))
    return sorted(points, key=lambda point: point.rank)


def lowered_values(points: Sequence[TapPoint], raws: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """``point.lowered_value(raw)`` of each point, by its ``original`` name. The integers of
    taps with one scale and zero point each are decoded together: the same float32
    operations, element by element, as :meth:`qlower.taps.Tap.dequantize` does per tap."""
    values: dict[str, np.ndarray] = {}
    together: list[tuple[TapPoint, np.ndarray]] = []
    parameters: list[tuple[float, int]] = []
    for point, raw in zip(points, raws):
        single = point.single_parameters
        if single is not None and raw.dtype.kind in "iu" and raw.dtype.itemsize <= 4:
            together.append((point, raw))
            parameters.append(single)
        else:
            values[point.original] = point.lowered_value(raw)
    if not together:
        return values
    sizes = [raw.size for _, raw in together]
    integers = np.concatenate([raw for _, raw in together], axis=None).astype(np.int64)  # each flattened
    zero_points = np.repeat(np.array([zero_point for _, zero_point in parameters], np.int64), sizes)
    scales = np.repeat(np.array([scale for scale, _ in parameters], np.float32), sizes)
    decoded = (integers - zero_points).astype(np.float32) * scales
    offset = 0
    for (point, raw), size in zip(together, sizes):
        values[point.original] = decoded[offset : offset + size].reshape(raw.shape)
        offset += size
    return values
