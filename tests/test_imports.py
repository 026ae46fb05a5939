"""What a command imports: ``qlower convert --no-verify`` of a model with nothing for ONNX
Runtime to evaluate must not import it (about 100 ms of every CLI call, issue 9)."""

from __future__ import annotations

import subprocess
import sys

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
