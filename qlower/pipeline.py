"""The one pipeline behind the CLI and the Python API.

load -> normalize -> fold constant subgraphs -> analyse quantizers -> passes for the
target -> cleanup -> export and check -> verify -> save atomically -> report.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import ir, large_models, output, taps
from .constant_folding import fold_constants
from .analysis import FLOAT8_OPSET, analyse, describe
from .collector import paused_cycle_collection
from .links import remove_unused_nodes, share_equal_constants, toposort
from .progress import Progress
from .report_schema import header
from .errors import InvalidModelError, UnsupportedError
from .profiles import PORTABLE, Profile, get_profile
from .passes.base import LoweringContext, QuantizerPass, QuantizerRecord, run_graph_pass, run_pass
from .errors import VerificationError
from .passes.registry import graph_passes_for, quantizer_passes_for

if TYPE_CHECKING:  # verification (and what it imports) is loaded only by a convert that verifies
    from .verification import VerificationReport

TARGETS = ("qcdq", "qop")
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
# onnx-graphsurgeon's fold_constants never evaluates these.
_NEVER_FOLDED = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


@dataclass
class ConversionReport:
    """Everything a user or CI needs to know about one conversion."""

    target: str
    input_opset: int
    output_opset: int
    quantizers: list[QuantizerRecord]
    unit_records: list[dict[str, object]] = field(default_factory=list)
    folded_constant_nodes: int = 0
    verification: VerificationReport | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    output_path: str | None = None
    profile: Profile = PORTABLE

    @property
    def float_path_nodes(self) -> list[str]:
        return [r.node for r in self.quantizers if r.float_path]

    @property
    def float_path(self) -> list[dict[str, object]]:
        """Each float-path quantizer with why no integer form took it."""
        return [{"node": r.node, "op": r.op, "lowered_by": r.lowered_by, "reason": float_path_reason(r)} for r in self.quantizers if r.float_path]

    def to_dict(self) -> dict[str, object]:
        return {
            **header("convert"),
            "target": self.target,
            "profile": self.profile.to_dict(),
            "input_opset": self.input_opset,
            "output_opset": self.output_opset,
            "output_path": self.output_path,
            "folded_constant_nodes": self.folded_constant_nodes,
            "quantizers": [r.to_dict() for r in self.quantizers],
            "units": self.unit_records,
            "float_path_nodes": self.float_path_nodes,
            "float_path": self.float_path,
            "verification": self.verification.to_dict() if self.verification else None,
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
        }


@dataclass
class ConversionResult:
    model: onnx.ModelProto
    report: ConversionReport


def float_path_reason(record: QuantizerRecord) -> str:
    """Why a quantizer took the float path: the integer passes' refusals, in order."""
    if record.skipped:
        return "; ".join(f"{name}: {reason}" for name, reason in record.skipped)
    return f"no integer form exists for {record.op}"


def _refuse_float_path(records: list[QuantizerRecord]) -> None:
    first = next((r for r in records if r.float_path), None)
    if first is not None:
        raise UnsupportedError(
            f"--strict: this {first.op} would take the exact float path, not an integer container ({float_path_reason(first)})",
            first.node,
        )


def _float8_opset(model: onnx.ModelProto) -> int:
    """FloatQuant lowers to float8 Q/DQ, which needs opset 19: raise the output opset for it."""
    has_float_quant = any(ir.is_qonnx_node(node) and node.op_type == "FloatQuant" for node in model.graph.node)
    return FLOAT8_OPSET if has_float_quant else 0


def _keep_unfolded(node: gs.Node) -> bool:
    if ir.is_qonnx_node(node):
        return True
    consumers = node.outputs[0].outputs if node.op == "Clip" and node.outputs else []
    return bool(consumers) and all(consumer.op == "DequantizeLinear" for consumer in consumers)


def _foldable(node: gs.Node) -> bool:
    """Where onnx-graphsurgeon's fold_constants would start: a node it folds whose inputs are
    all constants (or one with a subgraph, which it may flatten)."""
    if node.op in _NEVER_FOLDED or _keep_unfolded(node):
        return False
    if any(isinstance(value, gs.Graph) for value in node.attrs.values()):
        return True
    return all(isinstance(tensor, gs.Constant) for tensor in node.inputs if tensor.name)


