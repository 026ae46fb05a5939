"""Benchmark: the real Brevitas models as deployed, lowered several ways, measured in one run.

For each model in ``tests/fixtures/brevitas/real`` (see ``generate_real.py`` there) it builds

* ``float``: the float architecture (``<name>.float.onnx``);
* ``ORT int8``: ONNX Runtime's own static quantizer on the float model (QDQ, uint8
  activations, int8 weights, per-tensor, calibrated on a few random batches drawn from
  the fixture's input distribution): a different function, the speed a user could get
  by giving up the QAT model;
* ``Brevitas QCDQ``: Brevitas's ``export_onnx_qcdq`` output, the baseline of every ratio;
* ``qonnx QCDQ``: qonnx's ``QuantToQCDQ`` on the QONNX export;
* ``qlower qcdq/<profile>`` for every QCDQ profile ``qlower.profiles`` defines,
  ``qlower qop``, and ``qlower qop`` of Brevitas's QCDQ export (QCDQ input), each verified
  on the fixture input (an unverified result is marked ``!``)

and reports, interleaved in the same rounds so that load on the machine hits every
variant alike:

1. ONNX Runtime latency at ORT_ENABLE_ALL with one intra-op thread, median over the
   rounds, as a share of Brevitas's QCDQ export, with the Conv/MatMul/Gemm units that
   ONNX Runtime runs as integer kernels in its saved optimized graph (``k/n int``);
2. with ``openvino`` importable, OpenVINO CPU latency (one thread, default precision and
   the f32 hint) beside ONNX Runtime's, and each one's largest difference from the QONNX
   reference on the fixture input;
3. the comparison of the QCDQ producers (Brevitas, qonnx, qlower): conversion time,
   QONNX nodes left, and the output difference from the QONNX reference at
   ORT_DISABLE_ALL on the fixture input.

Run with ``make bench`` (or ``python tests/benchmarks/bench_deployed.py [--models ...]
[--seconds S] [--json PATH]``). Latency is never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort

import qlower
from qlower.errors import VerificationError
from qlower.ir import is_qonnx_node
from qlower.reference import ReferenceExecutor

ROOT = Path(__file__).resolve().parents[2]
REAL_DIR = ROOT / "tests" / "fixtures" / "brevitas" / "real"
BASELINE = "Brevitas QCDQ"
QCDQ_TO_QOP = "qlower qop of Brevitas QCDQ"
# ORT's integer compute kernels, and the float ones the same units become otherwise
# (FusedConv etc. are ORT's Conv+activation fusions, NHWC forms from its layout pass).
INTEGER_KERNELS = {"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "QGemm"}
FLOAT_KERNELS = {"Conv", "FusedConv", "NhwcFusedConv", "NhwcConv", "MatMul", "FusedMatMul", "TransposeMatMul", "Gemm", "FusedGemm"}
CALIBRATION_BATCHES = 4


@dataclass
class Variant:
    """One deployable model of a fixture: where it is and what we learnt about it."""

    label: str
    path: Path
    note: str = ""  # "!" when qlower's verification did not pass
    convert_seconds: float | None = None
    qonnx_nodes_left: int | None = None
    kernels: tuple[int, int] | None = None  # (integer, integer + float) compute kernels
    ref_diff: tuple[float, float] | None = None  # (max abs diff, share of elements differing) at ORT_DISABLE_ALL
    error: str | None = None
    ort_ms: list[float] = field(default_factory=list)
    ov_ms: dict[str, list[float]] = field(default_factory=dict)
    ov_diff: dict[str, float] = field(default_factory=dict)  # vs the same file at ORT_DISABLE_ALL
    ov_error: str | None = None
    ort_fast_diff: float | None = None  # ORT_ENABLE_ALL vs ORT_DISABLE_ALL on the same file


def data_input_name(model: onnx.ModelProto) -> str:
    constants = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in constants)


def draw_inputs(entry: dict[str, Any], count: int, seed: int) -> list[np.ndarray]:
    """Batches from the fixture's input distribution (as generate_real.py drew them)."""
    rng = np.random.default_rng(seed)
    dist, shape = entry["input_distribution"], entry["input_shape"]
    if dist["kind"] == "normal":
        return [(rng.standard_normal(shape) * dist["std"] + dist["mean"]).astype(np.float32) for _ in range(count)]
    return [rng.uniform(dist["low"], dist["high"], shape).astype(np.float32) for _ in range(count)]


