"""The ``qlower`` command line: a thin layer over :func:`qlower.pipeline.convert` and ``verify``.

Exit codes: 0 success, 1 verification failed, 2 input refused or output not writable (one
line on stderr naming the node or path and the reason, never a traceback, never a partial
output file).

When ``-o -`` or ``--report -`` sends an output to stdout, everything else the command
prints (tables, "wrote ...") goes to stderr, and fd 1 is reserved for that output.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import ir, output
from .errors import OutputError, QlowerError, VerificationError
from .pipeline import TARGETS, ConversionReport, convert
from .profiles import PROFILES, RUNTIMES
from .progress import for_terminal as progress_display
from .report_schema import qlower_version

if TYPE_CHECKING:  # inspection and verification are imported by the commands that use them
    from .inspection import InspectionReport
    from .verification import VerificationReport

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
stdout = Console()
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(exc: QlowerError) -> typer.Exit:
    stderr.print(f"qlower: error [{type(exc).__name__}]: {exc}", markup=False)
    return typer.Exit(exc.exit_code)


def _write_json(path: Path, payload: dict[str, object], protect: list[str]) -> None:
    output.write_text(path, json.dumps(payload, indent=2, default=str) + "\n", protect=protect)


def _to_stdout(*paths: Optional[Path | str]) -> bool:
    names = [os.fspath(path) for path in paths if path is not None]
    if names.count(output.STDOUT) > 1:
        raise OutputError("-: the model and the report cannot both go to standard output; give one a file path")
    return output.STDOUT in names


def _summary_console(*paths: Optional[Path | str]) -> Console:
    """Where tables go: stdout, unless an output is piped there."""
    return stderr if _to_stdout(*paths) else stdout


# Beyond this many records a summary table shows one row per kind of record (what they
# became, and why) with how many there are, instead of one row each: a terminal shows about
# this many rows, and rich takes about 0.4 ms to lay out a row (printing a 10k-node chain's
# 5,000 quantizers took longer than converting it). Every record is in --report.
ROWS_PER_RECORD_MAX = 40


def _record_table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]], kind: str) -> Table:
    """``rows`` (node first, then what describes it) as a table: one row each, or, past
    :data:`ROWS_PER_RECORD_MAX`, one per distinct description with its count and first node,
    in order of first appearance."""
    if len(rows) <= ROWS_PER_RECORD_MAX:
        table = Table(title=title)
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*row)
        return table
    counts: Counter[tuple[str, ...]] = Counter(row[1:] for row in rows)
    first_node: dict[tuple[str, ...], str] = {}
    for row in rows:
        first_node.setdefault(row[1:], row[0])
    table = Table(title=f"{title}: {len(rows)} {kind} of {len(counts)} kinds (each one: --report FILE)")
    for column in (kind, *columns[1:], f"first {columns[0]}"):
        table.add_column(column, overflow="fold")
    for description, count in counts.items():  # (a Counter keeps the order of first appearance)
        table.add_row(str(count), *description, first_node[description])
    return table


def _print_conversion(report: ConversionReport, quiet: bool, console: Console) -> None:
    if quiet:
        return
    rows = [
        (record.node, record.op, record.role, "" if record.bits is None else f"{record.bits:g}",
         f"{record.emitted}" + ("  [float path]" if record.float_path else ""))
        for record in report.quantizers
    ]
    title = f"qlower --to {report.target} --profile {report.profile.name}: opset {report.input_opset} -> {report.output_opset}"
    console.print(_record_table(title, ("node", "op", "role", "bits", "became"), rows, "quantizers"))
    if report.profile.name != "portable":
        settings = ", ".join(f"{s.runtime} {s.name}={s.value}" for s in report.profile.runtime_settings)
        console.print(f"profile {report.profile.name} assumes {settings}", markup=False)
    if report.unit_records:
        units = [tuple(str(unit.get(key) or "") for key in ("node", "op", "became", "reason")) for unit in report.unit_records]
        console.print(_record_table("compute units", ("node", "op", "became", "reason"), units, "units"))


def _print_verification(report: VerificationReport, quiet: bool, console: Console) -> None:
    if quiet:
        return
    table = Table(title=f"verification on {report.runtime} ({report.batches} batches, target {report.target})")
    for column in ("output", "level", "max |diff|", "max LSB", "differing"):
        table.add_column(column)
    for row in report.outputs:
        lsb = "-" if row.max_lsb_diff is None else f"{row.max_lsb_diff:g}"
        table.add_row(row.name, row.level, f"{row.max_abs_diff:g}", lsb, f"{row.differing_share:.2%}")
    console.print(table)
    for summary in report.to_dict()["internal_summary"]:  # type: ignore[union-attr]
        worst = summary["worst"]
        text = f"internal at {summary['level']}: {summary['tensors']} quantized activations, {summary['differing_share']:.2%} of {summary['elements']} elements differ"
        console.print(text + (f"; worst {worst['node']!r}: {worst['max_lsb_diff']} LSB" if worst else ""), markup=False)
    if report.kernels is not None:
        console.print(report.kernels.summary(), markup=False)
        for unit in report.kernels.float_units:
            console.print(f"  float {unit.op} {unit.node!r}: {unit.why}", markup=False)
    for advisory in report.advisories:
        console.print(f"advisory, not held: {advisory.summary()}", markup=False)
    for note in report.notes:
        console.print(f"note: {note}", markup=False)
    if report.first_divergence is not None:
        console.print(report.first_divergence.line(), markup=False)
    console.print("[green]verified[/green]" if report.passed else "[red]verification failed[/red]")


def _show_version(value: bool) -> None:
    if value:
        stdout.print(f"qlower {qlower_version()}", markup=False, highlight=False)
        raise typer.Exit(0)


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Lower QONNX models to standard, verified ONNX."""


