"""qlower inspect and --version: what the model holds, what convert makes of it, its cost."""

from __future__ import annotations

import json
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qlower
from paths import ZOO_DIR, ZOO_MODELS
from test_cli import assert_refused, qlower_cli, single_quant_model

EXAMPLE = ZOO_DIR / "TFC_2W2A.onnx"
QONNX = "qonnx.custom_op.general"


def test_version_is_the_package_version() -> None:
    proc = qlower_cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"qlower {metadata.version('qlower')}"


def test_inspect_json_reads_the_pipeline_records(tmp_path: Path) -> None:
    proc = qlower_cli("inspect", str(EXAMPLE), "--json")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["schema"] == 1 and payload["kind"] == "inspect"
    assert len(payload["quantizers"]) == 8
    # What inspect says each quantizer becomes is what convert's report says, field for field.
    for target in ("qcdq", "qop"):
        report = qlower.convert(EXAMPLE, target, verify_result=False).report.to_dict()
        converted = {q["node"]: q for q in report["quantizers"]}
        for q in payload["quantizers"]:
            became = q["lowerings"][target]
            assert became == {key: converted[q["node"]][key] for key in ("lowered_by", "emitted", "float_path", "skipped")}
            assert {key: q[key] for key in ("bits", "signed", "narrow", "layout", "zero_point", "rounding_mode")} == {
                key: converted[q["node"]][key] for key in ("bits", "signed", "narrow", "layout", "zero_point", "rounding_mode")
            }
    assert {u["node"] for u in payload["units"]} == {"MatMul_20", "MatMul_32", "MatMul_44", "MatMul_56"}
    assert payload["summary"]["cost"] == [
        {"activation_bits": 2.0, "weight_bits": 2.0, "units": 4, "macs": 59008, "weight_params": 59008}
    ]


def test_inspect_human_output_names_every_quantizer() -> None:
    proc = qlower_cli("inspect", str(EXAMPLE))
    assert proc.returncode == 0, proc.stderr
    for node in ("Quant_13", "Quant_54", "MatMul_56"):
        assert node in proc.stdout
    assert "--to qop: ONNX Runtime (ORT_ENABLE_ALL) runs" in proc.stdout


def test_inspect_refuses_bad_input_like_convert(tmp_path: Path) -> None:
    assert_refused(qlower_cli("inspect", str(tmp_path / "nope.onnx")), "ModelLoadError", "no such file")
    model = tmp_path / "zero_scale.onnx"
    onnx.save(single_quant_model(0.0), str(model))
    assert_refused(qlower_cli("inspect", str(model), "--json"), "InvalidQuantizerError", "act_quant", "scale")


def _grouped_conv_model() -> onnx.ModelProto:
    """x[1,4,6,6] -> Quant(4 bit, per-channel weights on axis 0) -> Conv(group 2, 3x3, pad 1) -> Quant(8 bit)."""
    weights = np.linspace(-1, 1, 8 * 2 * 3 * 3, dtype=np.float32).reshape(8, 2, 3, 3)
    inits = [
        numpy_helper.from_array(weights, "w"),
        numpy_helper.from_array(np.linspace(0.05, 0.2, 8, dtype=np.float32).reshape(8, 1, 1, 1), "w_scale"),
        numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        numpy_helper.from_array(np.array(0.0, np.float32), "z"),
        numpy_helper.from_array(np.array(4.0, np.float32), "b4"),
        numpy_helper.from_array(np.array(8.0, np.float32), "b8"),
    ]
    nodes = [
        helper.make_node("Quant", ["x", "s", "z", "b8"], ["xq"], name="x_quant", domain=QONNX, signed=1, narrow=0, rounding_mode="ROUND"),
        helper.make_node("Quant", ["w", "w_scale", "z", "b4"], ["wq"], name="w_quant", domain=QONNX, signed=1, narrow=1, rounding_mode="ROUND"),
        helper.make_node("Conv", ["xq", "wq"], ["c"], name="conv", group=2, kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Quant", ["c", "s", "z", "b8"], ["y"], name="y_quant", domain=QONNX, signed=1, narrow=0, rounding_mode="ROUND"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QONNX, 1)])


def test_grouped_conv_cost_and_layout() -> None:
    report = qlower.inspect(_grouped_conv_model())
    (unit,) = report.units
    # N * C_out/group * C_in * kh * kw * H_out * W_out, as qonnx counts it.
    assert (unit.macs, unit.weight_params) == (1 * 4 * 4 * 9 * 36, 8 * 2 * 9)
    assert (unit.activation_bits, unit.weight_bits) == (8.0, 4.0)
    weight = next(q for q in report.quantizers if q["node"] == "w_quant")
    assert (weight["layout"], weight["axis"], weight["narrow"], weight["role"]) == ("per-channel", 0, True, "weight")
    assert report.units[0].lowerings["qop"]["integer_kernel"] is True
    assert report.lowerings["qop"]["ort_kernels"]["integer"] == 1


def _bits_of_qonnx_datatype(name: str) -> float | None:
    if name == "BIPOLAR":
        return 1.0
    if name.startswith("FLOAT"):
        return None
    digits = "".join(ch for ch in name if ch.isdigit())
    return float(digits)


@pytest.mark.parametrize("model", ZOO_MODELS, ids=lambda p: p.stem)
def test_cost_matches_qonnx_inference_cost(model: Path) -> None:
    inference_cost = pytest.importorskip("qonnx.util.inference_cost").inference_cost
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = inference_cost(str(model), discount_sparsity=False)["total_cost"]
    expected_macs: dict[tuple[float | None, float | None], float] = {}
    expected_params: dict[float | None, float] = {}
    for key, value in theirs.items():
        if key.startswith("op_mac_"):
            act, weight = key.removeprefix("op_mac_").split("_")
            pair = (_bits_of_qonnx_datatype(act), _bits_of_qonnx_datatype(weight))
            expected_macs[pair] = expected_macs.get(pair, 0) + value
        elif key.startswith("mem_w_"):
            bits = _bits_of_qonnx_datatype(key.removeprefix("mem_w_"))
            expected_params[bits] = expected_params.get(bits, 0) + value
    ours = qlower.inspect(model).summary()["cost"]
    assert {(r["activation_bits"], r["weight_bits"]): r["macs"] for r in ours} == expected_macs
    params: dict[float | None, int] = {}
    for row in ours:
        params[row["weight_bits"]] = params.get(row["weight_bits"], 0) + row["weight_params"]
    assert params == expected_params


def test_inspect_of_a_deep_chain_counts_every_unit() -> None:
    # Constness is found in one pass over the lowered graph; it was a walk back from each
    # unit that recursed once per node upstream (a RecursionError past ~1,000 nodes).
    from benchmarks.synthetic import shared_chain

    report = qlower.inspect(shared_chain(1600), targets=("qcdq",))
    assert len(report.units) == 400 and all(unit.weight_params == 256 for unit in report.units)
    assert report.to_dict()["summary"]["total_macs"] == 400 * 256
