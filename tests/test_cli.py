"""The command line as CI uses it: exit codes, one-line errors, reports, no partial output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from paths import ZOO_DIR

EXAMPLE = ZOO_DIR / "TFC_2W2A.onnx"


def qlower_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qlower", *args], capture_output=True, text=True, timeout=600)


def assert_refused(proc: subprocess.CompletedProcess[str], error_class: str, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"qlower: error [{error_class}]: "), lines[0]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def single_quant_model(scale: float, scale_is_input: bool = False) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("z", 0.0), ("b", 4.0))]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])]
    if scale_is_input:
        inputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, []))
    else:
        inits.append(numpy_helper.from_array(np.array(scale, np.float32), "s"))
    node = helper.make_node("Quant", ["x", "s", "z", "b"], ["y"], name="act_quant", domain="qonnx.custom_op.general", signed=1, narrow=0)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("qonnx.custom_op.general", 1)])


def test_convert_writes_model_and_json_report(tmp_path: Path) -> None:
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    proc = qlower_cli("convert", str(EXAMPLE), "--to", "qcdq", "-o", str(out), "--report", str(report), "--batches", "4")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(report.read_text())
    assert payload["target"] == "qcdq" and payload["verification"]["passed"]
    assert len(payload["quantizers"]) == 8 and all(q["lowered_by"] for q in payload["quantizers"])
    assert onnx.load(str(out)).graph.node


def test_verify_command_passes_and_fails(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    assert qlower_cli("convert", str(EXAMPLE), "-o", str(out), "--no-verify", "-q").returncode == 0
    assert qlower_cli("verify", str(EXAMPLE), str(out), "--batches", "2").returncode == 0
    wrong = onnx.load(str(out))
    for init in wrong.graph.initializer:
        if init.data_type == TensorProto.FLOAT and not init.dims:  # perturb every scalar scale
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.5), init.name))
    onnx.save(wrong, str(tmp_path / "wrong.onnx"))
    proc = qlower_cli("verify", str(EXAMPLE), str(tmp_path / "wrong.onnx"), "--batches", "2")
    assert proc.returncode == 1
    assert "VerificationError" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_file(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    assert_refused(qlower_cli("convert", str(tmp_path / "nope.onnx"), "-o", str(out)), "ModelLoadError", "no such file")
    assert not out.exists()


def test_not_onnx_and_truncated(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a model\x00\xff" * 10)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(EXAMPLE.read_bytes()[:5000])
    for bad in (garbage, truncated):
        out = tmp_path / f"{bad.stem}.out.onnx"
        assert_refused(qlower_cli("convert", str(bad), "-o", str(out)), "ModelLoadError", str(bad))
        assert not out.exists()


def test_zero_scale_names_the_node(tmp_path: Path) -> None:
    model = tmp_path / "zero_scale.onnx"
    onnx.save(single_quant_model(0.0), str(model))
    out = tmp_path / "out.onnx"
    assert_refused(qlower_cli("convert", str(model), "-o", str(out)), "InvalidQuantizerError", "act_quant", "scale")
    assert not out.exists()


def test_dynamic_scale_converts_and_strict_refuses_it_naming_the_node(tmp_path: Path) -> None:
    model = tmp_path / "dynamic_scale.onnx"
    onnx.save(single_quant_model(0.1, scale_is_input=True), str(model))
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    proc = qlower_cli("convert", str(model), "-o", str(out), "--report", str(report), "-q")
    assert proc.returncode == 0, proc.stderr
    (entry,) = json.loads(report.read_text())["float_path"]
    assert entry["node"] == "act_quant" and "scale computed at run time" in entry["reason"]
    out.unlink()
    assert_refused(qlower_cli("convert", str(model), "-o", str(out), "--strict"), "UnsupportedError", "act_quant", "--strict", "run time")
    assert not out.exists()


def test_strict_refuses_an_out_of_range_zero_point_only_when_it_needs_the_float_path(tmp_path: Path) -> None:
    """Zero point 300 on an 8-bit activation: no int8 container holds it, so the float path;
    zero point 2 on a 2-bit narrow range fits int8 and passes --strict."""
    for zero_point, refused in ((300.0, True), (2.0, False)):
        inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("s", 0.1), ("z", zero_point), ("b", 8.0 if refused else 2.0))]
        node = helper.make_node("Quant", ["x", "s", "z", "b"], ["y"], name="act_quant", domain="qonnx.custom_op.general", signed=1, narrow=1)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
        path = tmp_path / f"zp_{zero_point:g}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("qonnx.custom_op.general", 1)]), str(path))
        out = tmp_path / f"zp_{zero_point:g}.out.onnx"
        proc = qlower_cli("convert", str(path), "-o", str(out), "--strict", "-q")
        if refused:
            assert_refused(proc, "UnsupportedError", "act_quant", "--strict", "does not fit")
            assert not out.exists()
        else:
            assert proc.returncode == 0, proc.stderr


def test_trunc_version_contradiction(tmp_path: Path) -> None:
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("s", 0.5), ("z", 0.0), ("bi", 8.0), ("so", 1.0), ("bo", 4.0))]
    node = helper.make_node("Trunc", ["x", "s", "z", "bi", "so", "bo"], ["y"], name="the_trunc", domain="qonnx.custom_op.general", rounding_mode="FLOOR")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("qonnx.custom_op.general", 1)])
    path, out = tmp_path / "trunc.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(path))
    assert_refused(qlower_cli("convert", str(path), "-o", str(out)), "InvalidModelError", "the_trunc", "version")
    assert not out.exists()


def test_output_must_not_overwrite_input(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(EXAMPLE.read_bytes())
    proc = qlower_cli("convert", str(model), "-o", str(model))
    assert proc.returncode == 2 and "overwrite" in proc.stderr
    assert model.read_bytes() == EXAMPLE.read_bytes()


def qgemm_bias_model() -> onnx.ModelProto:
    """8-bit Gemm whose 31-bit bias (scale 0.25, zero point 1) is not on s_x*s_w: exact QCDQ,
    but ORT_ENABLE_ALL fuses it into QGemm, which ignores the bias scale (SPEC 4 pitfall)."""
    rng = np.random.default_rng(5)
    domain = "qonnx.custom_op.general"
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in (
        ("w", rng.normal(0, 1, (2, 3))), ("b", [3.0, -2.0]),
        ("xs", 0.1), ("ws", 0.05), ("bs", 0.25), ("zero", 0.0), ("one", 1.0), ("b8", 8.0), ("b31", 31.0))]
    nodes = [
        helper.make_node("Quant", ["x", "xs", "zero", "b8"], ["xq"], name="act", domain=domain, signed=1),
        helper.make_node("Quant", ["w", "ws", "zero", "b8"], ["wq"], name="weight", domain=domain, signed=1),
        helper.make_node("Quant", ["b", "bs", "one", "b31"], ["bq"], name="bias", domain=domain, signed=1),
        helper.make_node("Gemm", ["xq", "wq", "bq"], ["y"], name="gemm", transB=1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(domain, 1)])


def test_no_check_optimized_verifies_at_disable_all_only(tmp_path: Path) -> None:
    model, out, report = tmp_path / "gemm.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(qgemm_bias_model(), str(model))
    failed = qlower_cli("convert", str(model), "-o", str(out), "--report", str(report), "-q")
    assert failed.returncode == 1 and "ORT_ENABLE_ALL" in failed.stderr, failed.stderr
    assert not out.exists()
    passed = qlower_cli("convert", str(model), "-o", str(out), "--report", str(report), "-q", "--no-check-optimized")
    assert passed.returncode == 0, passed.stderr
    records = json.loads(report.read_text())["verification"]["outputs"]
    assert records and {record["level"] for record in records} == {"ORT_DISABLE_ALL"}
    assert all(record["max_abs_diff"] == 0 for record in records)
    assert qlower_cli("verify", str(model), str(out), "--no-check-optimized", "-q").returncode == 0
    assert qlower_cli("verify", str(model), str(out), "-q").returncode == 1


def test_profile_flag_is_recorded_and_checked_against_the_target(tmp_path: Path) -> None:
    model = ZOO_DIR / "TFC_2W2A.onnx"
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    proc = qlower_cli("convert", str(model), "--profile", "ort", "-o", str(out), "--report", str(report), "--batches", "2", "-q")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(report.read_text())["profile"]["name"] == "ort"
    refused = tmp_path / "refused.onnx"
    proc = qlower_cli("convert", str(model), "--to", "qop", "--profile", "ort", "-o", str(refused))
    assert_refused(proc, "UnsupportedError", "profile ort", "--to qcdq")
    assert not refused.exists()


def test_summary_table_lists_each_record_up_to_a_screen_then_each_kind() -> None:
    from rich.console import Console

    from qlower.cli import ROWS_PER_RECORD_MAX, _record_table

    def rendered(rows: list[tuple[str, ...]]) -> str:
        console = Console(record=True, width=200)
        console.print(_record_table("t", ("node", "op", "became"), rows, "quantizers"))
        return console.export_text()

    few = [(f"n{i}", "Quant", "QuantizeLinear -> DequantizeLinear") for i in range(ROWS_PER_RECORD_MAX)]
    text = rendered(few)
    assert all(f" n{i} " in text for i in range(ROWS_PER_RECORD_MAX)) and "kinds" not in text
    many = few + [("m0", "Quant", "int8 initializer -> DequantizeLinear"), ("m1", "Trunc", "float ops")]
    many += [(f"k{i}", "Quant", "int8 initializer -> DequantizeLinear") for i in range(5)]
    lines = rendered(many).splitlines()
    assert any(f"{len(many)} quantizers of 3 kinds" in line for line in lines)
    rows = [line.split("│")[1:-1] for line in lines if line.startswith("│")]
    assert [[cell.strip() for cell in row] for row in rows] == [
        [str(ROWS_PER_RECORD_MAX), "Quant", "QuantizeLinear -> DequantizeLinear", "n0"],
        ["6", "Quant", "int8 initializer -> DequantizeLinear", "m0"],
        ["1", "Trunc", "float ops", "m1"],
    ]


def test_convert_of_many_alike_quantizers_prints_their_kinds(tmp_path: Path) -> None:
    from benchmarks.synthetic import shared_chain

    source, out = tmp_path / "chain.onnx", tmp_path / "out.onnx"
    onnx.save(shared_chain(400), str(source))  # 100 blocks: 100 activation and 100 weight quantizers
    proc = qlower_cli("convert", str(source), "-o", str(out), "--no-verify")
    assert proc.returncode == 0, proc.stderr
    assert "200 quantizers of 2 kinds" in " ".join(proc.stdout.split())  # (the title may wrap)
    assert len(proc.stdout.splitlines()) < 40 and out.exists()
