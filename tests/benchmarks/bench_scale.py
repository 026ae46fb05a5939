"""Benchmark: compile and verification time against model size (issue 9).

Generates, in a temporary folder deleted afterwards, chains of 1k, 10k and 100k nodes whose
quantizers share one scale, zero-point and bit-width initializer (``synthetic.shared_chain``)
and, unless ``--no-large`` is given, two models with more than 2 GB of float weights in
external data: ``large_weights`` (weights that lower to int8) and ``large_float_weights``
(float weights beside one quantized unit, so the lowered model is over 2 GB too;
``--large-bytes`` sizes both, e.g. smaller to measure memory ratios cheaply; ``--large int8``
runs one). For each it
prints, measured in a fresh subprocess each (so peak memory is that step's own: the child's
``VmHWM``, Linux only):

* onnx load + save (the floor), and the bare onnx-graphsurgeon import + cleanup + toposort +
  export + save of the same file (what any graph-surgeon based tool pays);
* ``qlower.convert(..., verify_result=False)`` writing the output, its ratio to the bare
  round trip, and its time per node;
* ``qlower.verify`` of that output (16 batches, both ORT levels), and its ratio to convert;
* for the chains, the ORT floor of that verification and its ratio to convert: ONNX Runtime
  creating the lowered model's ``ORT_ENABLE_ALL`` session (writing its optimized graph), then
  reopening that graph to read taps, one after the other as verify must, with qlower's session
  options and nothing else (ORT's session creation grows faster than linearly with nodes:
  where this ratio passes 2, verify <= 2x convert cannot be met by anything qlower does);
* each step's peak resident memory (and, for the >2 GB models, its ratio to the weights).

Times are wall seconds of the work inside the child (interpreter start and imports excluded).
Run with ``make bench`` (with the other benchmarks) or ``python tests/benchmarks/bench_scale.py``;
``--sizes 1000,10000`` picks sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = (1_000, 10_000, 100_000)
LARGE_WEIGHT_BYTES = 2**31 + 2**27  # past protobuf's 2 GB limit

_CHILD = r"""
import json, os, sys, time
step, source, target = sys.argv[1:4]
import onnx
# A source with external data is written back the same way (it cannot fit one protobuf).
external = os.path.exists(source + ".data")
options = dict(save_as_external_data=True, all_tensors_to_one_file=True,
               location=os.path.basename(target) + ".data", size_threshold=1024) if external else {}
if step == "load_save":
    start = time.perf_counter()
    model = onnx.load(source)
    onnx.save_model(model, target, **options)
elif step == "graphsurgeon":
    import onnx_graphsurgeon as gs
    start = time.perf_counter()
    graph = gs.import_onnx(onnx.load(source))
    graph.cleanup().toposort()
    onnx.save_model(gs.export_onnx(graph), target, **options)
elif step == "convert":
    import qlower
    start = time.perf_counter()
    qlower.convert(source, to="qcdq", verify_result=False, output_path=target)
elif step == "verify":
    import qlower
    start = time.perf_counter()
    report = qlower.verify(source, target)
    assert report.passed, report.failures
elif step == "ort_floor":
    # What verify's ORT_ENABLE_ALL runner cannot skip, one after the other: the lowered model
    # (``source`` here) opened as deployed, writing its optimized graph, then that graph
    # reopened to read the taps; with qlower's own session options.
    import tempfile
    from qlower.reference import make_session
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        saved = os.path.join(folder, "optimized.onnx")
        deployed = make_session(onnx.load(source), optimized=True, saved_graph=saved)
        del deployed
        make_session(onnx.load(saved), optimized=True, already_optimized=True)
seconds = time.perf_counter() - start
# This process's own peak (VmHWM belongs to the address space exec gave it; ru_maxrss would
# also count the parent's resident memory at fork, which holds the generated model).
with open("/proc/self/status") as status:
    peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_mb": peak_kb / 1024}))
"""


def measure(step: str, source: Path, target: Path) -> dict[str, float] | str:
    """Run one step in a child; its seconds and peak RSS in MB, or the reason it failed."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen([sys.executable, "-c", _CHILD, step, str(source), str(target)], stdout=stdout, stderr=stderr)
        process.wait()
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    if process.returncode != 0:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        return f"failed: {lines[-1][:100] if lines else process.returncode}"
    return json.loads(out.strip().splitlines()[-1])


def _cell(result: dict[str, float] | str, key: str = "seconds", fmt: str = "{:.2f}") -> str:
    return result if isinstance(result, str) else fmt.format(result[key])


def _ratio(a: dict[str, float] | str, b: dict[str, float] | str) -> str:
    if isinstance(a, str) or isinstance(b, str) or b["seconds"] == 0:
        return "-"
    return f"{a['seconds'] / b['seconds']:.2f}x"


