"""Verification (SPEC section 4): the lowered model in ONNX Runtime against the QONNX reference.

The reference executor runs the original model; ONNX Runtime runs the lowered one at
``ORT_DISABLE_ALL`` and, unless told not to, at ``ORT_ENABLE_ALL``. When the lowered model
has a higher opset than the original, the reference runs the original upgraded to that
opset by the same version converter ``convert`` uses: ORT's float kernels for two opset
versions of one operator can differ in the last bit (AveragePool-11 and AveragePool-19
do), which is not something the lowering did. ``reference_opset`` pins the reference to
another opset (the fuzz tests use the original's to check the upgrade itself). Every graph
output is compared on every batch:

* ``qcdq`` at ``ORT_DISABLE_ALL``: bit-identical (max |diff| 0, NaN equal to NaN, same
  shape and dtype).
* ``qcdq`` at ``ORT_ENABLE_ALL`` and ``qop`` at both levels: the largest difference, in
  units of the output's quantization step (LSB), must not exceed ``tolerance_lsb``.

The LSB of an output is the step of the quantizer that produces it in the original,
found by walking back through operators that keep values on the grid (Reshape, Transpose,
MaxPool, Relu, Concat, ...). Per-channel steps are compared element by element while the
walk keeps the channel axis in place (Relu, MaxPool, Identity); after a reshaping operator
the finest step is used, which can only overstate a difference. FloatQuant's step is the
minifloat's spacing at each reference value.

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
error. No probe unit is smaller than that float unit either.

Results are compared per element in float64: NaN equals NaN, NaN against a number or
inf against a finite value is an infinite difference. A lowered model that ORT cannot
load or run is a failed verification carrying ORT's first message line.
"""

from __future__ import annotations

import math
import re
import zipfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import helper

from . import semantics
from .errors import ModelLoadError, UnsupportedError, VerificationError
from .ir import OP_ALIASES, ModelSource, default_opset, is_qonnx_node, load_model, normalize
from .reference import ReferenceExecutor, constant_values, first_line, is_constant_node, make_session, node_label

TARGETS = ("qcdq", "qop")
UNOPTIMIZED = "ORT_DISABLE_ALL"
OPTIMIZED = "ORT_ENABLE_ALL"

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
# Operators that pass values through unchanged, for drawing inputs backwards through them.
_VALUE_KEEPING = frozenset({"Reshape", "Flatten", "Transpose", "Identity", "Squeeze", "Unsqueeze", "Dropout"})
_AFFINE = frozenset({"Add", "Sub", "Mul", "Div"})
_DATATYPE = re.compile(r"^(U?INT)(\d+)$")


# ---------------------------------------------------------------------------------------
# Graph lookups shared by input generation and LSB detection


