"""``qlower inspect``: what a QONNX model holds and what each target would make of it.

Nothing here decides how a quantizer is lowered: :func:`inspect` runs the real pipeline
(:func:`qlower.pipeline.convert`, without verification) once per target and reads its
records, so what inspect says a quantizer becomes is what ``convert`` does.

The cost summary counts, per compute node (Conv, ConvTranspose, MatMul, Gemm), the
multiply-accumulates and the weight parameters, keyed by the bit widths of the
quantizers feeding its activation and weight inputs. The formulas are those of qonnx's
``inference_cost`` with ``discount_sparsity=False`` (every weight counted, zero or not):
Conv ``N * C_out/group * C_in * prod(kernel) * prod(output spatial)``, MatMul/Gemm
``K * prod(output)``. A bit width is followed back through ops that only move values
(Reshape, Transpose, MaxPool, ... as qonnx's datatype inference does); anything else
(Relu, Add, a float input) is "float". In a QCDQ input (no QONNX quantizers) a
DequantizeLinear gives the width of its integer range: the integer Clip in front of it, or
its container. Symbolic dimensions count as 1.

Which units run as integer kernels is given two ways, each saying where it comes from:
``units[*].lowerings[target]`` from the qop passes' unit records (what qlower fused), and
``lowerings[target].ort_kernels`` by counting compute kernels in the graph ONNX
Runtime's optimizer (``ORT_ENABLE_ALL``) saves for the lowered model.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from . import ir
from .errors import UnsupportedError
from .passes.integer_units import ComputeUnitPass
from .passes.registry import graph_passes_for
from .pipeline import TARGETS, ConversionResult, convert
from .profiles import PORTABLE, PROFILES
from .report_schema import header
from .verification.kernels import FLOAT_KERNELS as ORT_FLOAT_KERNELS
from .verification.kernels import INTEGER_KERNELS as ORT_INTEGER_KERNELS

COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Ops whose output holds the same values as their first input (qonnx's dt_identity_optypes).
VALUE_MOVING_OPS = frozenset({
    "Reshape", "Transpose", "Flatten", "Slice", "Gather", "GatherElements", "GatherND", "Identity", "Expand",
    "MaxPool", "GlobalMaxPool", "Squeeze", "Unsqueeze", "Tile", "Pad", "Concat", "Clip",
})


@dataclass
class ComputeUnit:
    """One compute node of the model, its cost, and what each target made of it."""

    node: str
    op: str
    activation_bits: float | None
    weight_bits: float | None
    macs: int
    weight_params: int
    lowerings: dict[str, dict[str, object]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class InspectionReport:
    """Every quantizer with what it becomes per target, the compute units, and a summary."""

    model: str | None
    opset: int
    quantizers: list[dict[str, object]]
    units: list[ComputeUnit]
    lowerings: dict[str, dict[str, object]]

    def summary(self) -> dict[str, object]:
        by_bits = Counter((str(q["role"]), q["op"], q["bits"]) for q in self.quantizers)
        cost: dict[tuple[float | None, float | None], dict[str, int]] = {}
        for unit in self.units:
            row = cost.setdefault((unit.activation_bits, unit.weight_bits), {"units": 0, "macs": 0, "weight_params": 0})
            row["units"] += 1
            row["macs"] += unit.macs
            row["weight_params"] += unit.weight_params
        return {
            "quantizers_by_bits": [
                {"role": role, "op": op, "bits": bits, "count": count}
                for (role, op, bits), count in sorted(by_bits.items(), key=lambda item: (item[0][0], item[0][1], item[0][2] or 0))
            ],
            "cost": [
                {"activation_bits": a, "weight_bits": w, **row}
                for (a, w), row in sorted(cost.items(), key=lambda item: (item[0][0] or 99, item[0][1] or 99))
            ],
            "total_macs": sum(unit.macs for unit in self.units),
            "total_weight_params": sum(unit.weight_params for unit in self.units),
        }

    def to_dict(self) -> dict[str, object]:
        return {
            **header("inspect"),
            "model": self.model,
            "opset": self.opset,
            "summary": self.summary(),
            "quantizers": self.quantizers,
            "units": [unit.to_dict() for unit in self.units],
            "lowerings": self.lowerings,
        }


def _integer_unit_passes(target: str) -> frozenset[str]:
    return frozenset(rule.name for rule in graph_passes_for(target) if isinstance(rule, ComputeUnitPass))


def ort_kernel_counts(model: onnx.ModelProto) -> dict[str, object]:
    """Compute kernels in the graph ONNX Runtime's optimizer saves at ``ORT_ENABLE_ALL``."""
    import onnxruntime as ort  # here, not at import: ``qlower convert`` does not need it

    with tempfile.TemporaryDirectory(prefix="qlower-inspect-") as scratch:
        saved = Path(scratch) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(saved)
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(saved))
    ops = Counter(node.op_type for node in optimized.graph.node)
    return {
        "integer": sum(n for op, n in ops.items() if op in ORT_INTEGER_KERNELS),
        "float": sum(n for op, n in ops.items() if op in ORT_FLOAT_KERNELS),
        "ops": {op: n for op, n in sorted(ops.items()) if op in ORT_INTEGER_KERNELS | ORT_FLOAT_KERNELS},
    }