def _peak_ratios(results: dict[str, dict[str, float] | str], weight_bytes: int) -> str:
    """Each step's peak resident memory over the weights' size (issue 9's target: <= 2.5x)."""
    return " / ".join(
        "-" if isinstance(results[s], str) else f"{results[s]['peak_mb'] * 2**20 / weight_bytes:.2f}x"  # type: ignore[index]
        for s in ("load_save", "graphsurgeon", "convert", "verify")
    )


def run_size(label: str, nodes: int, path: Path, weight_bytes: int | None = None, floor: bool = True) -> dict[str, object]:
    out = path.with_name(path.stem + ".qcdq.onnx")
    results = {step: measure(step, path, path.with_name(f"{path.stem}.{step}.onnx")) for step in ("load_save", "graphsurgeon")}
    results["convert"] = measure("convert", path, out)
    results["verify"] = measure("verify", path, out) if not isinstance(results["convert"], str) else "skipped"
    results["ort_floor"] = measure("ort_floor", out, out.with_name(out.stem + ".unused")) if floor and not isinstance(results["convert"], str) else "skipped"
    convert = results["convert"]
    per_node = "-" if isinstance(convert, str) else f"{convert['seconds'] / nodes * 1e6:.0f}"
    print(
        f"{label:>10} {_cell(results['load_save']):>9} {_cell(results['graphsurgeon']):>9} {_cell(convert):>9} "
        f"{_ratio(convert, results['graphsurgeon']):>8} {per_node:>8} {_cell(results['verify']):>9} "
        f"{_ratio(results['verify'], convert):>8} {_cell(results['ort_floor']):>9} {_ratio(results['ort_floor'], convert):>8}  "
        + " / ".join(_cell(results[s], "peak_mb", "{:.0f}") for s in ("load_save", "graphsurgeon", "convert", "verify"))
        + (f"  (weights {weight_bytes / 2**20:.0f} MB; peak / weights: {_peak_ratios(results, weight_bytes)})" if weight_bytes else "")
    )
    sys.stdout.flush()
    for produced in path.parent.glob(f"{path.stem}.*"):
        produced.unlink()
    return {"nodes": nodes, **results, "per_node_us": per_node}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(str(size) for size in SIZES))
    parser.add_argument("--no-large", action="store_true", help="skip the >2 GB external-data models")
    parser.add_argument("--large-bytes", type=int, default=LARGE_WEIGHT_BYTES, help="weight bytes of the large models")
    parser.add_argument("--large", default="int8,float", help="which large models: int8 (lowers to int8), float (stays float)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import synthetic

    print("qlower compile speed: shared-parameter chains (Quant -> MatMul(Quant(w 16x16)) -> Relu), seconds")
    print(f"{'nodes':>10} {'load+save':>9} {'gs trip':>9} {'convert':>9} {'/gs':>8} {'us/node':>8} {'verify':>9} "
          f"{'/convert':>8} {'ORT floor':>9} {'/convert':>8}  peak MB load+save / gs / convert / verify")
    folder = Path(tempfile.mkdtemp(prefix="qlower-bench-"))
    try:
        for size in (int(text) for text in args.sizes.split(",") if text):
            path = folder / f"chain_{size}.onnx"
            model = synthetic.shared_chain(size)
            nodes = len(model.graph.node)
            synthetic.save(model, path)
            del model
            run_size(f"{nodes:,}", nodes, path)
        if not args.no_large:
            # The first lowers to int8 (a quarter of its size); the second keeps its float
            # weights, so its lowered model is over 2 GB too (checked, run and written as such).
            chosen = args.large.split(",")
            for kind, make in (("int8", synthetic.large_weights), ("float", synthetic.large_float_weights)):
                if kind not in chosen:
                    continue
                free = shutil.disk_usage(folder).free
                if free < 5 * args.large_bytes:
                    print(f"large {kind} skipped: {free / 2**30:.1f} GB free in {folder}, needs {5 * args.large_bytes / 2**30:.0f}")
                    continue
                path = folder / "large.onnx"
                start = time.perf_counter()
                model = make(args.large_bytes)
                nodes = len(model.graph.node)
                synthetic.save(model, path, external=True)
                del model
                weight_bytes = Path(f"{path}.data").stat().st_size
                size = ">2 GB" if weight_bytes > 2**31 else f"{weight_bytes / 2**20:.0f} MB"  # (--large-bytes may shrink them)
                label = size if kind == "int8" else f"{size} float"
                print(f"{'':>10} (generated the {label} model in {time.perf_counter() - start:.0f} s)")
                run_size(label, nodes, path, weight_bytes, floor=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