@dataclass
class _Graph:
    """Producer/consumer maps and constant values of the original model's graph."""

    graph: onnx.GraphProto
    constants: dict[str, np.ndarray]
    producer: dict[str, tuple[int, onnx.NodeProto]] = field(default_factory=dict)
    consumers: dict[str, list[tuple[int, onnx.NodeProto]]] = field(default_factory=dict)

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "_Graph":
        index = cls(model.graph, constant_values(model.graph))
        for i, node in enumerate(model.graph.node):
            if is_constant_node(node):
                continue
            for name in node.output:
                index.producer[name] = (i, node)
            for name in node.input:
                index.consumers.setdefault(name, []).append((i, node))
        return index

    def constant(self, node: onnx.NodeProto, position: int) -> np.ndarray | None:
        """Input ``position`` of ``node`` if it is a constant, else None."""
        if position >= len(node.input) or node.input[position] not in self.constants:
            return None
        return np.asarray(self.constants[node.input[position]])


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _quantizer_op(node: onnx.NodeProto) -> str | None:
    return OP_ALIASES.get(node.op_type, node.op_type) if is_qonnx_node(node) else None


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _declared_dims(value: onnx.ValueInfoProto) -> list[int | None] | None:
    """Static dims (None for symbolic/unknown), or None when the rank is unknown."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None for dim in tensor.shape.dim]


# ---------------------------------------------------------------------------------------
# Random inputs


Sampler = Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]


@dataclass(frozen=True)
class _Draw:
    """How to draw one input: a sampler in the first quantizer's input domain, then the
    inverse of the scalar affine ops (Add/Sub/Mul/Div by constants) that lie between."""

    sample: Sampler
    inverse: tuple[tuple[str, float, bool], ...] = ()  # (op, constant, input is the left operand)

    def __call__(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        values = self.sample(rng, shape)
        for op, constant, left in reversed(self.inverse):
            if op == "Add":
                values = values - constant
            elif op == "Sub":
                values = values + constant if left else constant - values
            elif op == "Mul":
                values = values / constant
            else:  # Div with the input as numerator (the only invertible form kept)
                values = values * constant
        return values


def _per_element(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A scale/zero point broadcast to ``shape``, or its first element when it does not fit."""
    array = np.asarray(value, dtype=np.float32)
    try:
        return np.broadcast_to(array, shape) if np.broadcast_shapes(array.shape, shape) == shape else array.flat[0]
    except ValueError:
        return array.flat[0]