def _run_shapes(model: onnx.ModelProto, names: set[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of ``names`` from one ONNX Runtime run on zeros (symbolic dimensions as 1).

    For shapes that ONNX's static inference cannot follow (a Reshape target computed from
    Shape -> Gather -> Concat, as FINN's zoo models have).
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    declared = {value.name for value in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in sorted(names - declared))
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {}
    for meta in session.get_inputs():
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in meta.shape]
        feeds[meta.name] = np.zeros(dims, dtype=onnx.helper.tensor_dtype_to_np_dtype(_ORT_ELEM_TYPES[meta.type]))
    wanted = sorted(names)
    return {name: tuple(np.shape(value)) for name, value in zip(wanted, session.run(wanted, feeds))}


_ORT_ELEM_TYPES = {
    f"tensor({onnx.TensorProto.DataType.Name(code).lower()})": code
    for code in onnx.TensorProto.DataType.values()
    if code != onnx.TensorProto.UNDEFINED
}


class _LoweredGraph:
    """Producers, shapes and constness of the lowered (standard ONNX) model."""

    def __init__(self, model: onnx.ModelProto, bits_of_tensor: dict[str, float | None]) -> None:
        graph = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
        self.nodes = [node for node in graph.node]
        self.producer = {out: node for node in graph.node for out in node.output}
        self.initializers = {init.name: tuple(init.dims) for init in graph.initializer}
        self.values = {init.name: init for init in graph.initializer}
        self.elem_types = {init.name: init.data_type for init in graph.initializer}
        self.shapes: dict[str, tuple[int, ...]] = dict(self.initializers)
        for value in [*graph.input, *graph.value_info, *graph.output]:
            tensor_type = value.type.tensor_type
            if value.type.HasField("tensor_type"):
                self.elem_types[value.name] = tensor_type.elem_type
            if value.type.HasField("tensor_type") and tensor_type.HasField("shape"):
                dims = tensor_type.shape.dim
                self.shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in dims)
        needed = {name for node in self.nodes if node.op_type in COMPUTE_OPS for name in (*node.input[:2], node.output[0])}
        if needed - self.shapes.keys():
            self.shapes.update(_run_shapes(model, needed - self.shapes.keys()))
        self.bits_of_tensor = bits_of_tensor
        # One pass in graph order (qlower writes its output topologically sorted), not a walk
        # back from each unit: that recursed once per node upstream (deep models overflowed).
        self.constants = set(self.initializers)
        for node in self.nodes:
            if all(name in self.constants for name in node.input if name):
                self.constants.update(node.output)

    def bits(self, tensor: str) -> float | None:
        """The bit width of the quantizer whose values ``tensor`` holds, or None (float)."""
        while tensor not in self.bits_of_tensor:
            node = self.producer.get(tensor)
            if node is not None and node.op_type == "DequantizeLinear":
                return self._dequantized_bits(node.input[0])
            if node is None or node.op_type not in VALUE_MOVING_OPS or not node.input:
                return None
            tensor = node.input[0]
        return self.bits_of_tensor[tensor]

    def _dequantized_bits(self, integers: str) -> float | None:
        """A DequantizeLinear of a QCDQ input: the width of its integer range.

        That is the range of the integer Clip in front of it (Brevitas marks sub-8-bit
        ranges so), else its container (int8 -> 8).
        """
        clip = self.producer.get(integers)
        if clip is not None and clip.op_type == "Clip" and len(clip.input) == 3 and all(n in self.values for n in clip.input[1:]):
            low, high = (float(numpy_helper.to_array(self.values[n])) for n in clip.input[1:])
            return float(max(1, int(np.ceil(np.log2(high - low + 1)))))
        container = self.elem_types.get(integers)
        if container in (None, onnx.TensorProto.UNDEFINED):
            return None
        return float(8 * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(container)).itemsize)

    def is_constant(self, tensor: str) -> bool:
        """Whether ``tensor`` is computed from initializers alone (a weight, folded or not)."""
        return tensor in self.constants

    def unit(self, node: onnx.NodeProto) -> ComputeUnit:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        first_is_weight = node.op_type == "MatMul" and self.is_constant(node.input[0]) and not self.is_constant(node.input[1])
        x, w = (node.input[1], node.input[0]) if first_is_weight else (node.input[0], node.input[1])
        a_shape, w_shape, y_shape = self.shapes[node.input[0]], self.shapes[w], self.shapes[node.output[0]]
        group = int(attrs.get("group", 1))
        if node.op_type == "Conv":
            macs = y_shape[0] * (y_shape[1] // group) * a_shape[1] * int(np.prod(w_shape[2:])) * int(np.prod(y_shape[2:]))
        elif node.op_type == "ConvTranspose":
            macs = a_shape[0] * a_shape[1] * (y_shape[1] // group) * int(np.prod(w_shape[2:])) * int(np.prod(a_shape[2:]))
        else:  # MatMul, Gemm: the shared dimension times every output element
            inner = a_shape[0] if node.op_type == "Gemm" and attrs.get("transA", 0) else a_shape[-1]
            macs = int(inner) * int(np.prod(y_shape))
        params = int(np.prod(w_shape)) if self.is_constant(w) else 0
        return ComputeUnit(node.name, node.op_type, self.bits(x), self.bits(w), macs, params)


def _quantizer_rows(results: dict[str, ConversionResult]) -> list[dict[str, object]]:
    first = next(iter(results.values())).report
    rows = []
    for record in first.quantizers:
        row = {key: value for key, value in record.to_dict().items() if key not in ("lowered_by", "emitted", "float_path", "skipped")}
        row["lowerings"] = {}
        rows.append(row)
    by_node = {row["node"]: row for row in rows}
    for label, result in results.items():
        for record in result.report.quantizers:
            entry = record.to_dict()
            by_node[record.node]["lowerings"][label] = {
                key: entry[key] for key in ("lowered_by", "emitted", "float_path", "skipped")
            }
    return rows


def lowering_labels(targets: Iterable[str] = TARGETS) -> dict[str, tuple[str, str]]:
    """Every (target, profile) pair that applies, by its report label: "qcdq", "qcdq/ort", ..."""
    labels = {}
    for target in targets:
        for name, profile in PROFILES.items():
            if target in profile.targets:
                labels[target if profile is PORTABLE else f"{target}/{name}"] = (target, name)
    return labels


def inspect(source: ir.ModelSource, targets: Iterable[str] = TARGETS) -> InspectionReport:
    """Describe ``source``: quantizers, compute units and their cost, per-target lowerings.

    Every target runs with every profile that applies to it, labelled ``target`` for the
    portable profile and ``target/profile`` otherwise. Raises the same
    :class:`qlower.QlowerError` as ``convert`` for input nothing can lower; a target that
    refuses a model another target lowers is reported, not raised.
    """
    model = ir.load_model(source)
    results: dict[str, ConversionResult] = {}
    lowerings: dict[str, dict[str, object]] = {}
    first_refusal: UnsupportedError | None = None
    for label, (target, profile) in lowering_labels(targets).items():
        try:
            result = convert(model, target, profile=profile, verify_result=False)
        except UnsupportedError as exc:
            first_refusal = first_refusal or exc
            lowerings[label] = {"target": target, "profile": profile, "refused": str(exc)}
            continue
        results[label] = result
        lowerings[label] = {
            "target": target,
            "profile": profile,
            "refused": None,
            "output_opset": result.report.output_opset,
            "float_path_nodes": result.report.float_path_nodes,
            "ort_kernels": ort_kernel_counts(result.model),
        }
    if not results:
        assert first_refusal is not None
        raise first_refusal
    quantizers = _quantizer_rows(results)
    # Costs are read on the exact QCDQ form, where every compute node is still itself.
    cost_source = results.get("qcdq") or convert(model, "qcdq", verify_result=False)
    bits = {str(q["tensor"]): (1.0 if q["op"] == "BipolarQuant" else q["bits"]) for q in quantizers}
    lowered = _LoweredGraph(cost_source.model, bits)
    units = [lowered.unit(node) for node in lowered.nodes if node.op_type in COMPUTE_OPS]
    for label, result in results.items():
        fusing = _integer_unit_passes(result.report.target)
        records = {str(r["node"]): r for r in result.report.unit_records if r["pass"] in fusing}
        for unit in units:
            record = records.get(unit.node)
            if fusing:
                unit.lowerings[label] = {
                    "integer_kernel": bool(record and record["became"]),
                    "became": record["became"] if record else None,
                    "reason": record["reason"] if record else None,
                }
    name = str(source) if isinstance(source, (str, Path)) else None
    return InspectionReport(name, next(iter(results.values())).report.output_opset, quantizers, units, lowerings)
