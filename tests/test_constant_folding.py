"""qlower.constant_folding folds exactly what onnx-graphsurgeon's fold_constants folds.

Each case folds one import of a model with ``Graph.fold_constants`` (the call qlower made
before) and another with :func:`qlower.constant_folding.fold_constants`, and holds equal the
model bytes each sent to ONNX Runtime and the exported results.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime
import pytest
from hypothesis import HealthCheck, given, settings
from onnx import TensorProto, helper, numpy_helper

from fuzz_graphs import fuzz_cases
from paths import BREVITAS_DIR, ZOO_MODELS
from qlower import ir, pipeline
from qlower.constant_folding import fold_constants

MODELS = ZOO_MODELS + sorted(BREVITAS_DIR.glob("*.qonnx.onnx")) + sorted((BREVITAS_DIR / "real").glob("*.qonnx.onnx"))


def _graph(model: onnx.ModelProto) -> gs.Graph:
    return ir.to_graph(ir.normalize(model, max(ir.MIN_OUTPUT_OPSET, ir.default_opset(model))))


def _fold_both(model: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch) -> tuple[list[bytes], list[bytes]]:
    """(ORT models, exported result) of the fold by onnx-graphsurgeon and by qlower."""
    session_models: list[bytes] = []
    real_session = onnxruntime.InferenceSession

    def recording(data: bytes, *args: object, **kwargs: object) -> onnxruntime.InferenceSession:
        session_models.append(data)
        return real_session(data, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording)
    results = []
    for fold in (
        lambda g: g.fold_constants(fold_shapes=False, should_exclude_node=pipeline._keep_unfolded, error_ok=True),
        lambda g: fold_constants(g, should_exclude_node=pipeline._keep_unfolded),
    ):
        graph = _graph(model)
        before = len(session_models)
        fold(graph)
        graph.cleanup(remove_unused_graph_inputs=False)
        sent = b"".join(session_models[before:])
        results.append((sent, gs.export_onnx(graph, do_type_check=False).SerializeToString()))
    return [sent for sent, _ in results], [exported for _, exported in results]


def _assert_same(model: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch) -> None:
    sent, exported = _fold_both(model, monkeypatch)
    assert sent[0] == sent[1]
    assert exported[0] == exported[1]


@pytest.mark.parametrize("path", MODELS, ids=lambda p: Path(p).name)
def test_real_models_fold_as_graphsurgeon_folds_them(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _assert_same(onnx.load(str(path)), monkeypatch)


def test_the_zoo_has_something_to_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison above is not vacuous: TFC's Pow of two constants goes through ORT."""
    sent, exported = _fold_both(onnx.load(str(next(p for p in ZOO_MODELS if p.name == "TFC_2W2A.onnx"))), monkeypatch)
    assert sent[0] and sent[0] == sent[1]
    assert exported[0] == exported[1]


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], outputs: list[str], opset: int = 13) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        [numpy_helper.from_array(value, name) for name, value in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


F = np.float32
CONSTANTS = {"a": np.array([3.0, 0.5], F), "b": np.array([1.5, -2.0], F), "c": np.array([0.1, 7.0], F)}


def test_a_folded_tensor_read_by_folded_and_run_time_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = [
        helper.make_node("Pow", ["a", "b"], ["p"], name="pow"),
        helper.make_node("Mul", ["p", "c"], ["m"], name="mul"),  # folded too
        helper.make_node("Add", ["x", "p"], ["s"], name="add"),
        helper.make_node("Add", ["s", "m"], ["y"], name="out"),
    ]
    _assert_same(_model(nodes, CONSTANTS, ["y"]), monkeypatch)


def test_a_folded_graph_output_and_a_consumer_named_like_a_constant(monkeypatch: pytest.MonkeyPatch) -> None:
    # "m" is both a folded tensor and the name of the node reading "p": onnx-graphsurgeon
    # then does not evaluate "p" on its own (it compares node names with tensor names).
    nodes = [
        helper.make_node("Pow", ["a", "b"], ["p"], name="pow"),
        helper.make_node("Mul", ["p", "c"], ["m"], name="m"),
        helper.make_node("Add", ["x", "m"], ["y"], name="add"),
        helper.make_node("Sqrt", ["a"], ["r"], name="sqrt"),
    ]
    _assert_same(_model(nodes, CONSTANTS, ["y", "r"]), monkeypatch)


def test_constant_nodes_of_every_spelling(monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = [
        helper.make_node("Constant", [], ["k1"], name="k1", value_floats=[2.0, 4.0]),
        helper.make_node("Constant", [], ["k2"], name="k2", value_float=0.25),
        helper.make_node("Mul", ["k1", "k2"], ["m"], name="mul"),
        helper.make_node("Add", ["x", "m"], ["y"], name="add"),
    ]
    _assert_same(_model(nodes, {}, ["y"]), monkeypatch)


def test_a_fold_onnx_runtime_rejects_falls_back_to_graphsurgeon(monkeypatch: pytest.MonkeyPatch) -> None:
    # ORT has no float Mod with fmod=0: the evaluation fails and nothing is folded either way
    nodes = [
        helper.make_node("Mod", ["a", "b"], ["r"], name="mod"),
        helper.make_node("Add", ["x", "r"], ["y"], name="add"),
    ]
    sent, exported = _fold_both(_model(nodes, CONSTANTS, ["y"]), monkeypatch)
    assert sent[0] and sent[1] == sent[0] * 2  # qlower's try, then onnx-graphsurgeon's: the same model
    assert exported[0] == exported[1]
    folded = onnx.load_from_string(exported[1])
    assert [node.op_type for node in folded.graph.node] == ["Mod", "Add"]


def test_an_if_with_a_constant_condition_is_left_to_graphsurgeon(monkeypatch: pytest.MonkeyPatch) -> None:
    def branch(value: float) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Constant", [], ["v"], value=numpy_helper.from_array(np.array([value, value], F)))],
            f"branch{value}", [], [helper.make_tensor_value_info("v", TensorProto.FLOAT, [2])],
        )

    nodes = [
        helper.make_node("If", ["cond"], ["v_out"], name="if", then_branch=branch(1.0), else_branch=branch(2.0)),
        helper.make_node("Add", ["x", "v_out"], ["y"], name="add"),
    ]
    model = _model(nodes, {"cond": np.array(True)}, ["y"])
    _assert_same(model, monkeypatch)


def test_a_weight_range_clip_before_dequantize_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = [
        helper.make_node("Clip", ["w", "lo", "hi"], ["wc"], name="clip"),
        helper.make_node("DequantizeLinear", ["wc", "s", "z"], ["wf"], name="dq"),
        helper.make_node("Add", ["x", "wf"], ["y"], name="add"),
    ]
    inits = {
        "w": np.array([3, -9], np.int8), "lo": np.array(-7, np.int8), "hi": np.array(7, np.int8),
        "s": np.array(0.5, F), "z": np.array(0, np.int8),
    }
    _assert_same(_model(nodes, inits, ["y"]), monkeypatch)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=fuzz_cases())
def test_generated_models_fold_as_graphsurgeon_folds_them(case, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    _assert_same(case.model, monkeypatch)
