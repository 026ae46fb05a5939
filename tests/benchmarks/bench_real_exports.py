"""Benchmark: conversion time of real exports against onnx load + save of the same file (issue 9).

Issue 9's target: converting a real export (``qlower.convert(..., verify_result=False)``
writing its output, what ``qlower convert --no-verify`` does) costs at most 3x ``onnx.load``
+ ``onnx.save`` of the same file (the floor any tool that reads and writes the model pays).
The models are the Brevitas real exports (tests/fixtures/brevitas/real) and the zoo
(tests/data/zoo), for ``--to qcdq`` and ``--to qop``.

Two tables. The first is the issue's own measurement, as a user meets it: one process per
step, interpreter start and imports included, ``python -c "import onnx; onnx.save(onnx.load(a),
b)"`` against ``python -m qlower convert --no-verify a -o b`` (the CPU column is the child
process's user + system time), with Python's bytecode cached as an installed qlower has it
(see :func:`installed_environment`). The second runs every step in this one process after the
imports (interpreter start and ``import qlower`` excluded; the import time is printed once on
its own), which shows qlower's own per-call cost against a sub-millisecond floor. Runs are interleaved
(load+save, qcdq, qop, then again) so a load spike on a shared machine hits every column
alike, and each cell is the median of ``--repeats`` runs. Each cell gives wall time and the
process's CPU time (``time.process_time``, all threads): on a busy machine the wall ratios
swing with the load, the CPU ratios much less.

Run with ``make bench`` or ``python tests/benchmarks/bench_real_exports.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
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


def installed_environment(folder: Path) -> dict[str, str]:
    """The children's environment: Python's bytecode cached (in ``folder``), as an installed
    qlower has it. pip compiles a package's bytecode when it installs it, and an editable
    install writes it on first import, but with ``PYTHONDONTWRITEBYTECODE`` set (as some CI
    images and sandboxes do) every process would compile qlower's modules from source again
    (~70 ms here) while onnx, the floor, reads its installed bytecode."""
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    environment["PYTHONPYCACHEPREFIX"] = str(folder / "pycache")
    subprocess.run([sys.executable, "-c", "import qlower.cli"], env=environment, check=True)  # writes it
    return environment


def import_seconds(environment: dict[str, str]) -> float:
    """``import qlower`` in a fresh interpreter (what every CLI call pays before any work)."""
    code = "import time; start = time.perf_counter(); import qlower.cli; print(time.perf_counter() - start)"
    runs = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=environment).stdout)
            for _ in range(3)]
    return statistics.median(runs)


def run_process(command: list[str], environment: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + system of the child) of one process, which must succeed."""
    before = os.times()
    wall = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=environment)
    wall = time.perf_counter() - wall
    after = os.times()
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def print_table(title: str, rows: list[tuple[str, dict[tuple[str, str], list[float]]]], unit: float, worst: dict[str, float]) -> None:
    """One line per model: the floor and each target with its ratio to the floor, wall | cpu."""
    print(title)
    print(f"{'':32} {'wall':>35} | {'cpu':>35}")
    print(f"{'model':32} " + " | ".join([f"{'load+save':>9} {'qcdq':>7} {'/floor':>5} {'qop':>7} {'/floor':>5}"] * 2))
    for name, times in rows:
        cells = []
        for clock in ("wall", "cpu"):
            median = {step: statistics.median(times[clock, step]) for step in ("floor", *TARGETS)}
            ratios = {to: median[to] / median["floor"] for to in TARGETS}
            worst[clock] = max(worst[clock], *ratios.values())
            cells.append(f"{median['floor'] * unit:9.1f} " + " ".join(f"{median[to] * unit:7.1f} {ratios[to]:4.1f}x" for to in TARGETS))
        print(f"{name:32} " + " | ".join(cells))
        sys.stdout.flush()


def model_name(path: Path) -> str:
    return path.name.removesuffix(".onnx").removesuffix(".qonnx")


def cli_table(repeats: int, folder: Path, environment: dict[str, str]) -> dict[str, float]:
    """The issue's measurement: each step a process of its own, interpreter start and imports included."""
    target = str(folder / "cli.onnx")
    floor = "import sys, onnx; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])"
    worst = {"wall": 0.0, "cpu": 0.0}
    rows = []
    for path in models():
        commands = {
            "floor": [sys.executable, "-c", floor, str(path), target],
            **{to: [sys.executable, "-m", "qlower", "convert", "--no-verify", "--to", to, str(path), "-o", target] for to in TARGETS},
        }
        times: dict[tuple[str, str], list[float]] = {(clock, step): [] for clock in worst for step in commands}
        for _ in range(repeats):
            for step, command in commands.items():
                wall, cpu = run_process(command, environment)
                times["wall", step].append(wall)
                times["cpu", step].append(cpu)
        rows.append((model_name(path), times))
    print_table(
        f"one process per step (python -c onnx load+save | python -m qlower convert --no-verify), median of {repeats} interleaved runs, ms",
        rows, 1e3, worst,
    )
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-cli", action="store_true", help="Skip the one-process-per-step table.")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="qlower-real-"))
    try:
        environment = installed_environment(folder)
        print(f"import qlower.cli in a fresh interpreter: {import_seconds(environment) * 1e3:.0f} ms (paid once per CLI call)")
        if not args.no_cli:
            worst = cli_table(args.repeats, folder, environment)
            print(f"largest ratio to load+save, one process per step: wall {worst['wall']:.1f}x, cpu {worst['cpu']:.1f}x (issue 9's target: 3x)")
        worst = in_process_table(args.repeats, folder)
        print(f"largest ratio to load+save, in process: wall {worst['wall']:.1f}x, cpu {worst['cpu']:.1f}x")
    finally:
        shutil.rmtree(folder)
    return 0


def in_process_table(repeats: int, folder: Path) -> dict[str, float]:
    """Every step in this process after the imports: qlower's own per-call cost."""

    import onnx

    import qlower

    worst = {"wall": 0.0, "cpu": 0.0}
    rows = []
    target = folder / "out.onnx"
    for path in models():
        steps: dict[str, Callable[[], object]] = {
            "floor": lambda: onnx.save(onnx.load(str(path)), str(target)),
            **{to: (lambda to=to: qlower.convert(path, to=to, verify_result=False, output_path=target)) for to in TARGETS},
        }
        times: dict[tuple[str, str], list[float]] = {(clock, step): [] for clock in worst for step in steps}
        for _ in range(repeats):
            for step, run in steps.items():
                wall, cpu = time.perf_counter(), time.process_time()
                run()
                times["wall", step].append(time.perf_counter() - wall)
                times["cpu", step].append(time.process_time() - cpu)
        rows.append((model_name(path), times))
    print_table(f"in this process (no verification), median of {repeats} interleaved runs, ms", rows, 1e3, worst)
    return worst


if __name__ == "__main__":
    sys.exit(main())
