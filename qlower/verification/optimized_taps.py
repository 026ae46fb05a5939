"""The taps as ORT's optimized graph holds them (read at ORT_ENABLE_ALL without a second session).

At ``ORT_ENABLE_ALL`` the verifier reads the taps from the graph the deployed session runs
(ORT saves it through ``optimized_model_filepath``), reopened without optimizing it again.
ORT keeps most tensor names, but it may rename a tap's integers: on x86 its QDQS8ToU8
transformer makes an int8 QuantizeLinear uint8 (zero point + 128) under a new name, and a
DequantizeLinear fused into the next kernel takes the float tensor with it. This module
finds each tap there or says that one is gone.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
from onnx import numpy_helper

from ..reference import identical
from .internal import TapPoint


def carried_taps(points: list[TapPoint], lowered: onnx.ModelProto, saved: onnx.ModelProto) -> list[TapPoint] | None:
    """Every tap as read from ORT's optimized graph ``saved``, or None if one is gone.

    A tap whose integer tensor ORT renamed is read from the DequantizeLinear output it
    decodes to, when that is still there; else, when the lowered model's QuantizeLinear
    wrote it, from the QuantizeLinear of ``saved`` that quantizes the same float tensor
    with the same scale and axis and a zero point of the same value or, for int8 made
    uint8 (ORT's QDQS8ToU8 on x86), 128 higher: the same integers shifted by 128.
    """
    produced = {name for node in saved.graph.node for name in node.output if name}
    writers = {node.output[0]: node for node in lowered.graph.node if node.output}
    quantizers: dict[str, list[onnx.NodeProto]] = {}
    for node in saved.graph.node:
        if node.op_type == "QuantizeLinear" and node.domain in ("", "ai.onnx") and len(node.input) == 3:
            quantizers.setdefault(node.input[0], []).append(node)
    constants = {tensor.name: tensor for tensor in lowered.graph.initializer}
    # (a saved graph's large weights are in its data file, not loaded here: a quantizer whose
    # scale or zero point is among them is not matched, and the taps are exposed instead)
    saved_constants = {tensor.name: tensor for tensor in saved.graph.initializer if tensor.data_location != onnx.TensorProto.EXTERNAL}
    carried = []
    for point in points:
        if point.exposed in produced:
            carried.append(point)
        elif point.dequantized and point.original in produced:  # the DequantizeLinear's float output
            carried.append(replace(point, exposed=point.original, tap=None))
        else:
            writer = writers.get(point.exposed)
            if point.tap is None or writer is None or writer.op_type != "QuantizeLinear" or writer.domain not in ("", "ai.onnx"):
                return None
            found = _same_quantizer(point, writer, constants, quantizers.get(writer.input[0], []), saved_constants)
            if found is None:
                return None
            carried.append(found)
    return carried


_QUANTIZE_DEFAULTS = {"axis": 1, "saturate": 1, "block_size": 0, "output_dtype": 0}


def _quantize_attributes(node: onnx.NodeProto) -> dict[str, int] | None:
    """A QuantizeLinear's attributes with their defaults filled in (None: one we do not know)."""
    attributes = dict(_QUANTIZE_DEFAULTS)
    for attr in node.attribute:
        if attr.name not in attributes or attr.type != onnx.AttributeProto.INT:
            return None
        attributes[attr.name] = attr.i
    return attributes


def _same_quantizer(
    point: TapPoint,
    writer: onnx.NodeProto,
    constants: dict[str, onnx.TensorProto],
    candidates: list[onnx.NodeProto],
    saved_constants: dict[str, onnx.TensorProto],
) -> TapPoint | None:
    """``point`` read from the one candidate QuantizeLinear equal to ``writer`` up to a uint8 shift."""
    if len(writer.input) != 3 or writer.input[1] not in constants or writer.input[2] not in constants:
        return None
    scale, zero = (numpy_helper.to_array(constants[name]) for name in writer.input[1:])
    attributes = _quantize_attributes(writer)
    matches = []
    for node in candidates:
        if node.input[1] not in saved_constants or node.input[2] not in saved_constants:
            continue
        their_scale, their_zero = (numpy_helper.to_array(saved_constants[name]) for name in node.input[1:])
        if attributes is None or _quantize_attributes(node) != attributes or not identical(their_scale, scale):
            continue
        if their_zero.dtype == zero.dtype and np.array_equal(their_zero, zero):
            shift = 0
        elif zero.dtype == np.int8 and their_zero.dtype == np.uint8 and np.array_equal(their_zero.astype(np.int64), zero.astype(np.int64) + 128):
            shift = 128
        else:
            continue
        matches.append((node.output[0], shift))
    if len(matches) != 1:
        return None
    tensor, shift = matches[0]
    tap = replace(point.tap, tensor=tensor, zero_point=tuple(z + shift for z in point.tap.zero_point))  # type: ignore[arg-type, type-var]
    return replace(point, exposed=tensor, tap=tap)