def _fold_constant_subgraphs(graph: gs.Graph) -> int:
    """Fold standard ops whose inputs are all constant (e.g. scales computed from initializers).

    Shapes are not folded: a Shape of a run-time input stays, so no batch size is baked in.
    A Clip between an integer constant and a DequantizeLinear (the range marker qlower and
    Brevitas emit on weights) is kept, so converting a lowered model changes nothing.
    """
    if not any(_foldable(node) for node in graph.nodes):
        return 0  # fold_constants copies the whole graph to find that out (a quarter of a 100k-node conversion)
    before = len(graph.nodes)
    fold_constants(graph, should_exclude_node=_keep_unfolded)
    graph.cleanup(remove_unused_graph_inputs=False)
    return before - len(graph.nodes)


def _lower(
    graph: gs.Graph, rules: Sequence[QuantizerPass], ctx: LoweringContext, progress: Progress
) -> list[QuantizerRecord]:
    table = analyse(graph)
    records = {q.name: QuantizerRecord(q.name, q.op, q.role, q.bit_width, details=describe(q)) for q in table}
    if len(records) != len(table):
        names = [q.name for q in table]
        duplicate = next(name for name in names if names.count(name) > 1)
        raise InvalidModelError("two quantizer nodes share this name", duplicate)
    pending = table
    progress.stage(f"lowering {len(pending):,} quantizers", total=len(pending))
    for rule in rules:
        before = len(pending)
        pending = run_pass(rule, pending, ctx, records)
        progress.advance(before - len(pending))
    if pending:
        q = pending[0]
        reasons = "; ".join(f"{name}: {reason}" for name, reason in records[q.name].skipped) or "no pass matches it"
        raise UnsupportedError(f"cannot lower this {q.op} ({reasons})", q.name)
    return list(records.values())


