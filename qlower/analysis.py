"""Analyse every QONNX quantizer once: role, constant parameters, range and scale layout.

Passes read this table instead of rescanning the graph, and the checks here are where bad
quantizer parameters (zero or NaN scales, impossible bit widths, zero points outside the
range, scales that do not broadcast) are refused with the node named.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from . import semantics
from .errors import InvalidQuantizerError, UnsupportedError
from .ir import is_qonnx_node

MAX_BIT_WIDTH = 32

# Ops that take a bias as a given input index.
_BIAS_INPUT_INDEX = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}
# Ops whose output, plus a constant, is a bias addition.
_BIASED_PRODUCERS = frozenset({"MatMul", "Conv", "Gemm", "ConvTranspose"})


@dataclass
class Quantizer:
    """One QONNX quantizer node with its parameters resolved to numpy constants."""

    node: gs.Node
    role: str  # "activation", "weight" or "bias"
    scale: np.ndarray
    zero_point: np.ndarray
    bit_width: float | None = None  # None for BipolarQuant
    signed: bool = True
    narrow: bool = False
    rounding_mode: str = "ROUND"
    input_rank: int | None = None
    # Trunc only: version (1 or 2), input/output bit widths and output scale.
    trunc_version: int | None = None
    in_bit_width: float | None = None
    out_scale: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def op(self) -> str:
        return self.node.op

    @property
    def x(self) -> gs.Tensor:
        return self.node.inputs[0]

    @property
    def output(self) -> gs.Tensor:
        return self.node.outputs[0]

    @property
    def is_constant_input(self) -> bool:
        return isinstance(self.x, gs.Constant)

    @property
    def is_bipolar(self) -> bool:
        """BipolarQuant, or a signed 1-bit Quant (same {-1,+1} grid, zero point aside)."""
        return self.op == "BipolarQuant" or (self.op == "Quant" and self.signed and self.bit_width == 1)

    @property
    def int_range(self) -> tuple[int, int]:
        assert self.bit_width is not None
        return semantics.int_range(self.signed, self.narrow, int(self.bit_width))

    @property
    def zero_point_is_zero(self) -> bool:
        return not np.any(self.zero_point)


def _constant(node: gs.Node, index: int, what: str) -> np.ndarray:
    if index >= len(node.inputs):
        raise InvalidQuantizerError(f"missing input {index} ({what})", node.name)
    tensor = node.inputs[index]
    if not isinstance(tensor, gs.Constant):
        raise UnsupportedError(
            f"{what} ({tensor.name!r}) is computed at run time; only constant quantizer parameters can be lowered",
            node.name,
        )
    return np.asarray(tensor.values, dtype=np.float32)


def _scalar_bit_width(node: gs.Node, value: np.ndarray, what: str) -> float:
    if value.size != 1:
        raise UnsupportedError(f"{what} has shape {value.shape}; only a single bit width per quantizer is supported", node.name)
    bits = float(value.reshape(()))
    if not np.isfinite(bits) or bits != round(bits):
        raise UnsupportedError(f"{what} is {bits:g}; a non-integer bit width has no integer range to lower to", node.name)
    if not 1 <= bits <= MAX_BIT_WIDTH:
        raise InvalidQuantizerError(f"{what} is {bits:g}; it must be between 1 and {MAX_BIT_WIDTH}", node.name)
    return bits


def _check_scale(node: gs.Node, scale: np.ndarray, what: str = "scale") -> None:
    if scale.size == 0:
        raise InvalidQuantizerError(f"{what} is empty", node.name)
    if not np.all(np.isfinite(scale)):
        raise InvalidQuantizerError(f"{what} contains NaN or infinity", node.name)
    if np.any(scale <= 0):
        raise InvalidQuantizerError(f"{what} contains {float(scale[scale <= 0].ravel()[0]):g}; scales must be positive", node.name)


def _check_broadcast(node: gs.Node, shape: tuple[int, ...] | None, param: np.ndarray, what: str) -> None:
    if shape is None:
        return
    if param.ndim > len(shape) and any(d != 1 for d in param.shape[: param.ndim - len(shape)]):
        raise InvalidQuantizerError(f"{what} shape {param.shape} has more dimensions than the input {shape}", node.name)
    for p_dim, x_dim in zip(reversed(param.shape), reversed(shape)):
        if p_dim != 1 and isinstance(x_dim, int) and x_dim >= 0 and p_dim != x_dim:
            raise InvalidQuantizerError(f"{what} shape {param.shape} does not broadcast against the input shape {shape}", node.name)


def _static_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    if isinstance(tensor, gs.Constant):
        return tuple(tensor.values.shape)
    if tensor.shape is None:
        return None
    return tuple(d if isinstance(d, int) else -1 for d in tensor.shape)


def _role(node: gs.Node) -> str:
    if not isinstance(node.inputs[0], gs.Constant):
        return "activation"
    for consumer in node.outputs[0].outputs:
        index = _BIAS_INPUT_INDEX.get(consumer.op)
        if index is not None and len(consumer.inputs) > index and consumer.inputs[index] is node.outputs[0]:
            return "bias"
        if consumer.op == "Add":
            others = [t for t in consumer.inputs if t is not node.outputs[0]]
            if any(t.inputs and t.inputs[0].op in _BIASED_PRODUCERS for t in others):
                return "bias"
    return "weight"


def _rounding_mode(node: gs.Node, default: str | None) -> str:
    raw = node.attrs.get("rounding_mode", default)
    if raw is None:
        raise InvalidQuantizerError("attribute rounding_mode is required", node.name)
    try:
        return semantics.normalize_rounding_mode(raw)
    except ValueError as exc:
        raise InvalidQuantizerError(str(exc), node.name) from None


def analyse_node(node: gs.Node) -> Quantizer:
    """Resolve one quantizer's parameters, refusing invalid or dynamic ones."""
    if not node.inputs or node.inputs[0] is None:
        raise InvalidQuantizerError("has no data input", node.name)
    shape = _static_shape(node.inputs[0])
    rank = len(shape) if shape is not None else None
    if node.op == "BipolarQuant":
        scale = _constant(node, 1, "scale")
        _check_scale(node, scale)
        _check_broadcast(node, shape, scale, "scale")
        return Quantizer(node, _role(node), scale, np.zeros((), np.float32), input_rank=rank)
    if node.op == "Quant":
        scale, zero_point = _constant(node, 1, "scale"), _constant(node, 2, "zero point")
        bits = _scalar_bit_width(node, _constant(node, 3, "bit width"), "bit width")
        quantizer = Quantizer(
            node, _role(node), scale, zero_point, bits,
            signed=bool(node.attrs.get("signed", 1)), narrow=bool(node.attrs.get("narrow", 0)),
            rounding_mode=_rounding_mode(node, "ROUND"), input_rank=rank,
        )
        _check_scale(node, scale)
        _check_broadcast(node, shape, scale, "scale")
        _check_broadcast(node, shape, zero_point, "zero point")
        _check_zero_point(quantizer)
        return quantizer
    if node.op == "Trunc":
        return _analyse_trunc(node, shape, rank)
    raise UnsupportedError(f"{node.op} is not supported yet", node.name)


