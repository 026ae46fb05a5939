"""Benchmark: qlower's QCDQ lowering against qonnx's QuantToQCDQ, measured in the same run.

For each model the best of several repetitions is taken for both tools, and the ratio
``qonnx / qlower`` is printed (above 1 means qlower is faster). Verification is off for
the timing (it is a separate, optional step); qonnx's result on the same model is shown
with the number of QONNX nodes it leaves behind, since a faster tool that leaves
unconverted nodes is not a fair win. A synthetic deep MLP shows how both scale with size.

Run with ``make bench``.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import qlower
from qlower.ir import is_qonnx_node

ROOT = Path(__file__).resolve().parents[2]
REPEATS = 3


def deep_mlp(layers: int, width: int = 64) -> onnx.ModelProto:
    """An MLP of ``layers`` Quant(act) -> MatMul(Quant(weight)) blocks (Brevitas layout)."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    current = "x"

    def scalar(name: str, value: float) -> str:
        inits.append(numpy_helper.from_array(np.array(value, np.float32), name))
        return name

    for i in range(layers):
        act = f"a{i}"
        nodes.append(helper.make_node("Quant", [current, scalar(f"as{i}", 0.05), scalar(f"az{i}", 0.0), scalar(f"ab{i}", 4.0)], [act],
                                      domain="qonnx.custom_op.general", signed=1, narrow=0, rounding_mode="ROUND"))
        inits.append(numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32) * 0.1, f"w{i}"))
        nodes.append(helper.make_node("Quant", [f"w{i}", scalar(f"ws{i}", 0.02), scalar(f"wz{i}", 0.0), scalar(f"wb{i}", 4.0)], [f"wq{i}"],
                                      domain="qonnx.custom_op.general", signed=1, narrow=1, rounding_mode="ROUND"))
        current = f"h{i}"
        nodes.append(helper.make_node("MatMul", [act, f"wq{i}"], [current]))
    graph = helper.make_graph(nodes, "deep_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, [1, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("qonnx.custom_op.general", 1)])


def best_of(run: Callable[[], object]) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def qonnx_quant_to_qcdq(model: onnx.ModelProto) -> onnx.ModelProto:
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.qonnx_to_qcdq import QuantToQCDQ

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ModelWrapper(model).transform(QuantToQCDQ()).model


def main() -> int:
    models: list[tuple[str, onnx.ModelProto]] = [
        (path.stem, onnx.load(str(path))) for path in sorted((ROOT / "tests/data/zoo").glob("*.onnx"))
    ]
    models += [("mobilenet_style", onnx.load(str(ROOT / "examples/mobilenet_style.onnx")))]
    models += [(f"deep_mlp_{n}", deep_mlp(n)) for n in (50, 200)]
    print(f"{'model':28} {'qlower ms':>10} {'qonnx ms':>10} {'ratio':>7}  qonnx leaves")
    ratios = []
    for name, model in models:
        ours, _ = best_of(lambda: qlower.convert(model, to="qcdq", verify_result=False))
        try:
            theirs, converted = best_of(lambda: qonnx_quant_to_qcdq(model))
            left = sum(1 for node in converted.graph.node if is_qonnx_node(node))
            ratio = theirs / ours
            ratios.append(ratio)
            print(f"{name:28} {ours * 1e3:10.1f} {theirs * 1e3:10.1f} {ratio:7.2f}  {left} QONNX nodes")
        except Exception as exc:  # the baseline failing is a result worth printing, not a crash
            print(f"{name:28} {ours * 1e3:10.1f} {'failed':>10} {'-':>7}  {type(exc).__name__}: {str(exc)[:60]}")
    if ratios:
        print(f"geometric mean speed-up over qonnx QuantToQCDQ: {float(np.exp(np.mean(np.log(ratios)))):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
