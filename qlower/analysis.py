"""Analyse every QONNX quantizer once: role, constant parameters, range and scale layout.

Passes read this table instead of rescanning the graph, and the checks here are where bad
quantizer parameters (zero or NaN scales, bit widths below 1, NaN zero points, scales that
do not broadcast, minifloat formats the reference cannot run) are refused with the node
named. Parameters computed at run time (any scale, zero point, bit width, Trunc output
scale, FloatQuant format parameter) are valid input: they are listed in
``Quantizer.runtime``, their fields are None, and only the exact float paths lower them.
Zero points outside the integer range and non-integer bit widths are valid QONNX too, and
are not refused here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from . import semantics
from .errors import InvalidQuantizerError, UnsupportedError
from .ir import is_qonnx_node

FLOAT8_OPSET = 19  # QuantizeLinear/DequantizeLinear with float8 zero points

# Ops that take a bias as a given input index.
_BIAS_INPUT_INDEX = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}
# Ops whose output, plus a constant, is a bias addition.
_BIASED_PRODUCERS = frozenset({"MatMul", "Conv", "Gemm", "ConvTranspose"})


@dataclass(frozen=True)
class Minifloat:
    """FloatQuant's format: inputs 2-5 and the attributes (SPEC 1.4).

    A format parameter computed at run time is ``None``; only ``is_constant`` formats have
    a ``limit`` known now.
    """

    exponent_bits: int | None
    mantissa_bits: int | None
    bias: int | None
    max_val: float | None
    has_inf: bool
    has_nan: bool
    has_subnormal: bool
    saturation: bool

    @property
    def is_constant(self) -> bool:
        return None not in (self.exponent_bits, self.mantissa_bits, self.bias, self.max_val)

    @property
    def limit(self) -> np.float32:
        """The clamp bound ``min(minifloat_max, max_val)`` in float32, as the semantics take it."""
        assert self.exponent_bits is not None and self.mantissa_bits is not None and self.bias is not None, "run-time format"
        return np.minimum(
            np.float32(semantics.minifloat_max(self.exponent_bits, self.mantissa_bits, self.bias)), np.float32(self.max_val)
        )

    def describe(self) -> str:
        overflow = "saturating" if self.saturation else ("overflow to inf" if self.has_inf else "overflow to NaN")
        if not self.is_constant:
            def known(value: object) -> str:
                return "run-time" if value is None else f"{value:g}"
            return (f"exponent bits {known(self.exponent_bits)}, mantissa bits {known(self.mantissa_bits)}, "
                    f"bias {known(self.bias)}, max_val {known(self.max_val)}, {overflow}")
        return f"e{self.exponent_bits}m{self.mantissa_bits} bias {self.bias}, max {float(self.limit):g}, {overflow}"


@dataclass
class Quantizer:
    """One QONNX quantizer node with its parameters resolved to numpy constants.

    A parameter computed at run time is named in ``runtime`` and its field is ``None``;
    such a quantizer is left to the float path, which reads the tensors from ``node``.
    """

    node: gs.Node
    role: str  # "activation", "weight" or "bias"
    scale: np.ndarray | None
    zero_point: np.ndarray | None
    bit_width: float | None = None  # None for BipolarQuant and FloatQuant (or a run-time width)
    signed: bool = True
    narrow: bool = False
    rounding_mode: str = "ROUND"
    input_rank: int | None = None
    # Trunc only: version (1 or 2), input/output bit widths and output scale.
    trunc_version: int | None = None
    in_bit_width: float | None = None
    out_scale: np.ndarray | None = None
    minifloat: Minifloat | None = None  # FloatQuant only
    runtime: tuple[str, ...] = ()  # parameters computed at run time ("scale", "zero point", "bit width")
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
    def has_integer_width(self) -> bool:
        """A constant whole bit width, so the clamp bounds are integers (SPEC 1.1)."""
        return self.bit_width is not None and float(self.bit_width).is_integer()

    @property
    def int_range(self) -> tuple[int, int]:
        assert self.has_integer_width, f"{self.name}: {self.bit_width} bits have no integer range"
        return semantics.int_range(self.signed, self.narrow, int(self.bit_width))  # type: ignore[arg-type]

    @property
    def clamp_bounds(self) -> tuple[np.float32, np.float32]:
        """The clamp bounds QONNX uses, integer or not (``semantics.float_range``)."""
        assert self.bit_width is not None
        return semantics.float_range(self.signed, self.narrow, self.bit_width)

    @property
    def zero_point_is_zero(self) -> bool:
        return self.zero_point is not None and not np.any(self.zero_point)

    @property
    def zero_point_in_range(self) -> bool:
        """Whether every zero point lies inside the integer range (valid QONNX either way)."""
        if self.zero_point is None or not self.has_integer_width:
            return False
        q_min, q_max = self.int_range
        return bool(np.all((self.zero_point >= q_min) & (self.zero_point <= q_max)))


def _input(node: gs.Node, index: int, what: str) -> gs.Tensor:
    if index >= len(node.inputs) or node.inputs[index] is None:
        raise InvalidQuantizerError(f"missing input {index} ({what})", node.name)
    return node.inputs[index]


def _constant(node: gs.Node, index: int, what: str) -> np.ndarray:
    """A parameter the caller knows is constant (``_constant_or_runtime`` decides that)."""
    tensor = _input(node, index, what)
    assert isinstance(tensor, gs.Constant), f"{node.name}: {what} is computed at run time"
    return np.asarray(tensor.values, dtype=np.float32)


def _constant_or_runtime(node: gs.Node, index: int, what: str, runtime: list[str]) -> np.ndarray | None:
    """The parameter's value, or ``None`` (and its name added to ``runtime``) when computed at run time."""
    if not isinstance(_input(node, index, what), gs.Constant):
        runtime.append(what)
        return None
    return _constant(node, index, what)


