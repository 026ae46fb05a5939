"""The cost of ``--x86-without-vnni``: one 8-bit conv (128 -> 128 channels, 3x3, 56x56) lowered
to qop with int8 weights (ORT's u8s8 kernel) and with uint8 weights (u8u8), timed
interleaved on one thread. Run: ``.venv/bin/python tests/benchmarks/time_weight_kernels.py``."""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import qlower

QONNX = "qonnx.custom_op.general"


def conv_model(rng: np.random.Generator) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), name) for name, v in (
        ("W", rng.integers(-127, 128, (128, 128, 3, 3)) * 0.01), ("sx", 0.02), ("sw", 0.01), ("sy", 2.0),
        ("zero", 0.0), ("eight", 8.0))]
    nodes = [
        helper.make_node("Quant", ["x", "sx", "zero", "eight"], ["xq"], domain=QONNX, signed=0, narrow=0, rounding_mode="ROUND"),
        helper.make_node("Quant", ["W", "sw", "zero", "eight"], ["wq"], domain=QONNX, signed=1, narrow=1, rounding_mode="ROUND"),
        helper.make_node("Conv", ["xq", "wq"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Quant", ["c", "sy", "zero", "eight"], ["y"], domain=QONNX, signed=0, narrow=0, rounding_mode="ROUND"),
    ]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128, 56, 56])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QONNX, 1)])


def main() -> None:
    rng = np.random.default_rng(0)
    model = conv_model(rng)
    feed = {"x": rng.uniform(0, 5, (1, 128, 56, 56)).astype(np.float32)}
    sessions = {}
    for name, flag in (("int8 weights (u8s8, default)", False), ("uint8 weights (u8u8, --x86-without-vnni)", True)):
        lowered = qlower.convert(model, to="qop", verify_result=False, x86_without_vnni=flag).model
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        sessions[name] = ort.InferenceSession(lowered.SerializeToString(), options, providers=["CPUExecutionProvider"])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(20):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[name].append(time.perf_counter() - start)
    first, second = (session.run(None, feed)[0] for session in sessions.values())
    print(f"identical outputs: {np.array_equal(first, second)}")
    for name, samples in times.items():
        print(f"{name}: median {np.median(samples) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
