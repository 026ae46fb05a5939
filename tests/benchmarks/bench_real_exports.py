"""Benchmark: conversion time of real exports against onnx load + save of the same file (issue 9).

Issue 9's target: converting a real export (``qlower.convert(..., verify_result=False)``
writing its output, what ``qlower convert --no-verify`` does) costs at most 3x ``onnx.load``
+ ``onnx.save`` of the same file (the floor any tool that reads and writes the model pays).
The models are the Brevitas real exports (tests/fixtures/brevitas/real) and the zoo
(tests/data/zoo), for ``--to qcdq`` and ``--to qop``.

All steps run in this one process after the imports (so interpreter start and ``import
qlower`` are excluded; the import time is printed once on its own). Runs are interleaved
(load+save, qcdq, qop, then again) so a load spike on a shared machine hits every column
alike, and each cell is the median of ``--repeats`` runs. Each cell gives wall time and the
process's CPU time (``time.process_time``, all threads): on a busy machine the wall ratios
swing with the load, the CPU ratios much less.

Run with ``make bench`` or ``python tests/benchmarks/bench_real_exports.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ("qcdq", "qop")


def models() -> list[Path]:
    real = sorted((ROOT / "tests/fixtures/brevitas/real").glob("*.qonnx.onnx"))
    zoo = sorted((ROOT / "tests/data/zoo").glob("*.onnx"))
    return real + zoo


def import_seconds() -> float:
    """``import qlower`` in a fresh interpreter (what every CLI call pays before any work)."""
    code = "import time; start = time.perf_counter(); import qlower.cli; print(time.perf_counter() - start)"
    runs = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) for _ in range(3)]
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"import qlower.cli in a fresh interpreter: {import_seconds() * 1e3:.0f} ms (paid once per CLI call)")

    import onnx

    import qlower

    folder = Path(tempfile.mkdtemp(prefix="qlower-real-"))
    print(f"conversion of real exports (no verification), median of {args.repeats} interleaved runs, ms")
    print(f"{'':32} {'wall':>35} | {'cpu':>35}")
    print(f"{'model':32} " + " | ".join([f"{'load+save':>9} {'qcdq':>7} {'/floor':>5} {'qop':>7} {'/floor':>5}"] * 2))
    worst = {"wall": 0.0, "cpu": 0.0}
    try:
        for path in models():
            target = folder / "out.onnx"
            steps: dict[str, Callable[[], object]] = {
                "floor": lambda: onnx.save(onnx.load(str(path)), str(target)),
                **{to: (lambda to=to: qlower.convert(path, to=to, verify_result=False, output_path=target)) for to in TARGETS},
            }
            times: dict[tuple[str, str], list[float]] = {(clock, name): [] for clock in worst for name in steps}
            for _ in range(args.repeats):
                for name, step in steps.items():
                    wall, cpu = time.perf_counter(), time.process_time()
                    step()
                    times["wall", name].append(time.perf_counter() - wall)
                    times["cpu", name].append(time.process_time() - cpu)
            cells = []
            for clock in worst:
                median = {name: statistics.median(times[clock, name]) for name in steps}
                ratios = {to: median[to] / median["floor"] for to in TARGETS}
                worst[clock] = max(worst[clock], *ratios.values())
                cells.append(f"{median['floor'] * 1e3:9.1f} " + " ".join(
                    f"{median[to] * 1e3:7.1f} {ratios[to]:4.1f}x" for to in TARGETS))
            name = path.name.removesuffix(".onnx").removesuffix(".qonnx")
            print(f"{name:32} " + " | ".join(cells))
            sys.stdout.flush()
    finally:
        for produced in folder.iterdir():
            produced.unlink()
        folder.rmdir()
    print(f"largest ratio to load+save: wall {worst['wall']:.1f}x, cpu {worst['cpu']:.1f}x (issue 9's target: 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