def _scalar_bit_width(node: gs.Node, value: np.ndarray, what: str) -> float:
    """Any finite width >= 1, as the reference executor takes it (non-integer widths are legal QONNX)."""
    if value.size != 1:
        raise InvalidQuantizerError(f"{what} has shape {value.shape}; a quantizer has a single bit width", node.name)
    bits = float(value.reshape(()))
    if not np.isfinite(bits) or bits < 1:
        raise InvalidQuantizerError(f"{what} is {bits:g}; it must be a finite number >= 1", node.name)
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


# Parameter checks already passed in one ``analyse`` call: (scale tensor, zero-point tensor,
# input shape), by the identity of tensors the graph holds throughout the call.
_Checked = set[tuple[int, int, "tuple[int, ...] | None"]]


def _check_scale_and_zero_point(
    node: gs.Node, shape: tuple[int, ...] | None, scale: np.ndarray | None, zero_point: np.ndarray | None,
    checked: _Checked | None,
) -> None:
    """The checks Quant and Trunc share on their constant scale and zero point (None: run-time).

    Quantizers reading the same two parameter tensors with the same input shape (one scale
    shared by thousands of quantizers) get the same answer: ``checked`` skips the repeats.
    """
    key = (id(node.inputs[1]), id(node.inputs[2]), shape)
    if checked is not None and key in checked:
        return
    if scale is not None:
        _check_scale(node, scale)
        _check_broadcast(node, shape, scale, "scale")
    if zero_point is not None:
        _check_broadcast(node, shape, zero_point, "zero point")
        if not np.all(np.isfinite(zero_point)):
            raise InvalidQuantizerError("zero point contains NaN or infinity", node.name)
    if checked is not None:
        checked.add(key)


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


def analyse_node(node: gs.Node, checked: _Checked | None = None) -> Quantizer:
    """Resolve one quantizer's parameters, refusing invalid or dynamic ones (``checked``:
    the parameter checks this ``analyse`` call already passed)."""
    if not node.inputs or node.inputs[0] is None:
        raise InvalidQuantizerError("has no data input", node.name)
    shape = _static_shape(node.inputs[0])
    rank = len(shape) if shape is not None else None
    if node.op == "BipolarQuant":
        runtime: list[str] = []
        scale = _constant_or_runtime(node, 1, "scale", runtime)
        if scale is not None:
            _check_scale(node, scale)
            _check_broadcast(node, shape, scale, "scale")
        return Quantizer(node, _role(node), scale, np.zeros((), np.float32), input_rank=rank, runtime=tuple(runtime))
    if node.op == "Quant":
        return _analyse_quant(node, shape, rank, checked)
    if node.op == "Trunc":
        return _analyse_trunc(node, shape, rank, checked)
    if node.op == "FloatQuant":
        return _analyse_float_quant(node, shape, rank)
    raise UnsupportedError(f"{node.op} is not supported yet", node.name)


def _analyse_quant(node: gs.Node, shape: tuple[int, ...] | None, rank: int | None, checked: _Checked | None) -> Quantizer:
    runtime: list[str] = []
    scale = _constant_or_runtime(node, 1, "scale", runtime)
    zero_point = _constant_or_runtime(node, 2, "zero point", runtime)
    raw_bits = _constant_or_runtime(node, 3, "bit width", runtime)
    bits = None if raw_bits is None else _scalar_bit_width(node, raw_bits, "bit width")
    _check_scale_and_zero_point(node, shape, scale, zero_point, checked)
    return Quantizer(
        node, _role(node), scale, zero_point, bits,
        signed=_flag(node, "signed", 1), narrow=_flag(node, "narrow", 0),
        rounding_mode=_rounding_mode(node, "ROUND"), input_rank=rank, runtime=tuple(runtime),
    )


def _flag(node: gs.Node, name: str, default: int) -> bool:
    value = node.attrs.get(name, default)
    if value not in (0, 1):
        raise InvalidQuantizerError(f"attribute {name} must be 0 or 1, got {value!r}", node.name)
    return bool(value)


