"""Verification inputs: random feeds drawn on the quantizers' grids, or the user's own."""

from __future__ import annotations

import math
import re
import zipfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import helper

from .. import semantics
from ..errors import ModelLoadError, UnsupportedError
from ..ir import ModelSource, load_model
from ..reference import first_line
from .graph import GraphIndex, quantizer_op

# Operators that pass values through unchanged, for drawing inputs backwards through them.
_VALUE_KEEPING = frozenset({"Reshape", "Flatten", "Transpose", "Identity", "Squeeze", "Unsqueeze", "Dropout"})
_AFFINE = frozenset({"Add", "Sub", "Mul", "Div"})
_DATATYPE = re.compile(r"^(U?INT)(\d+)$")


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default



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
        # A max below the smallest normal leaves no normal binade under it: draw from that one
        # binade still (values past max exercise the overflow rule).
        top = max(math.floor(math.log2(max_val)) if max_val > 0 else 0, 1 - bias)
        exponent = rng.integers(1 - bias, top + 1, shape)
        k = rng.integers(2**mantissa, 2 ** (mantissa + 1), shape).astype(np.float64)
        kind = rng.integers(0, 4, shape)
        on_grid = np.ldexp(k + np.where(kind == 0, 0.5, 0.0), exponent - mantissa)
        spread = np.exp2(rng.uniform(-bias - mantissa - 1, math.log2(max_val) + 0.5 if max_val > 0 else 1, shape))
        magnitude = np.where(kind <= 1, on_grid, spread)
        sign = np.where(rng.integers(0, 2, shape) == 0, -1.0, 1.0)
        return (sign * magnitude).astype(np.float32) * s

    return sample


def _quantizer_draw(index: GraphIndex, node: onnx.NodeProto) -> Sampler | None:
    """A sampler for the input domain of a quantizer with constant parameters, else None."""
    op = quantizer_op(node)
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


def _first_quantizer_draw(index: GraphIndex, name: str) -> _Draw | None:
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
            if quantizer_op(node) is not None:
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


def _inverse_step(index: GraphIndex, node: onnx.NodeProto, tensor: str) -> tuple[str, float, bool] | None:
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


def make_inputs(model: onnx.ModelProto, batches: int, seed: int, index: GraphIndex | None = None) -> list[dict[str, np.ndarray]]:
    """``batches`` random feeds for the model's real inputs, deterministic for ``seed``.

    Shapes are the declared ones with symbolic or unknown dims set to 1. Values follow, in
    order of precedence: a QONNX ``finn_datatype`` annotation on the input (BIPOLAR gives
    {-1, +1}, BINARY {0, 1}, TERNARY, INTn and UINTn their integers); the first quantizer
    the input reaches (uniform over its range plus two steps either side, a quarter exact
    rounding ties ``(k + 0.5 - zp) * s`` and a quarter grid points, mapped back through
    scalar Add/Sub/Mul/Div on the way); otherwise standard normal. ``index``: the model's
    :class:`GraphIndex`, when the caller has built it already.
    """
    index = index or GraphIndex.of(model)
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


def conform_inputs(model: onnx.ModelProto, inputs: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
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
