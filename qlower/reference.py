"""The QONNX reference executor: ground truth for verification (SPEC section 4).

It runs the *original* model as written, at its own opset, with the QONNX quantizers
evaluated in numpy by :mod:`qlower.semantics` and every standard node run by ONNX Runtime
on the CPU with graph optimizations disabled. Running standard nodes in ORT (not a second
implementation) matters: the lowered model runs in ORT too, so any difference the verifier
reports comes from the lowering, not from two float kernels summing in different orders.

Standard nodes are grouped: the executor schedules the graph so that all QONNX nodes that
are ready run first, then every standard node that is ready (or becomes ready inside the
group) joins one ORT model. Inside a group a tensor stays exactly what it was in the
original graph: original initializers and ``Constant`` outputs are initializers, values
computed at run time are graph inputs or internal edges, so ORT sees each node as it
would in the original model. Each group's session is built once, in ``__init__``.
"""

from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from . import large_models, output, semantics
from .errors import InvalidModelError, InvalidQuantizerError, QlowerError, UnsupportedError
from .ir import OP_ALIASES, default_opset, is_qonnx_node, release_pages, tensor_array
from .ort_sessions import make_session

if TYPE_CHECKING:  # imported where a session is made: a conversion that runs none does not pay for it
    import onnxruntime as ort

STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})
_ORT_TYPES = {
    f"tensor({onnx.TensorProto.DataType.Name(code).lower()})": code
    for code in onnx.TensorProto.DataType.values()
    if code != onnx.TensorProto.UNDEFINED
}


def first_line(error: BaseException | str) -> str:
    """The first non-empty line of an error message (ORT messages run to many lines)."""
    text = str(error).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__


def node_label(node: onnx.NodeProto, index: int) -> str:
    """How errors name a node: its name, or ``OpType#index`` when it has none."""
    return node.name or f"{node.op_type}#{index}"


def _constant_node_value(node: onnx.NodeProto, label: str) -> np.ndarray:
    """The value of a ``Constant`` node, from whichever ``value*`` attribute it carries."""
    if len(node.attribute) != 1:
        raise InvalidModelError("a Constant node needs exactly one value attribute", label)
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    if attr.name == "value_float":
        return np.array(attr.f, dtype=np.float32)
    if attr.name == "value_floats":
        return np.array(list(attr.floats), dtype=np.float32)
    if attr.name == "value_int":
        return np.array(attr.i, dtype=np.int64)
    if attr.name == "value_ints":
        return np.array(list(attr.ints), dtype=np.int64)
    if attr.name == "value_string":
        return np.array(attr.s.decode(), dtype=object)
    if attr.name == "value_strings":
        return np.array([s.decode() for s in attr.strings], dtype=object)
    raise UnsupportedError(f"Constant with attribute {attr.name!r} is not supported", label)


def is_constant_node(node: onnx.NodeProto) -> bool:
    """A default-domain ``Constant`` node (its output is a constant, as ORT treats it)."""
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx")


def constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every constant tensor of a graph: initializers and ``Constant`` node outputs."""
    values = {init.name: tensor_array(init) for init in graph.initializer}  # memory maps of external data
    for index, node in enumerate(graph.node):
        if is_constant_node(node):
            values[node.output[0]] = _constant_node_value(node, node_label(node, index))
    return values


# ---------------------------------------------------------------------------------------
# One QONNX operator


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _flag(attrs: Mapping[str, object], name: str, default: int) -> bool:
    value = attrs.get(name, default)
    if not isinstance(value, (int, np.integer)) or value not in (0, 1):
        raise InvalidQuantizerError(f"attribute {name} must be 0 or 1, got {_text(value)!r}")
    return bool(value)


def _rounding_mode(attrs: Mapping[str, object], op_type: str, default: str | None) -> str:
    if "rounding_mode" not in attrs:
        if default is None:
            raise InvalidQuantizerError(f"{op_type} needs a rounding_mode attribute")
        return default
    try:
        return semantics.normalize_rounding_mode(_text(attrs["rounding_mode"]))
    except ValueError as exc:
        raise InvalidQuantizerError(str(exc)) from None


def _scalar(value: np.ndarray, what: str) -> float:
    array = np.asarray(value)
    if array.size != 1:
        raise InvalidQuantizerError(f"{what} must be a single value, got shape {list(array.shape)}")
    return float(array.reshape(()))


def _bit_width(value: np.ndarray, what: str) -> float:
    bits = _scalar(value, what)
    if not np.isfinite(bits) or bits < 1:
        raise InvalidQuantizerError(f"{what} must be a finite number >= 1, got {bits}")
    return bits


def _integer(value: np.ndarray, what: str, minimum: int | None = None) -> int:
    number = _scalar(value, what)
    if not number.is_integer() or (minimum is not None and number < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise InvalidQuantizerError(f"{what} must be an integer{bound}, got {number}")
    return int(number)


def _expect_inputs(op_type: str, inputs: Sequence[np.ndarray], counts: tuple[int, ...]) -> None:
    if len(inputs) not in counts:
        wanted = " or ".join(str(c) for c in counts)
        raise InvalidQuantizerError(f"{op_type} takes {wanted} inputs, got {len(inputs)}")


def evaluate_qonnx_node(op_type: str, inputs: Sequence[np.ndarray], attrs: Mapping[str, object]) -> np.ndarray:
    """Evaluate one QONNX operator (SPEC section 1) on numpy inputs; returns float32.

    ``op_type`` is ``Quant`` (or its alias ``IntQuant``), ``BipolarQuant``, ``Trunc`` (five
    inputs: version 1, six: version 2) or ``FloatQuant``. ``attrs`` maps attribute names to
    Python values; strings may be ``bytes`` or ``str``, rounding modes any case. Pure: the
    inputs are not modified. Raises InvalidQuantizerError for malformed parameters and
    UnsupportedError for an unknown op; the messages do not name a node (callers add it).
    """
    with np.errstate(all="ignore"):  # zero scales and overflow are defined IEEE results here
        return prepare_qonnx_node(op_type, inputs, attrs)(inputs[0])


def prepare_qonnx_node(
    op_type: str, inputs: Sequence[np.ndarray], attrs: Mapping[str, object]
) -> Callable[[np.ndarray], np.ndarray]:
    """:func:`evaluate_qonnx_node` with every input but the first (``x``, not read here)
    fixed: the attributes and parameters are checked and parsed once, and the function
    returned maps ``x`` to the node's value, bit for bit what ``evaluate_qonnx_node`` gives
    (the reference runs each quantizer once per batch). Raises what ``evaluate_qonnx_node``
    raises for the same attributes and parameters, in the same order. Call it, and what it
    returns, under ``np.errstate(all="ignore")``.
    """
    op = OP_ALIASES.get(op_type, op_type)
    if op == "Quant":
        _expect_inputs(op, inputs, (4,))
        _, scale, zero_point, bit_width = inputs
        return semantics.quantizer(
            scale,
            zero_point,
            _bit_width(bit_width, "Quant bit width"),
            signed=_flag(attrs, "signed", 1),
            narrow=_flag(attrs, "narrow", 0),
            rounding_mode=_rounding_mode(attrs, op, "ROUND"),
        )
    if op == "BipolarQuant":
        _expect_inputs(op, inputs, (2,))
        bipolar_scale = inputs[1]
        return lambda x: semantics.bipolar_quant(x, bipolar_scale)
    if op == "Trunc":
        _expect_inputs(op, inputs, (5, 6))
        mode = _rounding_mode(attrs, op, None)
        if len(inputs) == 5:
            _, scale, zero_point, in_bits, out_bits = inputs
            in_width = _bit_width(in_bits, "Trunc input bit width")
            out_width = _bit_width(out_bits, "Trunc output bit width")
            return lambda x: semantics.trunc_v1(x, scale, zero_point, in_width, out_width, mode)
        _, scale, zero_point, _in_bits, out_scale, out_bits = inputs
        out_width = _bit_width(out_bits, "Trunc output bit width")
        signed, narrow = _flag(attrs, "signed", 1), _flag(attrs, "narrow", 0)
        return lambda x: semantics.trunc_v2(x, scale, zero_point, out_scale, out_width, signed, narrow, mode)
    if op == "FloatQuant":
        _expect_inputs(op, inputs, (6,))
        _, scale, exponent_bits, mantissa_bits, exponent_bias, max_val = inputs
        exponent_width = _integer(exponent_bits, "FloatQuant exponent bit width", 1)
        mantissa_width = _integer(mantissa_bits, "FloatQuant mantissa bit width", 0)
        bias = _integer(exponent_bias, "FloatQuant exponent bias")
        largest = _scalar(max_val, "FloatQuant max_val")
        has_inf, has_nan = _flag(attrs, "has_inf", 0), _flag(attrs, "has_nan", 0)
        saturation = _flag(attrs, "saturation", 1)
        float_mode = _rounding_mode(attrs, op, "ROUND")

        def float_quantized(x: np.ndarray) -> np.ndarray:
            try:
                return semantics.float_quant(
                    x, scale, exponent_width, mantissa_width, bias, largest,
                    has_inf=has_inf, has_nan=has_nan, saturation=saturation, rounding_mode=float_mode,
                )
            except ValueError as exc:  # saturation=0 without has_inf / has_nan
                raise InvalidQuantizerError(str(exc)) from None

        return float_quantized
    raise UnsupportedError(f"{op_type} is not a QONNX quantizer qlower knows")


# ---------------------------------------------------------------------------------------
# The whole model


def identical(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and bits (so -0.0 differs from 0.0 and NaN can equal NaN); other
    dtypes (strings, objects) count as different, which only costs a recomputation."""
    if a is b:
        return True
    if a.dtype != b.dtype or a.shape != b.shape or a.dtype.kind not in "biufc" or a.dtype.itemsize not in (1, 2, 4, 8):
        return False
    bits = np.dtype(f"u{a.dtype.itemsize}")
    return bool(np.array_equal(a.view(bits), b.view(bits)))