def _whole(node: gs.Node, index: int, what: str, minimum: int | None) -> int:
    value = _constant(node, index, what)
    if value.size != 1:
        raise InvalidQuantizerError(f"{what} has shape {value.shape}; it must be a single value", node.name)
    number = float(value.reshape(()))
    if not number.is_integer() or (minimum is not None and number < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise InvalidQuantizerError(f"{what} is {number:g}; it must be an integer{bound}", node.name)
    return int(number)


def _analyse_float_quant(node: gs.Node, shape: tuple[int, ...] | None, rank: int | None) -> Quantizer:
    runtime: list[str] = []
    scale = _constant_or_runtime(node, 1, "scale", runtime)
    if scale is not None:
        _check_scale(node, scale)
        _check_broadcast(node, shape, scale, "scale")

    def whole(index: int, what: str, minimum: int | None) -> int | None:
        if not isinstance(_input(node, index, what), gs.Constant):
            runtime.append(what)
            return None
        return _whole(node, index, what, minimum)

    exponent_bits, mantissa_bits = whole(2, "exponent bit width", 1), whole(3, "mantissa bit width", 0)
    bias = whole(4, "exponent bias", None)
    max_val = _constant_or_runtime(node, 5, "max_val", runtime)
    if max_val is not None and (max_val.size != 1 or not np.isfinite(max_val).all() or float(max_val.reshape(())) <= 0):
        raise InvalidQuantizerError(f"max_val must be a single finite positive value, got {max_val.ravel()[:4].tolist()}", node.name)
    minifloat = Minifloat(
        exponent_bits=exponent_bits,
        mantissa_bits=mantissa_bits,
        bias=bias,
        max_val=None if max_val is None else float(max_val.reshape(())),
        has_inf=_flag(node, "has_inf", 0),
        has_nan=_flag(node, "has_nan", 0),
        has_subnormal=_flag(node, "has_subnormal", 1),
        saturation=_flag(node, "saturation", 1),
    )
    if not minifloat.saturation and not (minifloat.has_inf or minifloat.has_nan):
        raise InvalidQuantizerError("saturation=0 needs has_inf or has_nan to say what an overflow becomes", node.name)
    return Quantizer(
        node, _role(node), scale, np.zeros((), np.float32), None,
        rounding_mode=_rounding_mode(node, "ROUND"), input_rank=rank, minifloat=minifloat, runtime=tuple(runtime),
    )


def _analyse_trunc(node: gs.Node, shape: tuple[int, ...] | None, rank: int | None, checked: _Checked | None) -> Quantizer:
    version = 2 if len(node.inputs) == 6 else 1
    runtime: list[str] = []
    scale = _constant_or_runtime(node, 1, "scale", runtime)
    zero_point = _constant_or_runtime(node, 2, "zero point", runtime)
    # Version 2 never reads its input bit width (SPEC 1.3), so computing it at run time changes nothing.
    raw_in_bits = _constant_or_runtime(node, 3, "input bit width", runtime if version == 1 else [])
    in_bits = None if raw_in_bits is None else _scalar_bit_width(node, raw_in_bits, "input bit width")
    out_scale = _constant_or_runtime(node, 4, "output scale", runtime) if version == 2 else None
    raw_out_bits = _constant_or_runtime(node, 5 if version == 2 else 4, "output bit width", runtime)
    out_bits = None if raw_out_bits is None else _scalar_bit_width(node, raw_out_bits, "output bit width")
    _check_scale_and_zero_point(node, shape, scale, zero_point, checked)
    if out_scale is not None:
        _check_scale(node, out_scale, "output scale")
    return Quantizer(
        node, _role(node), scale, zero_point, out_bits,
        signed=_flag(node, "signed", 1), narrow=_flag(node, "narrow", 0),
        rounding_mode=_rounding_mode(node, None), input_rank=rank,  # required in both versions, as in QONNX
        trunc_version=version, in_bit_width=in_bits, out_scale=out_scale, runtime=tuple(runtime),
    )


def _uniform_or_list(values: np.ndarray) -> float | list[float]:
    flat = np.asarray(values, np.float64).reshape(-1)
    return float(flat[0]) if flat.size and np.all(flat == flat[0]) else [float(v) for v in flat]


def describe(q: Quantizer) -> dict[str, object]:
    """The quantizer's parameters as a user reads them (for reports and ``qlower inspect``).

    ``layout`` is "per-tensor", "per-channel" (with ``axis``) or "multi-axis" (scales or
    zero points varying along several axes: no single-axis Q/DQ expresses them).
    """
    if q.scale is None or q.zero_point is None:
        layout, axis = "run-time", None
    else:
        fits, axis = per_axis_layout([q.scale, q.zero_point], q.input_rank)
        layout = "multi-axis" if not fits else ("per-tensor" if axis is None else "per-channel")
    return {
        "tensor": q.output.name,
        "signed": q.signed,
        "narrow": q.narrow,
        "rounding_mode": None if q.op == "BipolarQuant" else q.rounding_mode,
        "layout": layout,
        "axis": axis,
        "zero_point": None if q.zero_point is None else _uniform_or_list(q.zero_point),
        "runtime": list(q.runtime),
        "minifloat": None if q.minifloat is None else q.minifloat.describe(),
    }


def analyse(graph: gs.Graph) -> list[Quantizer]:
    """The quantizer table, in graph order."""
    checked: _Checked = set()
    return [analyse_node(node, checked) for node in graph.nodes if is_qonnx_node(node)]


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
