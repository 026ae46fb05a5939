"""Peak memory and time of writing a model with external data: qlower.output.write_model vs onnx.save_model.

    .venv/bin/python tests/benchmarks/bench_write_model.py [MiB of weights, default 400]

Each writer runs in its own process on the same synthetic model (10 MiB int8 initializers,
the 2 GB limit lowered so they go to a data file); the peak is VmHWM reset just before the
write, so it is what the write itself adds. qlower fsyncs both files, onnx.save_model does not.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TENSOR_BYTES = 10 * 2**20


def status_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        return int(status.read().split(f"{key}:")[1].split()[0]) / 1024


def measure(writer: str, mib: int) -> None:
    from qlower import output

    count = max(1, mib * 2**20 // TENSOR_BYTES)
    inits = [numpy_helper.from_array(np.full(TENSOR_BYTES, i % 127, np.int8), f"w{i}") for i in range(count)]
    nodes = [helper.make_node("Identity", [f"w{i}"], [f"y{i}"]) for i in range(count)]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.INT8, [TENSOR_BYTES]) for i in range(count)]
    model = helper.make_model(helper.make_graph(nodes, "g", [], outputs, inits), opset_imports=[helper.make_opsetid("", 13)])
    del inits
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "m.onnx")
        before = status_mib("VmRSS")
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the peak to now
        start = time.perf_counter()
        if writer == "qlower":
            output.write_model(model, path, max_inline_bytes=TENSOR_BYTES)
        else:  # onnx converts the proto in place; a pipeline keeps its model, so it saves a copy
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(copy, path, save_as_external_data=True, location="m.onnx.data")
        seconds = time.perf_counter() - start
        added = status_mib("VmHWM") - before
        data = os.path.getsize(path + ".data")
    print(f"{writer:>6}: {count} tensors, {data / 2**20:.0f} MiB data file: peak +{added:.0f} MiB over the model in memory, {seconds:.2f} s")


def main() -> None:
    if len(sys.argv) > 2:
        measure(sys.argv[2], int(sys.argv[1]))
        return
    mib = sys.argv[1] if len(sys.argv) > 1 else "400"
    for writer in ("qlower", "onnx"):
        subprocess.run([sys.executable, __file__, mib, writer], check=True)


if __name__ == "__main__":
    main()