def all_identical(values: Sequence[np.ndarray], others: Sequence[np.ndarray]) -> bool:
    """:func:`identical` for every pair; small pairs of the same shape and dtype are compared
    together, as one byte string each side (the verifier's taps: thousands of small arrays)."""
    small: list[tuple[np.ndarray, np.ndarray]] = []
    for a, b in zip(values, others, strict=True):
        if a.dtype != b.dtype or a.shape != b.shape or a.size >= _JOINED_ELEMENTS or a.dtype.kind not in "biufc":
            if not identical(a, b):
                return False
        else:
            small.append((a, b))
    return b"".join(a.tobytes() for a, _ in small) == b"".join(b.tobytes() for _, b in small)


# Arrays this large are compared on their own by all_identical.
_JOINED_ELEMENTS = 1 << 16
# What a numpy array costs besides its data (the object and its shape and strides).
_ARRAY_HEADER_BYTES = 128


def _evaluate_in_slices(op_type: str, inputs: Sequence[np.ndarray], attrs: Mapping[str, object]) -> np.ndarray | None:
    """A QONNX op on a large constant, ``semantics.SLICE_ELEMENTS`` at a time along its first
    axis (every QONNX op is elementwise, so the values are those computed whole, without
    temporaries the size of a weight); None where the input is small or its parameters
    would broadcast it to a larger shape."""
    x = np.asarray(inputs[0])
    if x.ndim == 0 or x.size <= semantics.SLICE_ELEMENTS:
        return None
    if any(np.broadcast_shapes(x.shape, np.shape(param)) != x.shape for param in inputs[1:]):
        return None
    # Parameters of one element stay whole (bit widths must be single values); the others
    # are broadcast to the input (views) and sliced with it.
    params = [np.asarray(p) if np.size(p) == 1 else np.broadcast_to(p, x.shape) for p in inputs[1:]]
    rows = max(1, semantics.SLICE_ELEMENTS // max(1, x[0].size))
    value = np.empty(x.shape, np.float32)
    for start in range(0, x.shape[0], rows):
        part = slice(start, start + rows)
        sliced = [p if p.size == 1 else p[part] for p in params]
        value[part] = evaluate_qonnx_node(op_type, [x[part], *sliced], attrs)
        release_pages(x[part])
    return value


@dataclass
class _QonnxStep:
    label: str
    op_type: str
    inputs: tuple[str, ...]
    output: str
    attrs: dict[str, object]
    # A quantizer of constants (a weight or bias) gives the same value on every run: it is
    # evaluated on the first run and kept, so each run costs one evaluation per activation.
    constant: bool = False
    value: np.ndarray | None = None
    # A quantizer whose parameters (every input but x) are constants is prepared on its
    # first run (attributes and parameters parsed once: prepare_qonnx_node) and reused.
    fixed_parameters: bool = False
    prepared: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.output,)

    def run(self, env: dict[str, np.ndarray]) -> None:
        """Compute the output into ``env``; call under ``np.errstate(all="ignore")``."""
        if self.value is not None:
            env[self.output] = self.value
            return
        try:
            if self.prepared is not None:
                env[self.output] = self.prepared(env[self.inputs[0]])
                return
            inputs = [env[name] for name in self.inputs]
            value = _evaluate_in_slices(self.op_type, inputs, self.attrs) if self.constant else None
            if value is None:
                evaluate = prepare_qonnx_node(self.op_type, inputs, self.attrs)
                value = evaluate(inputs[0])
                if self.fixed_parameters and not self.constant:
                    self.prepared = evaluate
        except QlowerError as exc:
            raise type(exc)(exc.reason, exc.node or self.label) from None
        except ValueError as exc:  # numpy: operands that do not broadcast
            raise InvalidQuantizerError(first_line(exc), self.label) from None
        if self.constant:
            value.flags.writeable = False  # shared by every run
            self.value = value
            for name in self.inputs:  # a weight memory-mapped from external data is not read again
                release_pages(env[name])
        env[self.output] = value


