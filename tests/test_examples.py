"""The examples that need no torch run as documented: the zoo script, the CI gate, the pre-commit hook.

(`make examples` also runs the Brevitas export pipeline, after installing torch and brevitas.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnx

from paths import ZOO_DIR
from test_cli import single_quant_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, QLOWER_VERIFY_BATCHES="4", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(list(args), capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


def test_zoo_to_onnxruntime_example() -> None:
    proc = run(sys.executable, str(EXAMPLES / "zoo_to_onnxruntime.py"))
    assert proc.returncode == 0, proc.stderr
    assert "8 quantizers lowered to --to qop, verified" in proc.stdout
    assert "predicted class" in proc.stdout


def test_ci_gate_lowers_verifies_and_fails_on_error(tmp_path: Path) -> None:
    models, out = tmp_path / "models", tmp_path / "lowered"
    models.mkdir()
    shutil.copy(ZOO_DIR / "TFC_2W2A.onnx", models / "tfc.onnx")
    proc = run("bash", str(EXAMPLES / "ci" / "qlower_gate.sh"), str(models), str(out), "qop")
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} == {"tfc.qop.onnx", "tfc.qop.json", "tfc.qop.verify.json"}

    onnx.save(single_quant_model(0.0), str(models / "zero_scale.onnx"))
    proc = run("bash", str(EXAMPLES / "ci" / "qlower_gate.sh"), str(models), str(out), "qop")
    assert proc.returncode == 2
    assert "InvalidQuantizerError" in proc.stderr
    assert not (out / "zero_scale.qop.onnx").exists()


def test_workflow_runs_the_gate() -> None:
    workflow = (EXAMPLES / "ci" / "qlower.yml").read_text()
    assert "bash ci/qlower_gate.sh models lowered ${{ matrix.target }}" in workflow


def test_pre_commit_hook_entry(tmp_path: Path) -> None:
    hooks = (ROOT / ".pre-commit-hooks.yaml").read_text()
    entry = re.search(r"^\s*entry:\s*(.+)$", hooks, re.M)
    files = re.search(r"^\s*files:\s*(.+)$", hooks, re.M)
    assert entry and files
    assert re.search(files.group(1).strip(), "models/net.onnx")
    good = ZOO_DIR / "TFC_1W1A.onnx"
    bad = tmp_path / "zero_scale.onnx"
    onnx.save(single_quant_model(0.0), str(bad))
    command = entry.group(1).split()
    proc = run(*command, str(good))
    assert proc.returncode == 0, proc.stderr
    assert not list(ZOO_DIR.glob("TFC_1W1A.*.onnx"))  # the hook writes nothing
    proc = run(*command, str(good), str(bad))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "zero_scale.onnx" in proc.stderr and "act_quant" in proc.stderr