def _bits(value: object) -> str:
    return "float" if value is None else f"{value:g}"


def _flags(label: str) -> str:
    """An inspect report label ("qcdq", "qcdq/ort") as the options that select it."""
    target, _, profile = label.partition("/")
    return f"--to {target}" + (f" --profile {profile}" if profile else "")


def _print_inspection(report: InspectionReport) -> None:
    data = report.to_dict()
    targets = list(report.lowerings)
    described = []
    for q in report.quantizers:
        layout = f"per-channel, axis {q['axis']}" if q["layout"] == "per-channel" else str(q["layout"])
        zero_point = q["zero_point"]
        shown_zp = f"{len(zero_point)} values" if isinstance(zero_point, list) else f"{zero_point:g}"
        signed = ("yes" if q["signed"] else "no") + (", narrow" if q["narrow"] else "")
        described.append((str(q["node"]), str(q["op"]), str(q["role"]), _bits(q["bits"]), signed, layout, shown_zp, str(q["rounding_mode"] or "-")))
    stdout.print(_record_table(
        f"{report.model or 'model'}: {len(report.quantizers)} quantizers (opset {report.opset})",
        ("node", "op", "role", "bits", "signed", "layout", "zero point", "rounding"), described, "quantizers"))
    for target in targets:
        if report.lowerings[target]["refused"]:
            continue
        base = str(report.lowerings[target]["target"])
        rows = [q for q in report.quantizers if target == base or q["lowerings"][target] != q["lowerings"].get(base)]
        if not rows:
            stdout.print(f"{_flags(target)}: every quantizer as with --to {base}", markup=False)
            continue
        differing = "" if target == base else f" (where it differs from --to {base})"
        became = []
        for q in rows:
            entry = q["lowerings"][target]
            why = "; ".join(f"{s['pass']}: {s['reason']}" for s in entry["skipped"]) or "-"
            became.append((str(q["node"]), str(entry["lowered_by"]), str(entry["emitted"]) + (" [float path]" if entry["float_path"] else ""), why))
        stdout.print(_record_table(f"what {_flags(target)} makes of each quantizer{differing}",
                                   ("node", "pass", "becomes", "why not an earlier pass"), became, "quantizers"))
    fusing = [t for t in targets if any(t in unit.lowerings for unit in report.units)]
    if report.units:
        units = []
        for unit in report.units:
            kernels = []
            for target in fusing:
                entry = unit.lowerings[target]
                kernels.append(str(entry["became"]) if entry["integer_kernel"] else f"stays QCDQ: {entry['reason']}")
            units.append((unit.node, unit.op, _bits(unit.activation_bits), _bits(unit.weight_bits),
                          "?" if unit.macs is None else f"{unit.macs:,}", "?" if unit.weight_params is None else f"{unit.weight_params:,}", *kernels))
        stdout.print(_record_table("compute units (MACs as qonnx's inference_cost counts them, dense)",
                                   ("node", "op", "act bits", "weight bits", "MACs", "weight params", *(_flags(t) for t in fusing)), units, "units"))
    summary = data["summary"]
    cost = Table(title="summary by bit width")
    for column in ("act bits", "weight bits", "units", "MACs", "weight params"):
        cost.add_column(column)
    for row in summary["cost"]:
        cost.add_row(_bits(row["activation_bits"]), _bits(row["weight_bits"]), str(row["units"]), f"{row['macs']:,}", f"{row['weight_params']:,}")
    cost.add_row("total", "", str(len(report.units)), f"{summary['total_macs']:,}", f"{summary['total_weight_params']:,}")
    stdout.print(cost)
    counts = ", ".join(f"{c['count']} {c['role']} {c['op']} {_bits(c['bits'])}-bit" for c in summary["quantizers_by_bits"])
    stdout.print(f"quantizers: {counts}")
    for target, lowering in report.lowerings.items():
        if lowering["refused"]:
            stdout.print(f"{_flags(target)}: refused: {lowering['refused']}", markup=False)
            continue
        kernels = lowering["ort_kernels"]
        fused = sum(1 for unit in report.units if unit.lowerings.get(target, {}).get("integer_kernel"))
        line = f"{_flags(target)}: ONNX Runtime (ORT_ENABLE_ALL) runs {kernels['integer']} integer and {kernels['float']} float compute kernels"
        if target in fusing:
            line += f"; qlower fuses {fused} of {len(report.units)} units"
        stdout.print(line, markup=False)