@dataclass(frozen=True)
class _OrtStep:
    labels: tuple[str, ...]
    session: ort.InferenceSession
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    feed_names: tuple[str, ...]  # the names inputs and outputs have in the session's model
    fetch_names: list[str]

    def run(self, env: dict[str, np.ndarray]) -> None:
        try:
            results = self.session.run(self.fetch_names, {feed: env[name] for feed, name in zip(self.feed_names, self.inputs)})
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidArgument, ...)
            raise InvalidModelError(
                f"ONNX Runtime failed on the original model's nodes {', '.join(self.labels[:3])}"
                f"{', ...' if len(self.labels) > 3 else ''}: {first_line(exc)}"
            ) from None
        env.update(zip(self.outputs, results))


class ReferenceExecutor:
    """Run an original QONNX model: numpy for quantizers, ORT (unoptimized) for the rest.

    Takes the model as ``ir.load_model`` returns it: any opset from 9 (never upgraded), any
    QONNX domain spelling, initializers possibly listed as inputs, Constant nodes, symbolic
    dims, no shape information needed. Nodes not needed for a graph output are skipped.
    Raises UnsupportedError for control flow and unknown domains, InvalidModelError for a
    graph that cannot be scheduled.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self._constants = constant_values(graph)
        self._memory_bound = large_models.memory_bound(0, sum(value.nbytes for value in self._constants.values()))
        self._input_names = tuple(value.name for value in graph.input if value.name not in self._constants)
        self._output_names = tuple(value.name for value in graph.output)
        value_types: dict[str, int] = {}
        for value in graph.input:
            if value.name in self._constants:
                continue
            if not value.type.HasField("tensor_type") or value.type.tensor_type.elem_type == 0:
                raise UnsupportedError(f"graph input {value.name!r} is not a typed tensor")
            value_types[value.name] = value.type.tensor_type.elem_type
        nodes = self._live_nodes(graph)
        consumers: dict[str, list[int]] = {}
        for index, node in nodes.items():
            for name in node.input:
                consumers.setdefault(name, []).append(index)
        opsets = [entry for entry in model.opset_import if entry.domain in STANDARD_DOMAINS]
        if not any(entry.domain in ("", "ai.onnx") for entry in opsets):
            opsets.append(onnx.helper.make_opsetid("", default_opset(model)))
        self._steps: list[_QonnxStep | _OrtStep] = []
        self._sessions: dict[bytes, ort.InferenceSession] = {}  # by the group model's digest
        for group in self._schedule(nodes):
            if isinstance(group, _QonnxStep):
                value_types[group.output] = onnx.TensorProto.FLOAT
                self._steps.append(group)
            else:
                self._steps.append(self._build_group(group, nodes, consumers, value_types, opsets))
        # Constants only quantizers of constants read (float weights) are not needed once
        # those quantizers' values are kept: released after the first complete run.
        constant_readers: dict[str, int] = {}
        for step in self._steps:
            if isinstance(step, _QonnxStep) and step.constant:
                for name in set(step.inputs):
                    constant_readers[name] = constant_readers.get(name, 0) + 1
        self._releasable = tuple(
            name for name, count in constant_readers.items()
            if name in self._constants and name not in self._output_names and len(set(consumers.get(name, []))) == count
        )

    @property
    def input_names(self) -> tuple[str, ...]:
        """The real graph inputs (initializers listed as inputs excluded), in graph order."""
        return self._input_names

    def trace_bytes(self, values: Mapping[str, np.ndarray]) -> int:
        """About the memory a :meth:`trace` result holds beyond the model's constants: the
        feeds and every value a step computed, each with its array header."""
        return sum(
            values[name].nbytes + _ARRAY_HEADER_BYTES
            for name in (*self._input_names, *(out for step in self._steps for out in step.outputs))
            if name in values
        )

    @property
    def session_count(self) -> int:
        """ORT sessions the standard-node groups share (one per distinct group model)."""
        return len(self._sessions)

    @property
    def output_names(self) -> tuple[str, ...]:
        """The graph outputs, in graph order."""
        return self._output_names

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        *,
        perturb: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
        keep: Sequence[str] = (),
        replace: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
        base: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Execute the model on ``feeds`` (one array per real input); return every graph output.

        ``perturb`` maps a QONNX node's output name to a function applied to its value
        before anything reads it: the verifier uses it to measure how far a step of an
        upstream quantizer moves an output that has no grid of its own. ``keep`` names
        internal tensors to return too (the verifier's taps: QONNX node outputs are always
        computed here); those the run did not compute are left out. ``replace`` is like
        ``perturb`` but ``keep`` returns the value computed, not the one the nodes after it
        read (the verifier's unit-local reference: each tap recorded, then replaced by the
        lowered model's value).

        ``base`` is what :meth:`trace` returned for the same ``feeds``: then only the steps
        that read a value differing (bit for bit) from ``base`` run again, and every other
        value is taken from ``base``. Every step is deterministic (numpy, and ORT on one
        thread), so the result is the one a full run gives; a perturbation of the last
        quantizers costs a few steps instead of the whole graph.
        """
        return self._execute(feeds, perturb or {}, keep, replace or {}, base)[0]

    def trace(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every value a plain run on ``feeds`` computes (graph outputs included), by name:
        the ``base`` for later runs on the same feeds."""
        return self._execute(feeds, {}, (), {}, None)[1]

    def _execute(
        self,
        feeds: Mapping[str, np.ndarray],
        perturb: Mapping[str, Callable[[np.ndarray], np.ndarray]],
        keep: Sequence[str],
        replace: Mapping[str, Callable[[np.ndarray], np.ndarray]],
        base: Mapping[str, np.ndarray] | None,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """One run: the results :meth:`run` returns and the whole environment."""
        missing = [name for name in self._input_names if name not in feeds]
        if missing:
            raise ValueError(f"no value given for model input(s) {', '.join(map(repr, missing))}")
        env: dict[str, np.ndarray] = dict(self._constants) if base is None else dict(base)
        changed: set[str] = set()  # names whose value differs from base's
        for name in self._input_names:
            env[name] = np.asarray(feeds[name])
            if base is not None and not identical(env[name], base[name]):
                changed.add(name)
        computed: dict[str, np.ndarray] = {}
        with np.errstate(all="ignore"):  # the quantizers: zero scales and overflow are defined IEEE results
            for step in self._steps:
                if base is None or not changed.isdisjoint(step.inputs):
                    step.run(env)
                    if base is not None:
                        changed.update(name for name in step.outputs if not identical(env[name], base[name]))
                if isinstance(step, _QonnxStep) and (step.output in perturb or step.output in replace):
                    if step.output in perturb:
                        env[step.output] = perturb[step.output](env[step.output])
                    if step.output in replace:
                        computed[step.output] = env[step.output]
                        env[step.output] = replace[step.output](env[step.output])
                    if base is not None and not identical(env[step.output], base[step.output]):
                        changed.add(step.output)
        for name in self._releasable:
            del self._constants[name]
        self._releasable = ()
        results = {name: np.array(env[name]) for name in self._output_names}
        results.update({name: np.array(computed.get(name, env.get(name))) for name in keep if name in env and name not in results})
        return results, env

    # -- planning -----------------------------------------------------------------------

    def _live_nodes(self, graph: onnx.GraphProto) -> dict[int, onnx.NodeProto]:
        """Nodes (by index) that a graph output depends on, checked for what we can run."""
        producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
        for name in self._output_names:
            if name not in producer and name not in self._constants and name not in self._input_names:
                raise InvalidModelError(f"graph output {name!r} is produced by nothing in the graph")
        live: set[int] = set()
        stack = [producer[name] for name in self._output_names if name in producer]
        while stack:
            index = stack.pop()
            if index in live:
                continue
            live.add(index)
            stack.extend(producer[name] for name in graph.node[index].input if name in producer)
        nodes: dict[int, onnx.NodeProto] = {}
        for index in sorted(live):
            node = graph.node[index]
            if is_constant_node(node):
                continue
            label = node_label(node, index)
            if is_qonnx_node(node):
                if len(node.output) != 1:
                    raise InvalidModelError(f"{node.op_type} must have exactly one output", label)
            elif node.domain not in STANDARD_DOMAINS:
                raise UnsupportedError(f"operator {node.op_type} of domain {node.domain!r} is not QONNX or ONNX", label)
            elif node.op_type in CONTROL_FLOW_OPS or any(
                attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attr in node.attribute
            ):
                raise UnsupportedError(f"control flow ({node.op_type}) is not supported", label)
            nodes[index] = node
        return nodes

    def _schedule(self, nodes: dict[int, onnx.NodeProto]) -> list[_QonnxStep | list[int]]:
        """Order the nodes: ready QONNX nodes one by one, then all ready standard nodes as a group.

        Kahn's algorithm with two ready queues (by original index, so the order is stable);
        linear in the graph size.
        """
        available = set(self._constants) | set(self._input_names) | {""}
        waiting: dict[int, int] = {}
        consumers: dict[str, list[int]] = {}
        for index, node in nodes.items():
            missing = {name for name in node.input if name not in available}
            waiting[index] = len(missing)
            for name in missing:
                consumers.setdefault(name, []).append(index)
        ready_qonnx = [i for i, count in waiting.items() if count == 0 and is_qonnx_node(nodes[i])]
        ready_standard = [i for i, count in waiting.items() if count == 0 and not is_qonnx_node(nodes[i])]
        heapq.heapify(ready_qonnx)
        heapq.heapify(ready_standard)

        def produce(index: int) -> None:
            for name in nodes[index].output:
                for consumer in consumers.pop(name, []):
                    waiting[consumer] -= 1
                    if waiting[consumer] == 0:
                        heapq.heappush(ready_qonnx if is_qonnx_node(nodes[consumer]) else ready_standard, consumer)

        plan: list[_QonnxStep | list[int]] = []
        scheduled = 0
        while ready_qonnx or ready_standard:
            while ready_qonnx:
                index = heapq.heappop(ready_qonnx)
                node = nodes[index]
                attrs = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
                constant = all(name in self._constants for name in node.input if name)
                fixed = all(name in self._constants for name in node.input[1:])
                plan.append(
                    _QonnxStep(
                        node_label(node, index), node.op_type, tuple(node.input), node.output[0], attrs, constant,
                        fixed_parameters=fixed,
                    )
                )
                produce(index)
                scheduled += 1
            group: list[int] = []
            while ready_standard:
                index = heapq.heappop(ready_standard)
                group.append(index)
                produce(index)
            if group:
                plan.append(group)
                scheduled += len(group)
        if scheduled != len(nodes):
            index = next(i for i, count in waiting.items() if count > 0)
            node = nodes[index]
            produced = {out for other in nodes.values() for out in other.output}
            dangling = [name for name in node.input if name and name not in available and name not in produced]
            reason = (
                f"input {dangling[0]!r} is produced by nothing in the graph"
                if dangling
                else "the graph has a cycle through this node"
            )
            raise InvalidModelError(reason, node_label(node, index))
        return plan

    def _external_constants(self, names: list[str]) -> dict[str, np.ndarray]:
        """The constants among ``names`` to hand ORT as arrays: every one of a plain numeric
        type and ``output.EXTERNAL_MIN_BYTES`` or more where the model's constants are
        memory bound (:func:`qlower.large_models.memory_bound`: the session then reads the
        array itself, a memory map of the original's data file, instead of holding the bytes
        of a group model and its own copy of them) or where they would take the group model
        past half protobuf's limit; else none."""
        values = [(name, self._constants[name]) for name in names]
        if not self._memory_bound and sum(value.nbytes for _, value in values) < output.MAX_PROTOBUF_BYTES // 2:
            return {}
        return {
            name: np.ascontiguousarray(value)
            for name, value in values
            if value.dtype.kind in "biuf" and value.nbytes >= output.EXTERNAL_MIN_BYTES
        }

    def _build_group(
        self,
        group: list[int],
        nodes: dict[int, onnx.NodeProto],
        consumers: dict[str, list[int]],
        value_types: dict[str, int],
        opsets: list[onnx.OperatorSetIdProto],
    ) -> _OrtStep:
        """One ORT session for a group of standard nodes, exporting what later steps read."""
        members = set(group)
        produced = {out for i in group for out in nodes[i].output if out}
        graph_outputs = set(self._output_names)
        seen: set[str] = set()
        inputs: list[str] = []
        constants: list[str] = []
        for i in group:
            for name in nodes[i].input:
                if name and name not in produced and name not in seen:
                    seen.add(name)
                    (constants if name in self._constants else inputs).append(name)
        outputs = [
            out
            for i in group
            for out in nodes[i].output
            if out and (out in graph_outputs or any(c not in members for c in consumers.get(out, [])))
        ]
        # Tensors are renamed by position (inputs, initializers, then node outputs) and nodes
        # lose their names, so groups that differ only in names (every block of a deep
        # network whose weights are quantized at run time) share one ORT session: the
        # same model bytes are the same kernels, so sharing changes no result.
        canonical: dict[str, str] = {"": ""}
        for name in [*inputs, *constants, *(out for i in group for out in nodes[i].output)]:
            canonical.setdefault(name, f"t{len(canonical) - 1}")
        renamed = []
        for i in group:
            node = onnx.NodeProto()
            node.CopyFrom(nodes[i])
            node.name = ""
            node.input[:] = [canonical[name] for name in node.input]
            node.output[:] = [canonical[name] for name in node.output]
            renamed.append(node)
        # Constants that would take the group model past protobuf's limit go to ORT as
        # external initializers (the arrays, never serialised); such a group is keyed by
        # the constants' own names too, since its bytes no longer say what they hold.
        external = self._external_constants(constants)
        graph = onnx.helper.make_graph(
            renamed,
            "qlower_reference_group",
            [onnx.helper.make_tensor_value_info(canonical[name], value_types[name], None) for name in inputs],
            [onnx.helper.make_empty_tensor_value_info(canonical[name]) for name in outputs],
            initializer=[
                large_models.external_stub(canonical[name], self._constants[name])
                if name in external
                else numpy_helper.from_array(self._constants[name], canonical[name])
                for name in constants
            ],
        )
        model = onnx.helper.make_model(graph, opset_imports=opsets)
        model.ir_version = max(4, onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True))
        labels = tuple(node_label(nodes[i], i) for i in group)
        data = model.SerializeToString()
        key = hashlib.sha256(data + "\0".join(external).encode()).digest()
        session = self._sessions.get(key)
        if session is None:
            try:
                session = make_session(
                    data, optimized=False, external={canonical[name]: value for name, value in external.items()}
                )
            except Exception as exc:  # ORT raises its own exception types
                raise InvalidModelError(
                    f"ONNX Runtime cannot run the original model's nodes {', '.join(labels[:3])}"
                    f"{', ...' if len(labels) > 3 else ''}: {first_line(exc)}"
                ) from None
            self._sessions[key] = session
        output_types = {meta.name: meta.type for meta in session.get_outputs()}
        for name in outputs:
            kind = output_types[canonical[name]]
            if kind not in _ORT_TYPES:
                raise UnsupportedError(f"output {name!r} has non-tensor type {kind}")
            value_types[name] = _ORT_TYPES[kind]
        return _OrtStep(
            labels, session, tuple(inputs), tuple(outputs),
            tuple(canonical[name] for name in inputs), [canonical[name] for name in outputs],
        )