def _grid_sampler(scale: np.ndarray, zero_point: np.ndarray, q_min: float, q_max: float) -> Sampler:
    """Uniform over [(q_min-zp)s - 2s, (q_max-zp)s + 2s]; a quarter exact ties, a quarter grid points."""

    def sample(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        s = _per_element(scale, shape)
        zp = _per_element(zero_point, shape)
        low, high = math.floor(q_min) - 2, math.ceil(q_max) + 2
        uniform = rng.uniform(low, high, shape).astype(np.float32) - zp
        k = rng.integers(low, high, shape).astype(np.float32)
        kind = rng.integers(0, 4, shape)
        # With an integer zero point (k + 0.5 - zp) is exact, so t = x/s + zp lands on k + 0.5
        # up to the rounding of the product and quotient.
        units = np.where(kind == 0, k + np.float32(0.5) - zp, np.where(kind == 1, k - zp, uniform))
        return (units.astype(np.float32) * s).astype(np.float32)

    return sample


def _minifloat_sampler(scale: np.ndarray, mantissa: int, bias: int, max_val: float) -> Sampler:
    """Log-uniform magnitudes over the format's exponents, with exact ties and grid points."""

    def sample(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        s = _per_element(scale, shape)
        top = math.floor(math.log2(max_val)) if max_val > 0 else 0
        exponent = rng.integers(1 - bias, top + 1, shape)
        k = rng.integers(2**mantissa, 2 ** (mantissa + 1), shape).astype(np.float64)
        kind = rng.integers(0, 4, shape)
        on_grid = np.ldexp(k + np.where(kind == 0, 0.5, 0.0), exponent - mantissa)
        spread = np.exp2(rng.uniform(-bias - mantissa - 1, math.log2(max_val) + 0.5 if max_val > 0 else 1, shape))
        magnitude = np.where(kind <= 1, on_grid, spread)
        sign = np.where(rng.integers(0, 2, shape) == 0, -1.0, 1.0)
        return (sign * magnitude).astype(np.float32) * s

    return sample


def _quantizer_draw(index: _Graph, node: onnx.NodeProto) -> Sampler | None:
    """A sampler for the input domain of a quantizer with constant parameters, else None."""
    op = _quantizer_op(node)
    scale = index.constant(node, 1)
    if scale is None:
        return None
    if op == "BipolarQuant":
        return _grid_sampler(scale, np.zeros(()), -1, 1)
    if op == "FloatQuant":
        params = [index.constant(node, i) for i in (3, 4, 5)]
        if any(p is None or p.size != 1 for p in params):
            return None
        mantissa, bias, max_val = (float(p.reshape(())) for p in params)  # type: ignore[union-attr]
        return _minifloat_sampler(scale, int(mantissa), int(bias), max_val)
    zero_point, bits = index.constant(node, 2), index.constant(node, 3)
    if zero_point is None or bits is None or bits.size != 1:
        return None
    bit_width = float(bits.reshape(()))
    signed = bool(_attr(node, "signed", 1))
    if signed and bit_width == 1:
        q_min, q_max = -1.0, 1.0
    else:
        q_min, q_max = (float(b) for b in semantics.float_range(signed, bool(_attr(node, "narrow", 0)), bit_width))
    if not (math.isfinite(q_min) and math.isfinite(q_max)):
        return None
    return _grid_sampler(scale, zero_point, q_min, q_max)


def _first_quantizer_draw(index: _Graph, name: str) -> _Draw | None:
    """Breadth-first from an input to the first quantizer that takes it as data (input 0).

    Scalar Add/Sub/Mul/Div by constants and value-keeping ops on the way are recorded so
    the drawn values can be mapped back to the model input; any other op on the path only
    means the quantizer's scale is used as is.
    """
    queue: deque[tuple[str, tuple[tuple[str, float, bool], ...] | None]] = deque([(name, ())])
    seen = {name}
    while queue:
        tensor, chain = queue.popleft()
        for _, node in index.consumers.get(tensor, []):
            if _quantizer_op(node) is not None:
                if node.input[0] != tensor:
                    continue
                sample = _quantizer_draw(index, node)
                if sample is None:
                    return None
                return _Draw(sample, chain or ())
            step = _inverse_step(index, node, tensor)
            next_chain = chain + (step,) if chain is not None and step is not None else None
            if chain is not None and node.op_type in _VALUE_KEEPING and node.input[0] == tensor:
                next_chain = chain
            for out in node.output:
                if out and out not in seen:
                    seen.add(out)
                    queue.append((out, next_chain))
    return None


def _inverse_step(index: _Graph, node: onnx.NodeProto, tensor: str) -> tuple[str, float, bool] | None:
    """``(op, c, left)`` when ``node`` is ``tensor (op) c`` or ``c (op) tensor`` with a scalar ``c``."""
    if node.op_type not in _AFFINE or len(node.input) != 2:
        return None
    left = node.input[0] == tensor
    other = index.constant(node, 1 if left else 0)
    if other is None or other.size != 1 or not np.issubdtype(other.dtype, np.number):
        return None
    constant = float(other.reshape(()))
    if (node.op_type == "Mul" and constant == 0) or (node.op_type == "Div" and (not left or constant == 0)):
        return None
    return node.op_type, constant, left


def _annotation_draw(datatype: str) -> _Draw | None:
    """Values of a QONNX datatype annotation (BIPOLAR, BINARY, TERNARY, INTn, UINTn)."""
    fixed = {"BIPOLAR": (-1, 1, 2), "BINARY": (0, 1, 1), "TERNARY": (-1, 1, 1)}
    if datatype in fixed:
        low, high, step = fixed[datatype]
        return _Draw(lambda rng, shape: (rng.integers(0, (high - low) // step + 1, shape) * step + low).astype(np.float64))
    match = _DATATYPE.match(datatype)
    if match is None:
        return None
    bits = int(match.group(2))
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if match.group(1) == "INT" else (0, 2**bits - 1)
    return _Draw(lambda rng, shape: rng.integers(low, high, shape, endpoint=True).astype(np.float64))


def _annotations(graph: onnx.GraphProto) -> dict[str, str]:
    found: dict[str, str] = {}
    for annotation in graph.quantization_annotation:
        for entry in annotation.quant_parameter_tensor_names:
            if entry.key == "finn_datatype":
                found[annotation.tensor_name] = entry.value.upper()
    return found


def _to_input_dtype(values: np.ndarray, elem_type: int) -> np.ndarray:
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    if dtype == np.bool_:
        return values > 0
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def make_inputs(model: onnx.ModelProto, batches: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``batches`` random feeds for the model's real inputs, deterministic for ``seed``.

    Shapes are the declared ones with symbolic or unknown dims set to 1. Values follow, in
    order of precedence: a QONNX ``finn_datatype`` annotation on the input (BIPOLAR gives
    {-1, +1}, BINARY {0, 1}, TERNARY, INTn and UINTn their integers); the first quantizer
    the input reaches (uniform over its range plus two steps either side, a quarter exact
    rounding ties ``(k + 0.5 - zp) * s`` and a quarter grid points, mapped back through
    scalar Add/Sub/Mul/Div on the way); otherwise standard normal.
    """
    index = _Graph.of(model)
    annotations = _annotations(model.graph)
    plans: list[tuple[str, tuple[int, ...], int, _Draw | None]] = []
    for value in _real_inputs(model):
        dims = _declared_dims(value)
        if dims is None:
            raise UnsupportedError(f"model input {value.name!r} has no declared shape; give verification inputs")
        shape = tuple(dim or 1 for dim in dims)
        datatype = annotations.get(value.name)
        draw = _annotation_draw(datatype) if datatype else None
        plans.append((value.name, shape, value.type.tensor_type.elem_type, draw or _first_quantizer_draw(index, value.name)))
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(batches):
        batch = {}
        for name, shape, elem_type, draw in plans:
            values = draw(rng, shape) if draw is not None else rng.standard_normal(shape)
            batch[name] = _to_input_dtype(np.asarray(values), elem_type)
        feeds.append(batch)
    return feeds


# ---------------------------------------------------------------------------------------
# User-supplied inputs


def load_inputs_npz(path: str | Path, model: ModelSource | None = None) -> list[dict[str, np.ndarray]]:
    """Read verification inputs from an ``.npz`` archive: one array per model input, by name.

    An array is one batch. When ``model`` is given, an array with one more dimension than
    the model input declares carries a leading batch-of-batches axis (``x[i]`` is batch
    ``i``); all inputs must then agree on it. The model also lets this check that every
    input has an array and no array names an unknown input. Without a model the file is one
    batch and :func:`verify` checks names and shapes. Raises ModelLoadError with a one-line
    reason for an unreadable file or mismatched arrays.
    """
    source = Path(path)
    unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile)
    try:
        loaded = np.load(source, allow_pickle=False)
    except unreadable as exc:
        raise ModelLoadError(f"{source}: not a readable .npz archive ({first_line(exc)})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ModelLoadError(f"{source}: a single .npy array; inputs need an .npz archive of arrays named by input")
    with loaded:
        try:
            arrays = {name: loaded[name] for name in loaded.files}
        except unreadable as exc:
            raise ModelLoadError(f"{source}: not a readable .npz archive ({first_line(exc)})") from None
    if not arrays:
        raise ModelLoadError(f"{source}: the archive holds no arrays")
    if model is None:
        return [arrays]
    inputs = _real_inputs(model if isinstance(model, onnx.ModelProto) else load_model(model))
    names = [value.name for value in inputs]
    missing = [name for name in names if name not in arrays]
    if missing:
        raise ModelLoadError(f"{source}: no array for model input {missing[0]!r} (the model's inputs: {', '.join(names)})")
    unknown = sorted(set(arrays) - set(names))
    if unknown:
        raise ModelLoadError(f"{source}: array {unknown[0]!r} is not a model input (the model's inputs: {', '.join(names)})")
    batched: dict[str, bool] = {}
    for value in inputs:
        dims = _declared_dims(value)
        array = arrays[value.name]
        if dims is None:
            continue
        if array.ndim not in (len(dims), len(dims) + 1):
            raise ModelLoadError(
                f"{source}: array {value.name!r} has shape {list(array.shape)}; the input has rank {len(dims)}"
                f" (or {len(dims) + 1} with a leading batch-of-batches axis)"
            )
        batched[value.name] = array.ndim == len(dims) + 1
    if len(set(batched.values())) > 1:
        raise ModelLoadError(f"{source}: some arrays have a leading batch-of-batches axis and some do not")
    if not any(batched.values()):
        return [arrays]
    counts = {arrays[name].shape[0] for name in names}
    if len(counts) != 1:
        raise ModelLoadError(f"{source}: arrays disagree on the number of batches ({sorted(counts)})")
    return [{name: arrays[name][i] for name in names} for i in range(counts.pop())]


def _conform_inputs(model: onnx.ModelProto, inputs: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Check user feeds against the model's inputs; cast to the declared dtype when lossless."""
    if not inputs:
        raise ModelLoadError("no verification inputs given (an empty list of batches)")
    conformed = []
    for number, feeds in enumerate(inputs):
        batch = {}
        for value in _real_inputs(model):
            if value.name not in feeds:
                raise ModelLoadError(f"verification batch {number} has no array for model input {value.name!r}")
            array = np.asarray(feeds[value.name])
            dims = _declared_dims(value)
            if dims is not None and (
                array.ndim != len(dims) or any(d is not None and d != n for d, n in zip(dims, array.shape))
            ):
                wanted = ["?" if d is None else d for d in dims]
                raise ModelLoadError(
                    f"verification batch {number}: input {value.name!r} has shape {list(array.shape)}, the model wants {wanted}"
                )
            dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            cast = array.astype(dtype)
            floats = array.dtype.kind == "f" and cast.dtype.kind == "f"
            if cast.dtype != array.dtype and not np.array_equal(cast.astype(array.dtype), array, equal_nan=floats):
                raise ModelLoadError(
                    f"verification batch {number}: input {value.name!r} is {array.dtype} and does not convert exactly to {dtype}"
                )
            batch[value.name] = cast
        conformed.append(batch)
    return conformed


# ---------------------------------------------------------------------------------------
# The unit each output is measured in

StepFunction = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class _Unit:
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


def _output_grid(index: _Graph, node: onnx.NodeProto, label: str, elementwise: bool) -> _Unit | None:
    """The grid a quantizer's output lies on, when its parameters are constants."""
    op = _quantizer_op(node)
    if op == "FloatQuant":
        scale, mantissa, bias = (index.constant(node, i) for i in (1, 3, 4))
        if scale is None or mantissa is None or bias is None or mantissa.size != 1 or bias.size != 1:
            return None
        m, b = int(mantissa.reshape(())), int(bias.reshape(()))
        source = f"FloatQuant {label!r}: minifloat spacing (mantissa {m}, bias {b}), {_scale_text(scale)}"
        return _Unit("grid", source, _minifloat_step(scale, m, b, elementwise))
    # Trunc v2 leaves its output on out_scale; Trunc v1 stays in units of the input scale.
    scale = index.constant(node, 4 if op == "Trunc" and len(node.input) == 6 else 1)
    if scale is None:
        return None
    return _Unit("grid", f"{op} {label!r}: {_scale_text(scale)}", _step_function(scale, elementwise))


def _finest(units: list[_Unit], why: str) -> _Unit:
    def step(reference: np.ndarray) -> np.ndarray:
        return np.asarray(min(float(np.min(unit.step(reference))) for unit in units))  # type: ignore[misc]

    return _Unit("grid", f"finest of {why}: " + "; ".join(unit.source for unit in units), step)


def _grid_of(index: _Graph, name: str, elementwise: bool = True) -> _Unit | None:
    """Walk back from ``name`` through grid-keeping ops to the quantizer that set its grid."""
    while name in index.producer:
        position, node = index.producer[name]
        if _quantizer_op(node) is not None:
            return _output_grid(index, node, node_label(node, position), elementwise)
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


def _frontier(index: _Graph, name: str) -> list[tuple[str, str, StepFunction]]:
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
        if _quantizer_op(node) is not None:
            label = node_label(node, position)
            grid = _output_grid(index, node, label, True)
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


def _output_unit(index: _Graph, name: str) -> _Unit:
    grid = _grid_of(index, name)
    if grid is not None:
        return grid
    frontier = _frontier(index, name)
    if frontier:
        labels = ", ".join(repr(label) for _, label, _ in frontier)
        how = "random signs" if len(frontier) == 1 else "random signs; together and one at a time"
        source = f"no grid on this output; unit = its largest change when {labels} move by one step ({how})"
        return _Unit("probe", source, frontier=tuple((tensor, step) for tensor, _, step in frontier))
    return _Unit("float", "no quantizer on or upstream of this output; unit = 2^-16 of its largest magnitude", _float_unit)


def _probe(
    reference: ReferenceExecutor,
    feeds: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    units: dict[str, _Unit],
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Per probed output, the largest change when its frontier moves by one step with random
    signs: every frontier tensor at once, and each alone (moving all at once can cancel)."""
    steps = {tensor: step for unit in units.values() for tensor, step in unit.frontier}

    def nudge(step: StepFunction) -> Callable[[np.ndarray], np.ndarray]:
        def move(values: np.ndarray) -> np.ndarray:
            signs = rng.choice(np.array([-1.0, 1.0]), size=values.shape)
            return (values + signs * step(values)).astype(values.dtype)

        return move

    runs = [list(steps)] + ([[tensor] for tensor in steps] if len(steps) > 1 else [])
    largest: dict[str, float] = {name: 0.0 for name, unit in units.items() if unit.kind == "probe"}
    for moved_tensors in runs:
        moved = reference.run(feeds, perturb={tensor: nudge(steps[tensor]) for tensor in moved_tensors})
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


# ---------------------------------------------------------------------------------------
# Comparison and the report


@dataclass
class OutputRecord:
    """How one graph output compared at one ORT optimization level, over all batches.

    ``max_lsb_diff`` is in steps of the output's own grid (None when it has none);
    ``max_unit_diff`` is in the unit the rule used (the LSB, the probe or float32 ulps, as
    ``lsb_source`` says); ``rule`` is what the output was held to; ``note`` explains a
    shape or dtype mismatch.
    """

    name: str
    level: str
    max_abs_diff: float
    max_lsb_diff: float | None
    max_unit_diff: float
    differing_share: float
    lsb_source: str
    rule: str
    passed: bool
    note: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {key: _json_number(value) for key, value in self.__dict__.items()}


def _json_number(value: object) -> object:
    """Non-finite floats as strings ("inf", "nan"): strict JSON has no Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


@dataclass
class VerificationReport:
    """The verdict: per-output records, the settings used, and one-line failure reasons."""

    target: str
    tolerance_lsb: float
    batches: int
    seed: int
    outputs: list[OutputRecord] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, object]:
        return {
            "passed": self.passed,
            "target": self.target,
            "tolerance_lsb": self.tolerance_lsb,
            "batches": self.batches,
            "seed": self.seed,
            "outputs": [record.to_dict() for record in self.outputs],
            "failures": list(self.failures),
        }

    def raise_if_failed(self) -> None:
        """Raise VerificationError with the first failure line when verification failed."""
        if self.failures:
            raise VerificationError(self.failures[0])


@dataclass
class _Tally:
    """Running comparison of one output at one level."""

    max_abs: float = 0.0
    max_units: float = 0.0
    differing: int = 0
    total: int = 0
    note: str | None = None

    def add(self, reference: np.ndarray, got: np.ndarray, step: np.ndarray | None, grid: bool) -> None:
        """Fold in one batch; ``step`` (broadcastable to the output) converts |diff| to units.

        On a ``grid`` both values are whole steps apart up to their float32 rounding, so a
        difference within that rounding of a whole number of steps counts as exactly that
        number (a one-LSB flip is 1, not 1.0000001).
        """
        if got.shape != reference.shape or got.dtype != reference.dtype:
            self.note = self.note or (
                f"got {got.dtype}{list(got.shape)}, the reference is {reference.dtype}{list(reference.shape)}"
            )
            self.max_abs = self.max_units = math.inf
            self.differing += reference.size
            self.total += reference.size
            return
        self.total += reference.size
        if reference.size == 0:
            return
        if reference.dtype.kind not in "biuf":  # strings: equal or not
            differing = int(np.count_nonzero(reference != got))
            self.differing += differing
            if differing:
                self.max_abs = self.max_units = math.inf
            return
        ref, new = reference.astype(np.float64), got.astype(np.float64)
        both_nan = np.isnan(ref) & np.isnan(new)
        same = (ref == new) | both_nan
        with np.errstate(invalid="ignore"):
            diff = np.where(same, 0.0, np.abs(ref - new))
        diff = np.where(np.isnan(diff), np.inf, diff)  # NaN against a number, or inf - inf
        self.differing += int(np.count_nonzero(~same))
        self.max_abs = max(self.max_abs, float(diff.max()))
        if step is None:
            return
        with np.errstate(divide="ignore", invalid="ignore"):
            units = np.where(diff == 0, 0.0, diff / step)
            if grid and reference.dtype.kind == "f":
                rounding = (np.spacing(np.abs(reference)) + np.spacing(np.abs(got))).astype(np.float64) / step
                whole = np.rint(units)
                units = np.where(np.abs(units - whole) <= rounding, whole, units)
        self.max_units = max(self.max_units, float(np.nan_to_num(units, nan=np.inf, posinf=np.inf).max()))


def _record(name: str, level: str, tally: _Tally, unit: _Unit, exact: bool, tolerance: float) -> OutputRecord:
    if exact:
        rule, passed = "bit-identical", tally.differing == 0 and tally.note is None
    elif unit.kind == "grid":
        rule, passed = f"<= {tolerance:g} LSB", tally.max_units <= tolerance and tally.note is None
    else:
        rule, passed = f"<= {tolerance:g} x unit", tally.max_units <= tolerance and tally.note is None
    return OutputRecord(
        name=name,
        level=level,
        max_abs_diff=tally.max_abs,
        max_lsb_diff=tally.max_units if unit.kind == "grid" else None,
        max_unit_diff=tally.max_units,
        differing_share=tally.differing / tally.total if tally.total else 0.0,
        lsb_source=unit.source,
        rule=rule,
        passed=passed,
        note=tally.note,
    )


def _failure_line(record: OutputRecord, tally: _Tally) -> str:
    """One line naming the output and level, with what differed."""
    where = f"output {record.name!r} at {record.level}"
    if record.note:
        return f"{where}: {record.note}"
    amount = f"{tally.differing} of {tally.total} elements differ (max |diff| {record.max_abs_diff:g}"
    amount += f", {record.max_lsb_diff:g} LSB)" if record.max_lsb_diff is not None else f", {record.max_unit_diff:g} x unit)"
    if record.rule == "bit-identical":
        return f"{where}: {amount}; must be bit-identical to the reference"
    return f"{where}: {amount}; exceeds the tolerance {record.rule}"


def verify(
    original: ModelSource,
    lowered: ModelSource,
    *,
    target: str = "qcdq",
    inputs: Sequence[dict[str, np.ndarray]] | None = None,
    batches: int = 16,
    seed: int = 0,
    tolerance_lsb: float = 1.0,
    check_optimized: bool = True,
    reference_opset: int | None = None,
) -> VerificationReport:
    """Compare ``lowered`` (in ONNX Runtime) with the QONNX reference running ``original``.

    ``inputs`` (a list of feeds, one per batch) replaces the ``batches`` random feeds drawn
    by :func:`make_inputs` with ``seed``. ``reference_opset`` (default: the lowered model's
    opset) is the opset the reference runs the original's standard ops at; the original is
    never run below its own. The rules are in the module docstring. A lowered
    model that ORT cannot load or run is a failed verification carrying ORT's message, not
    an exception; problems with the original model or the inputs raise QlowerError.
    """
    if target not in TARGETS:
        raise UnsupportedError(f"unknown verification target {target!r}; choose one of {', '.join(TARGETS)}")
    original_model = load_model(original)
    lowered_model = load_model(lowered)
    wanted_opset = default_opset(lowered_model) if reference_opset is None else reference_opset
    if wanted_opset > default_opset(original_model):
        reference = ReferenceExecutor(normalize(original_model, wanted_opset))
    else:
        reference = ReferenceExecutor(original_model)
    feeds_list = _conform_inputs(original_model, inputs) if inputs is not None else make_inputs(original_model, batches, seed)
    report = VerificationReport(target, tolerance_lsb, len(feeds_list), seed)
    index = _Graph.of(original_model)
    units = {name: _output_unit(index, name) for name in reference.output_names}

    levels = [UNOPTIMIZED] + ([OPTIMIZED] if check_optimized else [])
    serialized = lowered_model.SerializeToString()
    sessions = {}
    for level in levels:
        try:
            sessions[level] = make_session(serialized, optimized=level == OPTIMIZED)
        except Exception as exc:  # ORT raises its own exception types
            report.failures.append(f"lowered model at {level}: ONNX Runtime cannot load it: {first_line(exc)}")
    if not sessions:
        return report
    some_session = next(iter(sessions.values()))
    lowered_inputs = [meta.name for meta in some_session.get_inputs()]
    lowered_outputs = {meta.name for meta in some_session.get_outputs()}
    extra = [name for name in lowered_inputs if name not in reference.input_names]
    if extra:
        report.failures.append(f"lowered model: it needs input {extra[0]!r}, which the original does not have")
        return report
    compared = [name for name in reference.output_names if name in lowered_outputs]
    report.failures.extend(
        f"output {name!r}: missing from the lowered model" for name in reference.output_names if name not in lowered_outputs
    )

    tallies = {(name, level): _Tally() for level in sessions for name in compared}
    # The probe (one extra reference run) only matters where a tolerance applies.
    probing = any(unit.kind == "probe" for unit in units.values()) and (target == "qop" or OPTIMIZED in sessions)
    for number, feeds in enumerate(feeds_list):
        expected = reference.run(feeds)
        steps: dict[str, np.ndarray | None] = {}
        if probing:
            steps.update(_probe(reference, feeds, expected, units, np.random.default_rng([seed, number])))
        for name in compared:
            unit, value = units[name], expected[name]
            if unit.step is not None and value.dtype.kind in "biuf":
                steps[name] = unit.step(value.astype(np.float64))
        for level, session in list(sessions.items()):
            try:
                results = session.run(compared, {name: feeds[name] for name in lowered_inputs})
            except Exception as exc:  # ORT raises its own exception types
                report.failures.append(f"lowered model at {level}: ONNX Runtime failed to run it: {first_line(exc)}")
                del sessions[level]
                continue
            for name, got in zip(compared, results):
                tallies[(name, level)].add(expected[name], np.asarray(got), steps.get(name), units[name].kind == "grid")

    for level in levels:
        if level not in sessions:
            continue
        exact = target == "qcdq" and level == UNOPTIMIZED
        for name in compared:
            tally = tallies[(name, level)]
            record = _record(name, level, tally, units[name], exact, tolerance_lsb)
            report.outputs.append(record)
            if not record.passed:
                report.failures.append(_failure_line(record, tally))
    return report