def session(path: Path, level: ort.GraphOptimizationLevel, optimized_path: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def kernel_counts(path: Path, work: Path) -> tuple[int, int]:
    """(integer, integer + float) compute kernels in ORT's saved ORT_ENABLE_ALL graph."""
    optimized = work / f"{path.stem}.optimized.onnx"
    session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, optimized)
    ops = Counter(node.op_type for node in onnx.load(str(optimized), load_external_data=False).graph.node)
    integer = sum(ops[op] for op in INTEGER_KERNELS)
    return integer, integer + sum(ops[op] for op in FLOAT_KERNELS)


def short_error(exc: Exception) -> str:
    """The informative line of an exception (OpenVINO's first lines only name source files)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = [line.split(" with a message:")[0] for line in lines if line.startswith(("-- ", "The "))]
    return f"{type(exc).__name__}: {' '.join(detail or lines[:1])[:200]}"


def compare(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    return float(diff.max()), float(np.mean(diff > 0))


# --------------------------------------------------------------------------- building variants


def ort_static_int8(float_path: Path, entry: dict[str, Any], out: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    name = data_input_name(onnx.load(str(float_path), load_external_data=False))

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(draw_inputs(entry, CALIBRATION_BATCHES, seed=1))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {name: batch}

    quantize_static(str(float_path), str(out), Batches(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=False)


def qonnx_quant_to_qcdq(model: onnx.ModelProto) -> onnx.ModelProto:
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.qonnx_to_qcdq import QuantToQCDQ

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ModelWrapper(model).transform(QuantToQCDQ()).model


def qcdq_profiles() -> list[str]:
    """The QCDQ profiles this qlower defines (only its default layout before profiles existed)."""
    try:
        from qlower.profiles import PROFILES
    except ImportError:
        return ["portable"]
    return [name for name, profile in PROFILES.items() if "qcdq" in profile.targets]


def qlower_variant(label: str, source: onnx.ModelProto, feeds: dict[str, np.ndarray], out: Path, **options: Any) -> Variant:
    note = ""
    try:
        result = qlower.convert(source, inputs=[feeds], batches=1, **options)
    except VerificationError:
        note = "!"
        result = qlower.convert(source, verify_result=False, **options)
    onnx.save(result.model, str(out))
    # conversion time without verification, comparable with qonnx's (which does not verify)
    seconds = sum(value for key, value in result.report.seconds.items() if key != "verify")
    return Variant(label, out, note=note, convert_seconds=seconds)


def build_variants(entry: dict[str, Any], work: Path) -> list[Variant]:
    name = entry["name"]
    source = onnx.load(str(REAL_DIR / entry["qonnx"]))
    feeds = {data_input_name(source): np.load(REAL_DIR / entry["input"])}
    variants: list[Variant] = []

    def attempt(label: str, path: Path, build: Callable[[], Variant | None]) -> None:
        try:
            variant = build() or Variant(label, path)
        except Exception as exc:  # a tool failing on a real model is a result to print
            variant = Variant(label, path, error=short_error(exc))
        variants.append(variant)

    if entry.get("float"):
        float_path = REAL_DIR / entry["float"]
        variants.append(Variant("float", float_path))
        attempt("ORT int8", work / f"{name}.ort_int8.onnx",
                lambda: ort_static_int8(float_path, entry, work / f"{name}.ort_int8.onnx"))
    if entry.get("qcdq"):
        variants.append(Variant(BASELINE, REAL_DIR / entry["qcdq"]))

    def qonnx_variant() -> Variant:
        qonnx_quant_to_qcdq(onnx.load(str(ROOT / "tests/fixtures/brevitas/linear_w8a8_pt.qonnx.onnx")))  # imports, untimed
        start = time.perf_counter()
        converted = qonnx_quant_to_qcdq(onnx.load(str(REAL_DIR / entry["qonnx"])))
        seconds = time.perf_counter() - start
        path = work / f"{name}.qonnx_qcdq.onnx"
        onnx.save(converted, str(path))
        left = sum(1 for node in converted.graph.node if is_qonnx_node(node))
        return Variant("qonnx QCDQ", path, convert_seconds=seconds, qonnx_nodes_left=left,
                       error=f"{left} QONNX nodes left" if left else None)

    attempt("qonnx QCDQ", work / f"{name}.qonnx_qcdq.onnx", qonnx_variant)
    for profile in qcdq_profiles():
        label = f"qlower qcdq/{profile}"
        path = work / f"{name}.qcdq_{profile}.onnx"
        options: dict[str, Any] = {"to": "qcdq"} if profile == "portable" else {"to": "qcdq", "profile": profile}
        attempt(label, path, lambda: qlower_variant(label, source, feeds, path, **options))
    path = work / f"{name}.qop.onnx"
    attempt("qlower qop", path, lambda: qlower_variant("qlower qop", source, feeds, path, to="qop"))
    if entry.get("qcdq"):  # QCDQ input: Brevitas's own export turned into QOps
        qcdq_source = onnx.load(str(REAL_DIR / entry["qcdq"]))
        qcdq_feeds = {data_input_name(qcdq_source): feeds[data_input_name(source)]}
        path = work / f"{name}.qcdq_to_qop.onnx"
        attempt(QCDQ_TO_QOP, path, lambda: qlower_variant(QCDQ_TO_QOP, qcdq_source, qcdq_feeds, path, to="qop"))
    return variants


# --------------------------------------------------------------------------- measuring


def openvino_runners(variant: Variant, x: np.ndarray) -> dict[str, Callable[[], Any]]:
    """OpenVINO CPU, one thread: default precision and the f32 hint ({} when unavailable)."""
    try:
        import openvino as ov
    except ImportError:
        return {}
    core = ov.Core()
    runners: dict[str, Callable[[], Any]] = {}
    for hint, extra in (("default", {}), ("f32", {"INFERENCE_PRECISION_HINT": "f32"})):
        # No CPU pinning: on a shared machine a pinned worker waits for its busy core
        # (measured: 6.9 ms wall for 0.9 ms of CPU time per inference under load).
        config = {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                  "ENABLE_CPU_PINNING": False, **extra}
        try:
            request = core.compile_model(str(variant.path), "CPU", config).create_infer_request()
            request.infer({0: x})
        except Exception as exc:
            variant.ov_ms[hint] = []
            variant.ov_diff[hint] = float("nan")
            variant.ov_error = short_error(exc)
            continue
        runners[hint] = (lambda r=request: r.infer({0: x}, share_inputs=True))
    return runners


def repetitions(run: Callable[[], Any]) -> int:
    """Runs per timed sample so that a sample takes about 2 ms (per-call overhead stays small)."""
    start = time.perf_counter()
    run()
    single = time.perf_counter() - start
    return max(1, min(50, int(0.002 / max(single, 1e-6))))


def measure(entry: dict[str, Any], variants: list[Variant], work: Path, seconds: float) -> None:
    x = np.load(REAL_DIR / entry["input"])
    source = onnx.load(str(REAL_DIR / entry["qonnx"]))
    reference = next(iter(ReferenceExecutor(source).run({data_input_name(source): x}).values()))
    runners: list[tuple[Variant, str, Callable[[], Any]]] = []
    for variant in variants:
        if variant.error:
            continue
        try:
            variant.kernels = kernel_counts(variant.path, work)
            exact = session(variant.path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
            unoptimized = exact.run(None, {exact.get_inputs()[0].name: x})[0]
            variant.ref_diff = compare(unoptimized, reference)
            fast = session(variant.path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
            feed = {fast.get_inputs()[0].name: x}
            variant.ort_fast_diff = compare(fast.run(None, feed)[0], unoptimized)[0]
        except Exception as exc:
            variant.error = f"ORT: {short_error(exc)}"
            continue
        runners.append((variant, "ort", (lambda s=fast, f=feed: s.run(None, f))))
        for hint, run in openvino_runners(variant, x).items():
            variant.ov_ms[hint] = []
            variant.ov_diff[hint] = compare(next(iter(run().values())), unoptimized)[0]
            runners.append((variant, hint, run))
    reps = [repetitions(run) for _, _, run in runners]  # also the warm-up
    start = time.perf_counter()
    rounds = 0
    while rounds < 5 or (time.perf_counter() - start < seconds and rounds < 200):
        for (variant, kind, run), count in zip(runners, reps):
            t0 = time.perf_counter()
            for _ in range(count):
                run()
            elapsed = (time.perf_counter() - t0) * 1e3 / count
            (variant.ort_ms if kind == "ort" else variant.ov_ms[kind]).append(elapsed)
        rounds += 1
    entry["rounds"] = rounds


# --------------------------------------------------------------------------- reporting


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def latency_cell(variant: Variant, baseline_ms: float | None) -> str:
    if variant.error:
        return f"- ({variant.error})"
    ms = median(variant.ort_ms)
    if ms is None:
        return "-"
    kernels = f" ({variant.kernels[0]}/{variant.kernels[1]} int)" if variant.kernels else ""
    if baseline_ms is None:  # no Brevitas QCDQ export (it refuses binary quantizers): milliseconds
        return f"{ms:.2f} ms{variant.note}{kernels}"
    return f"{ms / baseline_ms:.2f}{variant.note}{kernels}"


def diff_cell(diff: tuple[float, float] | None) -> str:
    if diff is None:
        return "-"
    return "exact" if diff[0] == 0 else f"{diff[0]:.3g} on {100 * diff[1]:.3g}% of elements"


def report(results: list[tuple[dict[str, Any], list[Variant]]]) -> None:
    labels: list[str] = []
    for _, variants in results:
        labels += [v.label for v in variants if v.label not in labels]
    print("\n## ONNX Runtime, ORT_ENABLE_ALL, 1 thread: latency as a share of Brevitas's QCDQ export "
          "(integer / all Conv-MatMul-Gemm kernels in ORT's optimized graph)\n")
    print("| model | " + " | ".join(labels) + " | Brevitas QCDQ ms | rounds |")
    print("|" + " --- |" * (len(labels) + 3))
    for entry, variants in results:
        by_label = {v.label: v for v in variants}
        base = by_label.get(BASELINE)
        base_ms = median(base.ort_ms) if base else None
        cells = [latency_cell(by_label[label], base_ms) if label in by_label else "n/a" for label in labels]
        print(f"| {entry['name']} | " + " | ".join(cells) + f" | {base_ms or float('nan'):.2f} | {entry.get('rounds', 0)} |")
    print("\n`!`: qlower's verification on the fixture input did not pass (timed unverified). A row "
          "without a Brevitas QCDQ export (Brevitas refuses one for binary quantizers) shows milliseconds. "
          "float and ORT int8 compute different functions (the float architecture, and ORT's own "
          "post-training quantization of it).")

    if any(v.ov_ms for _, variants in results for v in variants):
        print("\n## OpenVINO CPU beside ONNX Runtime, 1 thread: median ms, and each run's largest output "
              "difference from the same file at ORT_DISABLE_ALL on the fixture input\n")
        print("| model | variant | ORT ms | OpenVINO default ms | OpenVINO f32 ms | ORT_ENABLE_ALL diff | OV default diff | OV f32 diff |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for entry, variants in results:
            for v in variants:
                if v.error or not v.ov_ms:
                    continue
                cells = [median(v.ort_ms)] + [median(v.ov_ms.get(h, [])) for h in ("default", "f32")]
                ms = [f"{c:.2f}" if c is not None else "fails" for c in cells]
                diffs = [v.ort_fast_diff] + [v.ov_diff.get(h) for h in ("default", "f32")]
                shown = ["-" if d is None or d != d else f"{d:.3g}" for d in diffs]
                print(f"| {entry['name']} | {v.label} | " + " | ".join(ms + shown) + " |")
        failures: dict[str, list[str]] = {}
        for entry, variants in results:
            for v in variants:
                if v.ov_error:
                    failures.setdefault(v.label, []).append(entry["name"])
        for label, models in failures.items():
            example = next(v.ov_error for _, variants in results for v in variants if v.label == label and v.ov_error)
            print(f"\nOpenVINO cannot load {label} ({', '.join(models)}), e.g.: {example}")

    print("\n## QCDQ producers on the same models: conversion time, QONNX nodes left, and the output "
          "difference from the QONNX reference at ORT_DISABLE_ALL on the fixture input\n")
    producers = [label for label in labels if label not in ("float", "ORT int8")]
    print("| model | " + " | ".join(producers) + " |")
    print("|" + " --- |" * (len(producers) + 1))
    for entry, variants in results:
        by_label = {v.label: v for v in variants}
        cells = []
        for label in producers:
            v = by_label.get(label)
            if v is None:
                cells.append("n/a")
                continue
            parts = [f"{v.convert_seconds * 1e3:.0f} ms"] if v.convert_seconds is not None else []
            parts.append(v.error if v.error else diff_cell(v.ref_diff) + v.note)
            cells.append(", ".join(parts))
        print(f"| {entry['name']} | " + " | ".join(cells) + " |")
    print("\nBrevitas's QCDQ is exported from torch (no conversion time); its TruncAvgPool2d is a float "
          "AveragePool + round-half-even Q/DQ, a different function for FLOOR truncation (SPEC 5).")


def openvino_version() -> str:
    try:
        import openvino as ov
    except ImportError:
        return ", openvino not installed (no OpenVINO columns)"
    return f", openvino {ov.get_version().split('-')[0]}"


def machine() -> str:
    """CPU model, the integer-dot-product extensions ORT's kernels use, and the load."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{os.cpu_count()} CPUs"
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    flags = next((set(line.split(":", 1)[1].split()) for line in cpuinfo.splitlines() if line.startswith("flags")), set())
    extensions = ", ".join(f for f in ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f in flags) or "no VNNI/AMX"
    return f"{model} ({os.cpu_count()} CPUs; {extensions}); load average {os.getloadavg()[0]:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="fixture names (default: all in real/manifest.json)")
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("QLOWER_BENCH_SECONDS", 12)),
                        help="latency rounds per model run for about this long (at least 5 rounds)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args(argv)
    manifest = json.loads((REAL_DIR / "manifest.json").read_text())
    entries = [e for e in manifest if not args.models or e["name"] in args.models]
    print(f"deployed-model benchmark: onnxruntime {ort.__version__}{openvino_version()}; {machine()}; "
          f"{len(entries)} models, about {args.seconds:.0f} s of interleaved rounds each")
    results: list[tuple[dict[str, Any], list[Variant]]] = []
    with tempfile.TemporaryDirectory(prefix="qlower-bench-") as tmp:
        work = Path(tmp)
        for entry in entries:
            started = time.perf_counter()
            variants = build_variants(entry, work)
            measure(entry, variants, work, args.seconds)
            print(f"{entry['name']}: {len(variants)} variants, {entry['rounds']} rounds, "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
            results.append((entry, variants))
    report(results)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          "(above the CPU count, other processes shared the cores: read the ratios, not the ms)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([
            {"model": entry["name"], "rounds": entry["rounds"], "variants": [
                {"label": v.label, "error": v.error, "unverified": bool(v.note), "kernels": v.kernels,
                 "ort_ms_median": median(v.ort_ms), "openvino_ms_median": {h: median(m) for h, m in v.ov_ms.items()},
                 "openvino_max_diff_vs_ort_disable_all": v.ov_diff, "openvino_error": v.ov_error,
                 "ort_enable_all_max_diff_vs_disable_all": v.ort_fast_diff, "reference_diff": v.ref_diff, "convert_seconds": v.convert_seconds,
                 "qonnx_nodes_left": v.qonnx_nodes_left} for v in variants]}
            for entry, variants in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