def _finish(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    share_equal_constants(graph)
    if not remove_unused_nodes(graph):
        graph.cleanup(remove_unused_graph_inputs=False)
    if not toposort(graph):
        graph.toposort()
    model = ir.to_model(graph, template)
    kept = [entry for entry in model.opset_import if entry.domain not in ir.QONNX_DOMAINS]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    survivors = [n.name for n in model.graph.node if ir.is_qonnx_node(n)]
    if survivors:
        raise UnsupportedError("a QONNX node survived lowering", survivors[0])
    custom = next((n for n in model.graph.node if n.domain not in STANDARD_DOMAINS), None)
    if custom is not None:
        raise UnsupportedError(
            f"{custom.op_type} (domain {custom.domain}) is not standard ONNX and qlower has no lowering for it", custom.name
        )
    try:
        if not large_models.needs_split(model):
            onnx.checker.check_model(model, full_check=True)
        else:  # too large to serialise: checked by path, as written with external data
            large_models.check(model)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise UnsupportedError(f"the lowered model fails the ONNX checker: {first}") from None
    return model


@paused_cycle_collection
def convert(
    source: ir.ModelSource,
    to: str = "qcdq",
    *,
    output_path: str | os.PathLike | None = None,
    opset: int | None = None,
    verify_result: bool = True,
    inputs: list[dict[str, np.ndarray]] | None = None,
    batches: int = 16,
    seed: int = 0,
    tolerance_lsb: float = 1.0,
    check_optimized: bool = True,
    x86_without_vnni: bool = False,
    profile: str | Profile = "portable",
    runtime: str = "onnxruntime",
    progress: Progress | None = None,
    strict: bool = False,
) -> ConversionResult:
    """Lower a QONNX model to ``to`` ("qcdq" or "qop"), verify it, optionally save it.

    ``profile`` names the runtime the QCDQ layout is tuned for (``qlower.profiles``):
    "portable" (Brevitas's layout, the default), "ort" or "openvino" (qcdq only). Every
    profile computes the same values; the report records which one was used.

    ``strict`` refuses (UnsupportedError, naming the node) any quantizer that would take
    the exact float path (SPEC 3.6), for deployments that require integer containers.

    ``check_optimized`` False verifies at ``ORT_DISABLE_ALL`` only (for deployments that
    do not run ONNX Runtime's graph optimizations, or to set aside ORT's own rewrites).
    ``progress`` receives the stages of a long run (the CLI draws them on stderr).
    ``x86_without_vnni`` (qop): keep integer weights exact on x86 CPUs without VNNI too
    (|k*w| <= 64, else uint8 weights for the slower u8u8 kernel), reported per unit.
    ``runtime`` is the runtime verification runs the lowered model on: "onnxruntime" or
    "openvino" (the optional openvino package, CPU with the f32 precision hint).

    ``output_path`` takes what :mod:`qlower.output` writes: a file (replaced atomically),
    a symlink (its target replaced), a device or FIFO (written directly), ``"-"`` (stdout),
    or an existing directory (the model goes in as ``<model>.<to>.onnx`` when ``source``
    is a path).

    Raises a :class:`qlower.errors.QlowerError` subclass for bad input (nothing is written),
    :class:`qlower.errors.VerificationError` when verification fails (nothing is written)
    and :class:`qlower.errors.OutputError` when the output cannot be written there.
    """
    if to not in TARGETS:
        raise UnsupportedError(f"unknown target {to!r}; choose one of {', '.join(TARGETS)}")
    policy = get_profile(profile, to)
    source_path = None if isinstance(source, (bytes, bytearray, onnx.ModelProto)) else os.fspath(source)
    if output_path is not None:  # refuse an unusable output before the work, not after it
        output_path = output.output_file_for(output_path, source_path, to)
        output.check(output_path, protect=[source_path] if source_path else ())
    if verify_result:
        from .verification import check_runtime

        check_runtime(runtime)
    progress = progress or Progress()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    progress.stage("loading")
    original = ir.load_model(source)
    input_opset = ir.default_opset(original)
    output_opset = max(ir.MIN_OUTPUT_OPSET, input_opset, opset or 0, _float8_opset(original))
    normalized = ir.normalize(original, output_opset, copy=False)  # ``original`` is our own copy
    del original
    graph = ir.to_graph(normalized)
    folded = _fold_constant_subgraphs(graph)
    seconds["load_normalize"] = time.perf_counter() - start

    start = time.perf_counter()
    ctx = LoweringContext(graph=graph, opset=output_opset, target=to, x86_without_vnni=x86_without_vnni, profile=policy)
    quantizer_records = _lower(graph, quantizer_passes_for(to), ctx, progress)
    if strict:
        _refuse_float_path(quantizer_records)
    progress.stage("fusing units and checking the result")
    unit_records = [record.to_dict() for rule in graph_passes_for(to) for record in run_graph_pass(rule, ctx)]
    lowered = _finish(graph, normalized)
    # A model qlower already lowered keeps the taps it carries (converting again is a no-op).
    # One tap per original tensor (a unit records its input and its output, so neighbours repeat).
    taps.attach(lowered, list({tap.original: tap for tap in [*taps.read(normalized), *ctx.taps]}.values()))
    seconds["lower"] = time.perf_counter() - start
    if verify_result:
        # The graph (cyclic, so only the paused collector frees it) still holds every float
        # weight the passes read: free it once before verification loads its own copies.
        del graph, ctx
        gc.collect()

    report = ConversionReport(
        to, input_opset, output_opset, quantizer_records, unit_records, folded, seconds=seconds,
        profile=policy,
    )
    if verify_result:
        from .verification import verify

        start = time.perf_counter()
        # verify runs the reference on the original upgraded to the output opset; hand over
        # convert's normalized model (the same graph, upgraded when convert upgraded it)
        # instead of having verify convert it again.
        report.verification = verify(
            normalized, lowered, target=to, inputs=inputs, batches=batches, seed=seed, tolerance_lsb=tolerance_lsb,
            check_optimized=check_optimized, runtime=runtime, progress=progress,
        )
        if report.verification.kernels is not None:
            report.verification.kernels.explain(unit_records)
        seconds["verify"] = time.perf_counter() - start
        try:
            report.verification.raise_if_failed()
        except VerificationError as exc:
            exc.report = report  # the CLI still writes the report of a failed conversion
            raise
    if output_path is not None:
        progress.stage("writing")
        report.output_path = output.write_model(lowered, output_path, protect=[source_path] if source_path else ())
    return ConversionResult(lowered, report)
