"""Which Conv/MatMul/Gemm units ONNX Runtime runs as integer kernels (imported as ``ort_kernels``).

Counted in the graph ORT saves after its own optimizer (``optimized_model_filepath`` at
ORT_ENABLE_ALL), which is what actually runs.
"""

from __future__ import annotations

import collections
from pathlib import Path

import onnx
import onnxruntime as ort

INTEGER_KERNELS = frozenset({"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm", "MatMulIntegerToFloat"})
FLOAT_KERNELS = frozenset({"Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm", "ConvTranspose"})


def kernel_counts(model: onnx.ModelProto, workdir: Path) -> tuple[int, int]:
    """(integer kernels, float kernels) in ORT's optimized graph of ``model``."""
    source, optimized = workdir / "model.onnx", workdir / "optimized.onnx"
    onnx.save(model, str(source))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3  # ORT warns that an ENABLE_ALL graph is hardware-specific
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
    return sum(ops[op] for op in INTEGER_KERNELS), sum(ops[op] for op in FLOAT_KERNELS)
