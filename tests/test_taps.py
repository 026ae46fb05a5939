"""Taps: the records that say where a quantizer output lives in the lowered model as integers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import qlower
from helpers import make_quant_model
from qlower import taps
from qlower.errors import ModelLoadError
from qlower.taps import Tap


def _lowered(*names: str) -> onnx.ModelProto:
    """A model whose nodes produce the tensors ``names`` (Identity chain from x)."""
    nodes, source = [], "x"
    for name in names:
        nodes.append(helper.make_node("Identity", [source], [name]))
        source = name
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.INT8, [1, 2])],
        [helper.make_tensor_value_info(source, TensorProto.INT8, [1, 2])],
    )
    return helper.make_model(graph)


def test_dequantize_matches_dequantize_linear_per_tensor_and_per_channel() -> None:
    q = np.array([[[-128, 0, 127], [5, -5, 1]]], dtype=np.int8)  # [1, 2, 3], channels on axis 1
    per_tensor = Tap.of("y", "y_q", np.float32(0.1), np.int8(3))
    assert per_tensor.axis is None
    np.testing.assert_array_equal(per_tensor.dequantize(q), ((q.astype(np.int64) - 3).astype(np.float32) * np.float32(0.1)))
    per_channel = Tap.of("y", "y_q", np.array([0.5, 0.25], np.float32), np.int8(0), axis=1)
    assert per_channel.zero_point == (0, 0)
    expected = q.astype(np.float32) * np.array([0.5, 0.25], np.float32).reshape(1, 2, 1)
    np.testing.assert_array_equal(per_channel.dequantize(q), expected)


def test_taps_round_trip_through_metadata_and_drop_removed_tensors() -> None:
    model = _lowered("a_q", "b_q")
    kept = Tap.of("a", "a_q", np.array([0.5, 0.25], np.float32), np.array([1, 2]), axis=1)
    gone = Tap.of("c", "c_q", np.float32(1.0), np.int8(0))
    taps.attach(model, [kept, gone])
    assert taps.read(onnx.load_from_string(model.SerializeToString())) == [kept]
    taps.attach(model, [])  # replaces, never appends a second entry
    assert taps.read(model) == [] and all(prop.key != taps.METADATA_KEY for prop in model.metadata_props)


def test_malformed_tap_metadata_is_a_load_error() -> None:
    model = _lowered("a_q")
    onnx.helper.set_model_props(model, {taps.METADATA_KEY: '[{"original": "a"}]'})
    with pytest.raises(ModelLoadError, match="qlower.taps"):
        taps.read(model)


def test_qcdq_lowering_records_no_taps_its_outputs_keep_their_names() -> None:
    result = qlower.convert(make_quant_model(), verify_result=False)
    assert taps.read(result.model) == []
