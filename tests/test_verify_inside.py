"""Verification that sees inside: internal taps, the first divergence, ORT's integer-kernel count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qlower
from helpers import QONNX_DOMAIN, make_signed_4bit_conv_net
from paths import BREVITAS_DIR
from qlower import taps
from qlower.report_schema import load_schema
from qlower.verification import OPTIMIZED, UNOPTIMIZED, verify


def _quant(name: str, source: str, scale: float) -> list:
    return [helper.make_node("Quant", [source, f"{name}_s", "zero", "eight"], [f"{name}_out"], name=name, domain=QONNX_DOMAIN, signed=1)]


def _two_quantizers() -> onnx.ModelProto:
    """``y = Quant_b(Relu(Quant_a(x)))``: one internal activation, ``Quant_a_out``."""
    nodes = _quant("Quant_a", "x", 0.5) + [helper.make_node("Relu", ["Quant_a_out"], ["r"])] + _quant("Quant_b", "r", 1.0)
    nodes[-1].output[0] = "y"
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("Quant_a_s", 0.5), ("Quant_b_s", 1.0), ("zero", 0.0), ("eight", 8.0))]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QONNX_DOMAIN, 1)])
    model.ir_version = 8
    return model


def _two_quantizers_lowered(tap_scale: float | None) -> onnx.ModelProto:
    """Hand-lowered: ``Quant_a``'s value lives on only as the int8 tensor ``a_int`` (a Tap when ``tap_scale``)."""
    inits = [
        numpy_helper.from_array(np.array(0.5, np.float32), "sa"),
        numpy_helper.from_array(np.array(1.0, np.float32), "sb"),
        numpy_helper.from_array(np.array(0, np.int8), "z"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sa", "z"], ["a_int"]),
        helper.make_node("DequantizeLinear", ["a_int", "sa", "z"], ["a_float"]),
        helper.make_node("Relu", ["a_float"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "sb", "z"], ["b_int"]),
        helper.make_node("DequantizeLinear", ["b_int", "sb", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    if tap_scale is not None:
        taps.attach(model, [taps.Tap.of("Quant_a_out", "a_int", np.float32(tap_scale), np.int8(0))])
    return model


def test_every_activation_quantizer_is_compared_at_both_levels_from_its_integers() -> None:
    model = make_signed_4bit_conv_net()
    lowered = qlower.convert(model, verify_result=False).model
    report = verify(model, lowered, batches=4)
    assert report.passed, report.failures
    expected = {"Quant_in_out", "Quant_a0_out", "Quant_a1_out"}  # Quant_a2 feeds only the pool: also internal
    for level in (UNOPTIMIZED, OPTIMIZED):
        at_level = {record.tensor: record for record in report.internal if record.level == level}
        assert expected <= set(at_level) and "Quant_a2_out" in at_level
        # Read from the integers the DequantizeLinear takes, not the float tensor, so
        # ORT's fusion of that DequantizeLinear is left alone.
        assert all(record.lowered_tensor != record.tensor for record in at_level.values())
    exact = [record for record in report.internal if record.level == UNOPTIMIZED]
    assert all(record.rule == "bit-identical" and record.differing == 0 and record.elements for record in exact)
    summary = report.to_dict()["internal_summary"]
    assert [row["level"] for row in summary] == [UNOPTIMIZED, OPTIMIZED] and summary[0]["tensors"] == 4


def test_a_tap_record_reads_the_integer_tensor_and_holds_it_to_the_rule() -> None:
    original = _two_quantizers()
    good = verify(original, _two_quantizers_lowered(0.5), batches=4)
    assert good.passed, good.failures
    assert {(r.tensor, r.lowered_tensor) for r in good.internal if r.level == UNOPTIMIZED} == {("Quant_a_out", "a_int")}
    # At ORT_ENABLE_ALL it is read in the graph ORT runs, where a_int's QuantizeLinear became uint8.
    assert {(r.tensor, r.lowered_tensor) for r in good.internal if r.level == OPTIMIZED} == {("Quant_a_out", "qdq_s8_to_u8_quant")}
    # Without a record the value is gone from the lowered model: nothing to compare.
    assert verify(original, _two_quantizers_lowered(None), batches=1).internal == []
    # A record with the wrong scale reads every element off by a factor: the outputs still
    # match, the internal comparison fails and names the tensor.
    bad = verify(original, _two_quantizers_lowered(0.25), batches=4)
    assert all(record.passed for record in bad.outputs)
    assert bad.failures[0].startswith(f"internal tensor 'Quant_a_out' (quantizer 'Quant_a') at {UNOPTIMIZED}: ")
    assert bad.first_divergence is not None and bad.first_divergence.node == "Quant_a"


def _corrupted(lowered: onnx.ModelProto, weight_prefix: str) -> onnx.ModelProto:
    corrupted = onnx.ModelProto()
    corrupted.CopyFrom(lowered)
    for init in corrupted.graph.initializer:
        if init.name.startswith(weight_prefix) and init.data_type == TensorProto.INT8 and len(init.dims) == 4:
            values = numpy_helper.to_array(init).copy()
            values[0, 0, 0, 0] = -8 if values[0, 0, 0, 0] != -8 else 7
            init.CopyFrom(numpy_helper.from_array(values, init.name))
            return corrupted
    raise AssertionError(f"no int8 weight {weight_prefix}")


def test_a_corrupted_weight_names_the_node_whose_output_first_diverges(tmp_path: Path) -> None:
    model = make_signed_4bit_conv_net()
    lowered = qlower.convert(model, verify_result=False).model
    original_path, lowered_path, report_path = tmp_path / "m.onnx", tmp_path / "bad.onnx", tmp_path / "r.json"
    onnx.save(model, str(original_path))
    onnx.save(_corrupted(lowered, "Quant_w1"), str(lowered_path))
    proc = subprocess.run(
        [sys.executable, "-m", "qlower", "verify", str(original_path), str(lowered_path), "--batches", "4", "--report", str(report_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "first divergence at ORT_DISABLE_ALL: node 'Quant_a1'" in line
    assert "Conv_1 (Conv)" in line  # the lowered node between the last match and the divergence
    payload = json.loads(report_path.read_text())
    divergence = payload["first_divergence"]
    assert divergence["node"] == "Quant_a1" and divergence["level"] == UNOPTIMIZED
    assert divergence["suspects"][0] == "Conv_1 (Conv)"
    assert payload["internal"] and payload["kernels"]["total"] == 3
    jsonschema = pytest.importorskip("jsonschema")
    errors = list(jsonschema.Draft202012Validator(load_schema()).iter_errors(payload))
    assert not errors, errors[0].message


def test_the_first_divergence_is_the_earliest_in_topological_order() -> None:
    model = make_signed_4bit_conv_net()
    lowered = qlower.convert(model, verify_result=False).model
    report = verify(model, _corrupted(lowered, "Quant_w0"), batches=4, check_optimized=False)
    assert not report.passed
    assert report.first_divergence is not None and report.first_divergence.node == "Quant_a0"
    assert "first divergence" in report.failure_message()


def test_kernel_count_names_each_float_unit_and_why() -> None:
    fixture = BREVITAS_DIR / "conv_w8a8_pc.qonnx.onnx"
    result = qlower.convert(fixture, to="qcdq")
    kernels = result.report.verification.kernels  # type: ignore[union-attr]
    assert kernels is not None and kernels.integer == 1 and kernels.integer_ops == {"QLinearConv": 1}
    (float_unit,) = kernels.float_units
    assert float_unit.op == "Conv" and "output is a float graph output" in float_unit.why
    assert kernels.summary().startswith("1/2 Conv/MatMul/Gemm run as integer kernels at ORT_ENABLE_ALL")
    # A unit the conversion left alone carries the conversion's reason too.
    transpose = qlower.convert(BREVITAS_DIR / "convtranspose.qonnx.onnx", to="qop").report
    (left,) = transpose.verification.kernels.float_units  # type: ignore[union-attr]
    assert left.op == "ConvTranspose" and "the conversion left it: ONNX has no integer ConvTranspose" in left.why
    assert transpose.to_dict()["verification"]["kernels"]["float"][0]["why"] == left.why  # type: ignore[index]


def test_no_kernel_count_without_the_optimized_level() -> None:
    model = make_signed_4bit_conv_net(layers=1)
    lowered = qlower.convert(model, verify_result=False).model
    assert verify(model, lowered, batches=1, check_optimized=False).kernels is None


def test_the_reference_returns_kept_internal_tensors() -> None:
    from qlower.reference import ReferenceExecutor

    reference = ReferenceExecutor(_two_quantizers())
    x = np.linspace(-4, 4, 16, dtype=np.float32).reshape(1, 16)
    results = reference.run({"x": x}, keep=["Quant_a_out", "not_a_tensor"])
    assert set(results) == {"y", "Quant_a_out"}
    np.testing.assert_array_equal(results["Quant_a_out"], np.clip(np.round(x / 0.5), -128, 127) * 0.5)


def _chain(lowered: bool, shift_a: int = 0, shift_b: int = 0) -> onnx.ModelProto:
    """``Quant_a(0.5) -> Mul 4 -> Quant_b(1) -> Mul 0.25 -> Quant_c(1)``; lowered as QCDQ whose
    DequantizeLinear zero points move ``a`` and ``b`` by ``shift_*`` steps (4 x a step of a is
    2 steps of b; 0.25 x 2 steps of b is half a step of c)."""
    inits = {"sa": 0.5, "sb": 1.0, "sc": 1.0, "four": 4.0, "quarter": 0.25, "zero": 0.0, "eight": 8.0}
    tensors = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in inits.items()]
    nodes = []
    source = "x"
    for stage, (scale, after, shift) in enumerate([("sa", "four", shift_a), ("sb", "quarter", shift_b), ("sc", None, 0)]):
        name = "abc"[stage]
        out = "y" if after is None else f"Quant_{name}_out"
        if lowered:
            tensors.append(numpy_helper.from_array(np.array(0, np.int8), f"zq_{name}"))
            tensors.append(numpy_helper.from_array(np.array(shift, np.int8), f"zd_{name}"))
            nodes += [
                helper.make_node("QuantizeLinear", [source, scale, f"zq_{name}"], [f"{name}_int"]),
                helper.make_node("DequantizeLinear", [f"{name}_int", scale, f"zd_{name}"], [out]),
            ]
        else:
            nodes.append(helper.make_node("Quant", [source, scale, "zero", "eight"], [out], name=f"Quant_{name}", domain=QONNX_DOMAIN, signed=1))
        if after is not None:
            nodes.append(helper.make_node("Mul", [out, after], [f"m_{name}"]))
            source = f"m_{name}"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], tensors
    )
    imports = [helper.make_opsetid("", 13)] + ([] if lowered else [helper.make_opsetid(QONNX_DOMAIN, 1)])
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 8
    return model


def test_a_difference_grown_from_one_upstream_passes_and_is_reported_as_drift() -> None:
    x = [{"x": np.linspace(-3, 3, 16, dtype=np.float32).reshape(1, 16)}]
    grown = verify(_chain(False), _chain(True, shift_a=1), target="qop", inputs=x)
    assert grown.passed, grown.failures
    b = next(record for record in grown.internal if record.tensor == "Quant_b_out" and record.level == UNOPTIMIZED)
    # b computes exactly what the reference computes from the lowered a: locally equal,
    # two steps away end to end (information only)
    assert b.passed and b.max_lsb_diff == 0 and b.differing == 0
    assert b.end_to_end_max_lsb_diff == 2 and b.end_to_end_differing > 0
    summary = grown.to_dict()["internal_summary"][0]
    assert summary["worst_end_to_end"]["tensor"] == "Quant_b_out" and summary["end_to_end_differing"] > 0


def test_an_error_born_in_place_fails_even_downstream_of_an_upstream_difference() -> None:
    x = [{"x": np.linspace(-3, 3, 16, dtype=np.float32).reshape(1, 16)}]
    for shifts in ({"shift_b": 2}, {"shift_a": 1, "shift_b": 2}):
        born = verify(_chain(False), _chain(True, **shifts), target="qop", inputs=x)
        assert born.failures[0].startswith(f"internal tensor 'Quant_b_out' (quantizer 'Quant_b') at {UNOPTIMIZED}: "), shifts
        assert "local reference" in born.failures[0]
        assert born.first_divergence is not None and born.first_divergence.node == "Quant_b"


def test_one_step_born_in_place_downstream_of_one_upstream_passes_the_one_lsb_contract() -> None:
    x = [{"x": np.linspace(-3, 3, 16, dtype=np.float32).reshape(1, 16)}]
    report = verify(_chain(False), _chain(True, shift_a=1, shift_b=1), target="qop", inputs=x)
    assert report.passed, report.failures
    b = next(record for record in report.internal if record.tensor == "Quant_b_out" and record.level == UNOPTIMIZED)
    assert b.max_lsb_diff == 1 and b.end_to_end_max_lsb_diff == 3


def test_the_reference_replaces_a_tensor_downstream_and_keeps_what_it_computed() -> None:
    from qlower.reference import ReferenceExecutor

    reference = ReferenceExecutor(_chain(False))
    x = np.linspace(-3, 3, 16, dtype=np.float32).reshape(1, 16)
    plain = reference.run({"x": x}, keep=["Quant_a_out"])
    shifted = plain["Quant_a_out"] + np.float32(0.5)
    local = reference.run({"x": x}, keep=["Quant_a_out", "Quant_b_out"], replace={"Quant_a_out": lambda _computed: shifted})
    np.testing.assert_array_equal(local["Quant_a_out"], plain["Quant_a_out"])
    np.testing.assert_array_equal(local["Quant_b_out"], np.clip(np.round(shifted * 4), -128, 127))


def test_taps_at_enable_all_are_read_in_the_graph_ort_runs_checked_by_its_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    # bench_scale's shared-parameter chain: at ORT_ENABLE_ALL every int8 QuantizeLinear
    # becomes uint8 and the last unit a MatMulIntegerToFloat, so no tap keeps its name.
    from benchmarks.synthetic import shared_chain

    from qlower.verification.runners import OrtRunner, Session

    original = shared_chain(40)
    lowered = qlower.convert(original, verify_result=False).model
    lowered_tensors = {name for node in lowered.graph.node for name in node.output}
    opened: list[str] = []
    real_open = OrtRunner.open
    monkeypatch.setattr(OrtRunner, "open", lambda runner, *args: (opened.append(runner.level), real_open(runner, *args))[1])
    report = verify(original, lowered, batches=2)
    assert report.passed, report.failures
    read = {r.tensor: r.lowered_tensor for r in report.internal if r.level == OPTIMIZED}
    assert len(read) == 10 and opened.count(OPTIMIZED) == 1  # the deployed session only
    assert read["a9"] not in lowered_tensors  # the uint8 integers MatMulIntegerToFloat reads

    # A reopened graph whose outputs differ from the deployed session's is not trusted:
    # the taps are read from the lowered model opened with them exposed.
    class Shifted(Session):
        def __init__(self, inner: Session) -> None:
            self.inner, self.input_names, self.output_names = inner, inner.input_names, inner.output_names

        def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            results = self.inner.run(names, feeds)
            return [results[0] + np.float32(1), *results[1:]]

    real_reopen = OrtRunner.reopen
    monkeypatch.setattr(OrtRunner, "reopen", lambda runner, saved, folder: Shifted(real_reopen(runner, saved, folder)))
    opened.clear()
    report = verify(original, lowered, batches=2)
    assert report.passed, report.failures
    read = {r.tensor: r.lowered_tensor for r in report.internal if r.level == OPTIMIZED}
    assert len(read) == 10 and set(read.values()) <= lowered_tensors and opened.count(OPTIMIZED) == 2
