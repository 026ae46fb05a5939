"""What a command imports: ``qlower convert --no-verify`` of a model with nothing for ONNX
Runtime to evaluate must not import it (about 100 ms of every CLI call, issue 9), nor the
verification package, nor rich's progress bar when none is drawn (issue 9: the CLI against
onnx load+save)."""

from __future__ import annotations

import subprocess
import sys

from pathlib import Path

from paths import ZOO_DIR as ZOO


def _modules_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_importing_qlower_does_not_import_onnxruntime() -> None:
    assert "onnxruntime" not in _modules_after("import qlower, qlower.cli")


def test_convert_without_verification_imports_onnxruntime_only_when_it_runs_a_session(tmp_path) -> None:
    convert = "import qlower; qlower.convert({!r}, to='qop', verify_result=False, output_path={!r})"
    # kwsmlp has no constant subgraph to fold: no session at all
    assert "onnxruntime" not in _modules_after(convert.format(str(ZOO / "kwsmlp_w3a3.onnx"), str(tmp_path / "a.onnx")))
    # verification runs ORT, so it is imported then
    verified = "import qlower; qlower.convert({!r}, to='qcdq', batches=1)".format(str(ZOO / "kwsmlp_w3a3.onnx"))
    assert "onnxruntime" in _modules_after(verified)


def _modules_after_cli(args: list[str], listing: Path) -> set[str]:
    """The modules of a ``python -m qlower ARGS`` process when it exits, stdout and stderr piped (not terminals)."""
    probe = (
        "import atexit, runpy, sys\n"
        f"atexit.register(lambda: open({str(listing)!r}, 'w').write(' '.join(sorted(sys.modules))))\n"
        f"sys.argv = ['qlower', *{args!r}]\n"
        "runpy.run_module('qlower', run_name='__main__', alter_sys=True)\n"
    )
    subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(listing.read_text().split())


def test_cli_convert_without_verification_imports_neither_verification_nor_the_progress_bar(tmp_path) -> None:
    model = str(ZOO / "kwsmlp_w3a3.onnx")
    modules = _modules_after_cli(["convert", "--no-verify", model, "-o", str(tmp_path / "a.onnx")], tmp_path / "no-verify.txt")
    assert (tmp_path / "a.onnx").exists()
    assert {"qlower.verification", "qlower.inspection", "rich.progress"}.isdisjoint(modules)
    # the same probe sees verification imported when the command verifies
    verified = _modules_after_cli(["convert", "--batches", "1", model, "-o", str(tmp_path / "b.onnx")], tmp_path / "verify.txt")
    assert "qlower.verification" in verified
