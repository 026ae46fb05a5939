"""Taps: where each original quantizer's output can be read in the lowered model.

The verifier compares every quantized activation present in both models, not only the
graph outputs (SPEC section 4). A quantizer output that keeps its float tensor name in
the lowered model (the DequantizeLinear ending a QCDQ chain writes it) is tapped by that
name, with nothing recorded. When a pass leaves the value only as an integer tensor (a
QLinearConv's output, a QuantizeLinear whose DequantizeLinear was fused into the next
unit), it records a :class:`Tap`: the original tensor's name, the integer tensor that
now holds it, and the ``scale``/``zero_point``/``axis`` that give it back as
``(q - zero_point) * scale`` in float32, exactly as DequantizeLinear computes it.

A pass calls ``ctx.taps.append(Tap(...))``; the pipeline writes the list, as JSON, into
the lowered model's ``metadata_props`` under :data:`METADATA_KEY` (:func:`attach`, which
drops taps whose integer tensor a later pass or cleanup removed), and the verifier reads
it back with :func:`read`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx

from .errors import ModelLoadError

METADATA_KEY = "qlower.taps"


@dataclass(frozen=True)
class Tap:
    """The original tensor ``original`` lives on as integer tensor ``tensor`` of the lowered model.

    ``scale`` and ``zero_point`` are one value each (per tensor) or one per slice along
    ``axis`` (per channel), as DequantizeLinear takes them.
    """

    original: str
    tensor: str
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int | None = None

    @classmethod
    def of(cls, original: str, tensor: str, scale: np.ndarray, zero_point: np.ndarray, axis: int | None = None) -> "Tap":
        """A tap from numpy parameters (any shape that flattens to one value or one per channel)."""
        scales = tuple(float(s) for s in np.asarray(scale, dtype=np.float32).reshape(-1))
        zero_points = tuple(int(z) for z in np.asarray(zero_point).reshape(-1))
        if len(zero_points) == 1 and len(scales) > 1:
            zero_points = zero_points * len(scales)
        return cls(original, tensor, scales, zero_points, axis if len(scales) > 1 else None)

    def dequantize(self, values: np.ndarray) -> np.ndarray:
        """The real values of the integer tensor: float32 ``(q - zero_point) * scale``."""
        scale = np.asarray(self.scale, dtype=np.float32)
        zero_point = np.asarray(self.zero_point, dtype=np.int64)
        integers = np.asarray(values).astype(np.int64)
        if self.axis is not None and scale.size > 1:
            shape = [1] * integers.ndim
            shape[self.axis] = scale.size
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        else:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        return ((integers - zero_point).astype(np.float32) * scale).astype(np.float32)

    def snap(self, values: np.ndarray) -> np.ndarray:
        """Float values a runtime dequantized from this tap's integers, read back as those integers
        dequantized exactly. A runtime may dequantize with its own float rounding (OpenVINO
        interpolates a FakeQuantize's output range): a value within 1/1000 of a step of the
        grid is that grid point; one farther off is kept as it is (and compared as such)."""
        scale = np.asarray(self.scale, dtype=np.float64)
        zero_point = np.asarray(self.zero_point, dtype=np.float64)
        raw = np.asarray(values)
        if self.axis is not None and scale.size > 1:
            shape = [1] * raw.ndim
            shape[self.axis] = scale.size
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        else:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        with np.errstate(invalid="ignore", divide="ignore"):
            steps = raw.astype(np.float64) / scale
            nearest = np.rint(steps)
            on_grid = np.abs(steps - nearest) <= 1e-3
        integers = np.where(on_grid, nearest + zero_point, zero_point).astype(np.int64)
        return np.where(on_grid, self.dequantize(integers), raw).astype(np.float32)

    def to_dict(self) -> dict[str, object]:
        return {
            "original": self.original,
            "tensor": self.tensor,
            "scale": list(self.scale),
            "zero_point": list(self.zero_point),
            "axis": self.axis,
        }


def attach(model: onnx.ModelProto, taps: Iterable[Tap]) -> None:
    """Write ``taps`` into ``model.metadata_props``, keeping those whose tensor a node still produces."""
    produced = {name for node in model.graph.node for name in node.output}
    kept = [tap.to_dict() for tap in taps if tap.tensor in produced]
    for index in reversed(range(len(model.metadata_props))):
        if model.metadata_props[index].key == METADATA_KEY:
            del model.metadata_props[index]
    if kept:
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(kept, separators=(",", ":"))


def read(model: onnx.ModelProto) -> list[Tap]:
    """The taps a lowered model carries (none for a model qlower did not write them into)."""
    entry = next((prop for prop in model.metadata_props if prop.key == METADATA_KEY), None)
    if entry is None:
        return []
    try:
        return [
            Tap(
                str(item["original"]),
                str(item["tensor"]),
                tuple(float(s) for s in item["scale"]),
                tuple(int(z) for z in item["zero_point"]),
                None if item["axis"] is None else int(item["axis"]),
            )
            for item in json.loads(entry.value)
        ]
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelLoadError(f"lowered model: metadata {METADATA_KEY!r} is not a list of taps ({exc})") from None