@app.command("inspect")
def inspect_command(
    model: Path = typer.Argument(..., help="QONNX (or QCDQ) model to describe (.onnx)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables."),
) -> None:
    """Describe MODEL: every quantizer and what each target makes of it, costs per bit width."""
    from .inspection import inspect

    try:
        report = inspect(model)
    except QlowerError as exc:
        raise _fail(exc) from None
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    else:
        _print_inspection(report)


@app.command("convert")
def convert_command(
    model: Path = typer.Argument(..., help="QONNX model to lower (.onnx)."),
    to: str = typer.Option("qcdq", "--to", help=f"Target form: {', '.join(TARGETS)}."),
    output_path: Optional[Path] = typer.Option(
        None, "-o", "--output",
        help="Output file, symlink (target rewritten), device/FIFO, '-' for stdout, or a directory "
        "(default: <model>.<target>.onnx beside the model).",
    ),
    opset: Optional[int] = typer.Option(None, "--opset", help="Minimum output opset (21+ enables int16 activations)."),
    profile: str = typer.Option(
        "portable", "--profile",
        help=f"Runtime the QCDQ layout is tuned for: {', '.join(PROFILES)} (non-portable profiles need --to qcdq).",
    ),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip verification against the reference executor."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="Verify on these inputs (.npz) instead of random ones."),
    batches: int = typer.Option(16, "--batches", min=1, help="Random input batches to verify on."),
    seed: int = typer.Option(0, "--seed", help="Seed for random verification inputs."),
    tolerance_lsb: float = typer.Option(1.0, "--tolerance-lsb", min=0.0, help="Allowed difference, in output LSBs, where exactness is not required."),
    check_optimized: bool = typer.Option(
        True, "--check-optimized/--no-check-optimized",
        help="Also verify at ORT_ENABLE_ALL (ONNX Runtime's own fusions), within --tolerance-lsb.",
    ),
    x86_without_vnni: bool = typer.Option(
        False, "--x86-without-vnni",
        help="qop: keep int8 weights exact on x86 CPUs without VNNI (|w| <= 64, else slower uint8 weights).",
    ),
    runtime: str = typer.Option("onnxruntime", "--runtime", help=f"Verify on this runtime: {', '.join(RUNTIMES)} (openvino: pip install 'qlower[openvino]')."),
    report_path: Optional[Path] = typer.Option(None, "--report", help="Write the per-node report as JSON ('-' for stdout)."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Print nothing on success."),
    strict: bool = typer.Option(False, "--strict", help="Refuse (exit 2) any quantizer that would take the exact float path."),
) -> None:
    """Lower MODEL to standard ONNX; verify it; write it only if everything holds."""
    try:
        console = _summary_console(output_path, report_path)
        target_path = output.output_file_for(output_path or model.with_name(output.default_name(model.name, to)), str(model), to)
        if report_path is not None:  # an unusable report path is refused before the model is written
            output.check(report_path, protect=[str(model), target_path])
    except QlowerError as exc:
        raise _fail(exc) from None
    with output.reserve_stdout() if console is stderr else contextlib.nullcontext():
        _convert_and_report(
            model, to, target_path, report_path, console, quiet, opset=opset, profile=profile, verify_result=not no_verify, inputs=inputs,
            batches=batches, seed=seed, tolerance_lsb=tolerance_lsb, check_optimized=check_optimized,
            x86_without_vnni=x86_without_vnni,
            runtime=runtime, strict=strict,
        )


def _convert_and_report(
    model: Path, to: str, target_path: str, report_path: Optional[Path], console: Console, quiet: bool,
    inputs: Optional[Path], **options: object,
) -> None:
    protect = [str(model), target_path]
    try:
        feeds = None
        if inputs is not None:
            from .verification import load_inputs_npz

            feeds = load_inputs_npz(inputs, model)
        with progress_display(stderr, quiet) as progress:
            result = convert(model, to, output_path=target_path, inputs=feeds, progress=progress, **options)  # type: ignore[arg-type]
    except VerificationError as exc:
        report = exc.report
        try:
            if isinstance(report, ConversionReport):
                _print_conversion(report, quiet, console)
                if report.verification is not None:
                    _print_verification(report.verification, quiet, console)
                if report_path is not None:
                    _write_json(report_path, report.to_dict(), protect)
        except OutputError as report_exc:
            raise _fail(report_exc) from None
        raise _fail(exc) from None
    except QlowerError as exc:
        raise _fail(exc) from None
    _print_conversion(result.report, quiet, console)
    if result.report.verification is not None:
        _print_verification(result.report.verification, quiet, console)
    try:
        if report_path is not None:
            _write_json(report_path, result.report.to_dict(), protect)
    except OutputError as exc:
        raise _fail(exc) from None
    if not quiet:
        where = "standard output" if result.report.output_path == output.STDOUT else result.report.output_path
        console.print(f"wrote {where}", markup=False)


@app.command("check")
def check_command(
    models: list[Path] = typer.Argument(..., help="QONNX models to check (.onnx)."),
    to: str = typer.Option("qcdq", "--to", help=f"Target form: {', '.join(TARGETS)}."),
    batches: int = typer.Option(4, "--batches", min=1, help="Random input batches to verify each model on."),
    seed: int = typer.Option(0, "--seed"),
    tolerance_lsb: float = typer.Option(1.0, "--tolerance-lsb", min=0.0),
    check_optimized: bool = typer.Option(True, "--check-optimized/--no-check-optimized"),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Print only failures."),
) -> None:
    """Convert and verify each MODEL, writing nothing (a pre-commit hook and CI gate).

    One line per model; the exit code is the worst one (1 verification failed, 2 refused).
    """
    worst = 0
    for model in models:
        try:
            result = convert(model, to, batches=batches, seed=seed, tolerance_lsb=tolerance_lsb, check_optimized=check_optimized)
        except QlowerError as exc:
            where = "" if str(exc).startswith(str(model)) else f"{model}: "
            stderr.print(f"qlower: error [{type(exc).__name__}]: {where}{exc}", markup=False)
            worst = max(worst, exc.exit_code)
            continue
        if not quiet:
            stdout.print(f"{model}: ok (--to {to}, {len(result.report.quantizers)} quantizers lowered and verified)", markup=False, soft_wrap=True)
    raise typer.Exit(worst)


@app.command("verify")
def verify_command(
    original: Path = typer.Argument(..., help="The QONNX model."),
    lowered: Path = typer.Argument(..., help="The lowered model to check against it."),
    to: str = typer.Option("qcdq", "--to", help="Which rules apply: qcdq (exact) or qop (within --tolerance-lsb)."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="Inputs (.npz) instead of random ones."),
    batches: int = typer.Option(16, "--batches", min=1),
    seed: int = typer.Option(0, "--seed"),
    tolerance_lsb: float = typer.Option(1.0, "--tolerance-lsb", min=0.0),
    check_optimized: bool = typer.Option(
        True, "--check-optimized/--no-check-optimized",
        help="Also verify at ORT_ENABLE_ALL (ONNX Runtime's own fusions), within --tolerance-lsb.",
    ),
    runtime: str = typer.Option("onnxruntime", "--runtime", help=f"Run LOWERED on: {', '.join(RUNTIMES)}."),
    report_path: Optional[Path] = typer.Option(None, "--report", help="Write the verification report as JSON."),
    quiet: bool = typer.Option(False, "-q", "--quiet"),
) -> None:
    """Check LOWERED against the QONNX reference running ORIGINAL; exit 1 on a mismatch."""
    from .verification import load_inputs_npz, verify

    protect = [str(original), str(lowered)]
    try:
        console = _summary_console(report_path)
        if report_path is not None:
            output.check(report_path, protect=protect)
    except QlowerError as exc:
        raise _fail(exc) from None
    with output.reserve_stdout() if console is stderr else contextlib.nullcontext():
        try:
            feeds = load_inputs_npz(inputs, original) if inputs is not None else None
            with progress_display(stderr, quiet) as progress:
                report = verify(
                    ir.load_model(original), ir.load_model(lowered), target=to, inputs=feeds,
                    batches=batches, seed=seed, tolerance_lsb=tolerance_lsb, check_optimized=check_optimized, runtime=runtime,
                    progress=progress,
                )
            _print_verification(report, quiet, console)
            if report_path is not None:
                _write_json(report_path, report.to_dict(), protect)
        except QlowerError as exc:
            raise _fail(exc) from None
    if not report.passed:
        stderr.print(f"qlower: error [VerificationError]: {report.failure_message()}", markup=False)
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point; internal errors still get one line, not a traceback."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # a bug in qlower, reported as one line with a distinct code
        stderr.print(f"qlower: internal error [{type(exc).__name__}]: {exc}", markup=False)
        sys.exit(3)