def _check_zero_point(q: Quantizer) -> None:
    zp = q.zero_point
    if not np.all(np.isfinite(zp)):
        raise InvalidQuantizerError("zero point contains NaN or infinity", q.name)
    if q.is_bipolar:
        return
    q_min, q_max = q.int_range
    if np.any(zp < q_min) or np.any(zp > q_max):
        raise InvalidQuantizerError(
            f"zero point {float(zp[(zp < q_min) | (zp > q_max)].ravel()[0]):g} lies outside the integer range [{q_min}, {q_max}]",
            q.name,
        )


def _analyse_trunc(node: gs.Node, shape: tuple[int, ...] | None, rank: int | None) -> Quantizer:
    version = 2 if len(node.inputs) == 6 else 1
    scale, zero_point = _constant(node, 1, "scale"), _constant(node, 2, "zero point")
    _check_scale(node, scale)
    in_bits = _scalar_bit_width(node, _constant(node, 3, "input bit width"), "input bit width")
    if version == 2:
        out_scale = _constant(node, 4, "output scale")
        _check_scale(node, out_scale, "output scale")
        out_bits = _scalar_bit_width(node, _constant(node, 5, "output bit width"), "output bit width")
        default_mode = None
    else:
        out_scale = None
        out_bits = _scalar_bit_width(node, _constant(node, 4, "output bit width"), "output bit width")
        default_mode = None  # required in both versions, as in QONNX and the reference executor
    for param, what in ((scale, "scale"), (zero_point, "zero point")):
        _check_broadcast(node, shape, param, what)
    if not np.all(np.isfinite(zero_point)):
        raise InvalidQuantizerError("zero point contains NaN or infinity", node.name)
    return Quantizer(
        node, _role(node), scale, zero_point, out_bits,
        signed=bool(node.attrs.get("signed", 1)), narrow=bool(node.attrs.get("narrow", 0)),
        rounding_mode=_rounding_mode(node, default_mode), input_rank=rank,
        trunc_version=version, in_bit_width=in_bits, out_scale=out_scale,
    )


def _uniform_or_list(values: np.ndarray) -> float | list[float]:
    flat = np.asarray(values, np.float64).reshape(-1)
    return float(flat[0]) if flat.size and np.all(flat == flat[0]) else [float(v) for v in flat]


def describe(q: Quantizer) -> dict[str, object]:
    """The quantizer's parameters as a user reads them (for reports and ``qlower inspect``).

    ``layout`` is "per-tensor", "per-channel" (with ``axis``) or "multi-axis" (scales or
    zero points varying along several axes: no single-axis Q/DQ expresses them).
    """
    params = [q.scale, q.zero_point]
    fits, axis = per_axis_layout(params, q.input_rank)
    layout = "multi-axis" if not fits else ("per-tensor" if axis is None else "per-channel")
    return {
        "tensor": q.output.name,
        "signed": q.signed,
        "narrow": q.narrow,
        "rounding_mode": None if q.op == "BipolarQuant" else q.rounding_mode,
        "layout": layout,
        "axis": axis,
        "zero_point": _uniform_or_list(q.zero_point),
    }


def analyse(graph: gs.Graph) -> list[Quantizer]:
    """The quantizer table, in graph order."""
    return [analyse_node(node) for node in graph.nodes if is_qonnx_node(node)]


def per_axis_layout(params: list[np.ndarray], rank: int | None) -> tuple[bool, int | None]:
    """Whether ``params`` fit one ONNX Q/DQ layout, and its axis.

    Returns ``(True, None)`` when all are per-tensor, ``(True, axis)`` when every
    non-scalar parameter varies along the same single axis (counted from the left when the
    input rank is known, else negative from the right, which ONNX also accepts), and
    ``(False, None)`` when no single-axis Q/DQ can express them.
    """
    axes: set[int] = set()
    lengths: set[int] = set()
    for param in params:
        varying = [i for i, d in enumerate(param.shape) if d != 1]
        if len(varying) > 1:
            return False, None
        if varying:
            from_right = varying[0] - param.ndim
            axes.add(from_right)
            lengths.add(param.shape[varying[0]])
    if not axes:
        return True, None
    if len(axes) > 1 or len(lengths) > 1:
        return False, None
    from_right = axes.pop()
    return True, (rank + from_right if rank is not None else from_right)
