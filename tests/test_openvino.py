"""Verification on OpenVINO (the optional runtime): same rules and report as ONNX Runtime's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import qlower
from helpers import make_quant_model
from paths import BREVITAS_DIR
from qlower.errors import UnsupportedError
from qlower.profiles import OPENVINO, openvino_config
from qlower.verification import runners, verify

openvino = pytest.importorskip("openvino")


def test_verify_on_openvino_fails_the_portable_layout_of_the_signed_4bit_deployment_net_and_passes_the_openvino_profile(tmp_path: Path) -> None:
    # OpenVINO computes QuantizeLinear as a FakeQuantize (a reciprocal multiply): with a
    # step that is not a power of two, ties of the graph input go the other way. The input
    # quantizer is one IEEE division per element, so the verifier holds it bit-identical on
    # every runtime; the openvino profile quantizes that input by exact thresholds.
    fixture = BREVITAS_DIR / "real" / "deploy_w4a4_signed.qonnx.onnx"
    portable, tuned = tmp_path / "net.qcdq.onnx", tmp_path / "net.openvino.onnx"
    onnx.save(qlower.convert(fixture, verify_result=False).model, str(portable))
    onnx.save(qlower.convert(fixture, profile="openvino", verify_result=False).model, str(tuned))
    base = [sys.executable, "-m", "qlower", "verify", str(fixture)]
    assert subprocess.run([*base, str(portable), "--batches", "2"], capture_output=True).returncode == 0
    proc = subprocess.run([*base, str(portable), "--batches", "2", "--runtime", "openvino"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip()
    assert f"first divergence at {runners.OPENVINO_F32}: node '/layers/layers.0/act_quant" in line  # where it began
    assert "quantizes a graph input" in line
    assert "verification on openvino" in proc.stdout
    bf16_default = runners.OpenVinoRunner(None).default_hint() != "f32"
    assert ("advisory, not held: OPENVINO_CPU_DEFAULT" in proc.stdout) == bf16_default
    report = verify(fixture, tuned, runtime="openvino", batches=2)
    assert report.passed, report.failures
    summary = report.to_dict()["internal_summary"][0]
    assert summary["tensors"] == 7 and summary["differing"] == 0 and summary["end_to_end_differing"] == 0  # type: ignore[index]


def test_the_openvino_profile_keeps_every_conv_of_the_signed_4bit_deployment_net_on_int8() -> None:
    fixture = BREVITAS_DIR / "real" / "deploy_w4a4_signed.qonnx.onnx"
    model = qlower.convert(fixture, profile="openvino", verify_result=False).model
    core = openvino.Core()
    compiled = core.compile_model(core.read_model(model.SerializeToString()), "CPU", openvino_config(OPENVINO))
    executed = [(op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str)) for op in compiled.get_runtime_model().get_ordered_ops()]
    convolutions = [precision for layer, precision in executed if layer == "Convolution"]
    assert convolutions == ["i8"] * 7 or convolutions == ["u8"] * 7, executed


def test_an_exact_lowering_passes_on_openvino_with_its_settings_reported() -> None:
    model = make_quant_model(scale=0.5)  # power-of-two step: OpenVINO's reciprocal is exact
    report = verify(model, qlower.convert(model, verify_result=False).model, runtime="openvino", batches=4)
    assert report.passed, report.failures
    assert report.runtime == "openvino" and [record.level for record in report.outputs] == [runners.OPENVINO_F32]
    settings = report.settings[runners.OPENVINO_F32]
    assert settings["INFERENCE_PRECISION_HINT"] == "f32" and settings["device"] == "CPU"
    default = runners.OpenVinoRunner(None).default_hint()
    # The default hint runs once more as an advisory where it differs from f32 (bf16 on
    # AMX/avx512_bf16 CPUs), summarised and never failing.
    assert [advisory.level for advisory in report.advisories] == ([] if default == "f32" else [runners.OPENVINO_DEFAULT])
    for advisory in report.advisories:
        assert advisory.settings["INFERENCE_PRECISION_HINT"].startswith(default) and advisory.summary()


def test_convert_verifies_on_openvino() -> None:
    result = qlower.convert(make_quant_model(scale=0.25), runtime="openvino", batches=2)
    assert result.report.verification is not None and result.report.verification.runtime == "openvino"
    assert result.report.to_dict()["verification"]["settings"][runners.OPENVINO_F32]["INFERENCE_PRECISION_HINT"] == "f32"  # type: ignore[index]


def test_a_missing_openvino_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = runners.importlib.import_module

    def without_openvino(name: str, *args: object) -> object:
        if name == "openvino":
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args)

    monkeypatch.setattr(runners.importlib, "import_module", without_openvino)
    with pytest.raises(UnsupportedError, match=r"pip install 'qlower\[openvino\]'"):
        qlower.convert(make_quant_model(), runtime="openvino")
    with pytest.raises(UnsupportedError, match="unknown runtime 'tensorrt'"):
        verify(make_quant_model(), make_quant_model(), runtime="tensorrt")


def test_an_output_openvino_names_several_ways_is_found_by_its_own_name() -> None:
    # OpenVINO folds CNV's final Mul -> Div into one node whose port carries three names.
    fixture = BREVITAS_DIR / "real" / "cnv_2w2a.qonnx.onnx"
    lowered = qlower.convert(fixture, profile="openvino", verify_result=False).model
    report = verify(fixture, lowered, runtime="openvino", batches=1)
    assert [record.name for record in report.outputs] == ["118"], report.failures


@pytest.mark.parametrize("name", ["fp8_e4m3_linear_bias", "fp8_e4m3_conv", "fp8_e5m2_conv_bias", "fp8_e5m2_linear"])
def test_the_openvino_profile_of_the_fp8_fixtures_verifies_on_openvino(name: str) -> None:
    # Their input FloatQuant is looked up among exact thresholds: the float path's Divide
    # is a reciprocal multiply on OpenVINO, which moved ties of the input one float8 step
    # (and OpenVINO's own float8 conversion rounds twice).
    result = qlower.convert(BREVITAS_DIR / f"{name}.qonnx.onnx", profile="openvino", runtime="openvino", batches=2)
    verification = result.report.verification
    assert verification is not None and verification.passed, verification.failures
    assert next(r for r in result.report.quantizers if r.role == "activation").lowered_by == "float_quant_input_lookup"
