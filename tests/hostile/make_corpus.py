"""Regenerate the hostile-input corpus in this folder: ``python tests/hostile/make_corpus.py``.

Every file is something qlower must refuse cleanly (one error line, exit code 2, no output
file, no traceback). ``LOWERED`` builds inputs that once were refused but are valid QONNX
and lowered now (run-time Quant and Trunc scales, zero point outside the range, 2.5 and 33 bits); they are
not written as files, ``tests/test_hostile.py`` converts and verifies them. ``tests/test_hostile.py`` holds the table of what each file must raise
and which node the message must name, and checks that this script reproduces the committed
files byte for byte. Everything here is deterministic (fixed seeds, fixed names).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
QONNX = "qonnx.custom_op.general"
F32 = np.float32


def _init(name: str, value: object, dtype: type = F32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _model(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    *,
    inputs: list[onnx.ValueInfoProto] | None = None,
    outputs: list[str] = ("y",),
    opset: int = 13,
    qonnx_version: int | None = 1,
) -> onnx.ModelProto:
    inputs = inputs if inputs is not None else [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])]
    graph = helper.make_graph(
        nodes, "hostile", inputs, [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs], inits
    )
    imports = [helper.make_opsetid("", opset)]
    if qonnx_version is not None:
        imports.append(helper.make_opsetid(QONNX, qonnx_version))
    model = helper.make_model(graph, opset_imports=imports, producer_name="qlower-hostile-corpus")
    model.ir_version = 8
    return model


def _quant_model(
    scale: object = 0.1, zero_point: object = 0.0, bits: object = 4.0, *, name: str = "act_quant", **attrs: object
) -> onnx.ModelProto:
    """x[1,3,4,4] -> Quant(name) -> y; parameters as given (numpy-convertible)."""
    attrs = {"signed": 1, "narrow": 0, **attrs}
    node = helper.make_node("Quant", ["x", "s", "z", "b"], ["y"], name=name, domain=QONNX, **attrs)
    return _model([node], [_init("s", scale), _init("z", zero_point), _init("b", bits)])


def _valid_model() -> onnx.ModelProto:
    """A small valid model (Quant -> Conv with a quantized weight) for the byte-level files."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Quant", ["x", "s", "z", "b"], ["xq"], name="act_quant", domain=QONNX, signed=1, narrow=0),
        helper.make_node("Quant", ["w", "ws", "z", "b"], ["wq"], name="weight_quant", domain=QONNX, signed=1, narrow=1),
        helper.make_node("Conv", ["xq", "wq"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    inits = [_init("s", 0.1), _init("z", 0.0), _init("b", 4.0), _init("ws", 0.05), _init("w", rng.normal(0, 0.2, (4, 3, 3, 3)))]
    return _model(nodes, inits)


# ---- files that are not an ONNX model --------------------------------------------------


def empty() -> bytes:
    return b""


def truncated() -> bytes:
    data = _valid_model().SerializeToString()
    for cut in range(len(data) // 2, len(data)):
        try:
            onnx.ModelProto().ParseFromString(data[:cut])
        except DecodeError:
            return data[:cut]
    raise AssertionError("no truncation point fails to parse")


def random_bytes() -> bytes:
    return np.random.default_rng(1234).bytes(512)


def tensor_proto() -> bytes:
    """A valid protobuf message, but a TensorProto rather than a ModelProto."""
    return numpy_helper.from_array(np.arange(12, dtype=F32).reshape(3, 4), "not_a_model").SerializeToString()


def graph_proto() -> bytes:
    """A bare GraphProto (a model's graph without the ModelProto around it)."""
    return _valid_model().graph.SerializeToString()


def no_nodes() -> onnx.ModelProto:
    graph = helper.make_graph([], "empty", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


# ---- structurally broken graphs ---------------------------------------------------------


def cyclic() -> onnx.ModelProto:
    """a = Add(xq, b); b = Relu(a): a cycle through two nodes."""
    nodes = [
        helper.make_node("Quant", ["x", "s", "z", "bw"], ["xq"], name="act_quant", domain=QONNX, signed=1, narrow=0),
        helper.make_node("Add", ["xq", "loop_b"], ["loop_a"], name="cycle_add"),
        helper.make_node("Relu", ["loop_a"], ["loop_b"], name="cycle_relu"),
        helper.make_node("Identity", ["loop_b"], ["y"], name="out"),
    ]
    return _model(nodes, [_init("s", 0.1), _init("z", 0.0), _init("bw", 4.0)])


def dangling_input() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Quant", ["x", "s", "z", "b"], ["xq"], name="act_quant", domain=QONNX, signed=1, narrow=0),
        helper.make_node("Add", ["xq", "produced_by_nothing"], ["y"], name="dangling_add"),
    ]
    return _model(nodes, [_init("s", 0.1), _init("z", 0.0), _init("b", 4.0)])


def duplicate_tensor_names() -> onnx.ModelProto:
    """Two nodes write the same tensor name."""
    nodes = [
        helper.make_node("Quant", ["x", "s", "z", "b"], ["y"], name="act_quant", domain=QONNX, signed=1, narrow=0),
        helper.make_node("Relu", ["x"], ["y"], name="second_writer"),
    ]
    return _model(nodes, [_init("s", 0.1), _init("z", 0.0), _init("b", 4.0)])


def duplicate_initializer_output() -> onnx.ModelProto:
    """A node output shadows an initializer of the same name."""
    nodes = [helper.make_node("Quant", ["x", "s", "z", "b"], ["s"], name="shadowing_quant", domain=QONNX, signed=1, narrow=0),
             helper.make_node("Identity", ["s"], ["y"], name="out")]
    return _model(nodes, [_init("s", 0.1), _init("z", 0.0), _init("b", 4.0)])


def duplicate_quantizer_names() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Quant", ["x", "s", "z", "b"], ["a"], name="twin_quant", domain=QONNX, signed=1, narrow=0),
        helper.make_node("Quant", ["a", "s", "z", "b"], ["y"], name="twin_quant", domain=QONNX, signed=1, narrow=0),
    ]
    return _model(nodes, [_init("s", 0.1), _init("z", 0.0), _init("b", 4.0)])


def output_from_nothing() -> onnx.ModelProto:
    model = _quant_model()
    model.graph.output.append(helper.make_tensor_value_info("ghost", TensorProto.FLOAT, None))
    return model


def inconsistent_tensor_data() -> onnx.ModelProto:
    """The scale initializer declares 4 elements but carries the bytes of 1."""
    model = _quant_model()
    scale = next(t for t in model.graph.initializer if t.name == "s")
    scale.dims.extend([4])
    return model


# ---- invalid quantizer parameters -------------------------------------------------------


def quant_nan_scale() -> onnx.ModelProto:
    return _quant_model(scale=np.nan)


def quant_inf_scale() -> onnx.ModelProto:
    return _quant_model(scale=np.inf)


def quant_zero_scale() -> onnx.ModelProto:
    return _quant_model(scale=0.0)


def quant_negative_scale() -> onnx.ModelProto:
    return _quant_model(scale=[[[-0.1]], [[0.1]], [[0.2]]])  # per-channel, one negative


def quant_empty_scale() -> onnx.ModelProto:
    return _quant_model(scale=np.zeros((0,), F32))


def quant_bitwidth_0() -> onnx.ModelProto:
    return _quant_model(bits=0.0)


def quant_bitwidth_33() -> onnx.ModelProto:
    return _quant_model(bits=33.0)


def quant_bitwidth_2_5() -> onnx.ModelProto:
    return _quant_model(bits=2.5)


def quant_bitwidth_nan() -> onnx.ModelProto:
    return _quant_model(bits=np.nan)


def quant_bitwidth_vector() -> onnx.ModelProto:
    return _quant_model(bits=[4.0, 4.0])


def quant_zero_point_out_of_range() -> onnx.ModelProto:
    return _quant_model(zero_point=8.0, bits=4.0)  # signed 4-bit range is [-8, 7]


def quant_zero_point_nan() -> onnx.ModelProto:
    return _quant_model(zero_point=np.nan)


def quant_scale_wrong_rank() -> onnx.ModelProto:
    """A per-channel scale of shape [3] on x[1,3,4,4]: aligned from the right it meets W=4."""
    return _quant_model(scale=[0.1, 0.2, 0.3])


def quant_scale_wrong_channels() -> onnx.ModelProto:
    return _quant_model(scale=np.full((1, 5, 1, 1), 0.1))


def quant_unknown_rounding_mode() -> onnx.ModelProto:
    return _quant_model(rounding_mode="STOCHASTIC")


def quant_missing_inputs() -> onnx.ModelProto:
    node = helper.make_node("Quant", ["x", "s"], ["y"], name="short_quant", domain=QONNX, signed=1, narrow=0)
    return _model([node], [_init("s", 0.1)])


def bipolar_negative_scale() -> onnx.ModelProto:
    node = helper.make_node("BipolarQuant", ["x", "s"], ["y"], name="bipolar", domain=QONNX)
    return _model([node], [_init("s", -1.0)])


def weight_quant_zero_scale() -> onnx.ModelProto:
    """The invalid quantizer sits on a constant weight, not on the activation."""
    model = _valid_model()
    for init in model.graph.initializer:
        if init.name == "ws":
            init.CopyFrom(_init("ws", 0.0))
    return model


def dynamic_scale() -> onnx.ModelProto:
    """The scale is a graph input, known only at run time."""
    node = helper.make_node("Quant", ["x", "s", "z", "b"], ["y"], name="dynamic_quant", domain=QONNX, signed=1, narrow=0)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4]), helper.make_tensor_value_info("s", TensorProto.FLOAT, [])]
    return _model([node], [_init("z", 0.0), _init("b", 4.0)], inputs=inputs)


def trunc_dynamic_scale() -> onnx.ModelProto:
    """A Trunc whose scale is computed at run time (valid QONNX, once refused)."""
    node = helper.make_node(
        "Trunc", ["x", "s", "z", "ib", "os", "ob"], ["y"], name="dynamic_trunc", domain=QONNX, rounding_mode="FLOOR"
    )
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4]), helper.make_tensor_value_info("s", TensorProto.FLOAT, [])]
    return _model([node], [_init("z", 0.0), _init("ib", 8.0), _init("os", 1.0), _init("ob", 4.0)], inputs=inputs, qonnx_version=2)


# ---- FloatQuant parameters outside the contract --------------------------------------------


def _float_quant_model(exponent: float = 4.0, mantissa: float = 3.0, bias: float = 7.0, max_val: float = 448.0, **attrs: object) -> onnx.ModelProto:
    node = helper.make_node("FloatQuant", ["x", "s", "e", "m", "b", "mx"], ["y"], name="float_quant", domain=QONNX, **attrs)
    inits = [_init("s", 0.1), _init("e", exponent), _init("m", mantissa), _init("b", bias), _init("mx", max_val)]
    return _model([node], inits)


def float_quant_overflow_undefined() -> onnx.ModelProto:
    """saturation=0 with neither has_inf nor has_nan: nothing says what an overflow becomes."""
    return _float_quant_model(saturation=0, has_inf=0, has_nan=0)


def float_quant_mantissa_2_5() -> onnx.ModelProto:
    return _float_quant_model(mantissa=2.5)


def float_quant_max_val_0() -> onnx.ModelProto:
    return _float_quant_model(max_val=0.0)


# ---- Trunc versions ---------------------------------------------------------------------


def _trunc_inits() -> list[onnx.TensorProto]:
    return [_init("s", 0.25), _init("z", 0.0), _init("ib", 8.0), _init("os", 1.0), _init("ob", 4.0)]


def trunc_v1_declared_v2() -> onnx.ModelProto:
    """Five inputs (version 1) while the model imports the QONNX domain at version 2."""
    node = helper.make_node("Trunc", ["x", "s", "z", "ib", "ob"], ["y"], name="trunc_v1_node", domain=QONNX, rounding_mode="FLOOR")
    return _model([node], _trunc_inits(), qonnx_version=2)


def trunc_v2_declared_v1() -> onnx.ModelProto:
    """Six inputs (version 2) while the model imports the QONNX domain at version 1."""
    node = helper.make_node("Trunc", ["x", "s", "z", "ib", "os", "ob"], ["y"], name="trunc_v2_node", domain=QONNX, rounding_mode="FLOOR")
    return _model([node], _trunc_inits(), qonnx_version=1)


def trunc_four_inputs() -> onnx.ModelProto:
    node = helper.make_node("Trunc", ["x", "s", "z", "ib"], ["y"], name="trunc_short", domain=QONNX, rounding_mode="FLOOR")
    return _model([node], _trunc_inits(), qonnx_version=None)


def trunc_v1_no_rounding_mode() -> onnx.ModelProto:
    node = helper.make_node("Trunc", ["x", "s", "z", "ib", "ob"], ["y"], name="trunc_v1_no_mode", domain=QONNX)
    return _model([node], _trunc_inits(), qonnx_version=1)


def trunc_v2_no_rounding_mode() -> onnx.ModelProto:
    node = helper.make_node("Trunc", ["x", "s", "z", "ib", "os", "ob"], ["y"], name="trunc_no_mode", domain=QONNX)
    return _model([node], _trunc_inits(), qonnx_version=2)


# ---- loading hazards --------------------------------------------------------------------


def _external(location: str) -> onnx.ModelProto:
    model = _quant_model()
    scale = next(t for t in model.graph.initializer if t.name == "s")
    scale.ClearField("raw_data")
    del scale.float_data[:]
    scale.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        entry = scale.external_data.add()
        entry.key, entry.value = key, value
    return model


def external_data_traversal() -> onnx.ModelProto:
    return _external("../../../../../../etc/passwd")


def external_data_absolute() -> onnx.ModelProto:
    return _external("/etc/passwd")


def external_data_missing() -> onnx.ModelProto:
    return _external("no_such_weights.bin")


def opset_too_new() -> onnx.ModelProto:
    model = _quant_model()
    model.opset_import[0].version = 99
    return model


def unknown_qonnx_op() -> onnx.ModelProto:
    """A FINN op in the QONNX domain that qlower does not lower (MultiThreshold)."""
    node = helper.make_node("MultiThreshold", ["x", "t"], ["y"], name="thresholds", domain=QONNX, out_dtype="UINT4")
    return _model([node], [_init("t", np.arange(15, dtype=F32).reshape(1, 15).repeat(3, 0))])


def control_flow() -> onnx.ModelProto:
    """A Quant inside an If branch: control flow is out of scope."""
    branch_node = helper.make_node("Quant", ["x", "s", "z", "b"], ["yq"], name="branch_quant", domain=QONNX, signed=1, narrow=0)
    branch = helper.make_graph([branch_node], "branch", [], [helper.make_tensor_value_info("yq", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["yi"], name="passthrough")], "other", [],
                              [helper.make_tensor_value_info("yi", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="branchy_if", then_branch=branch, else_branch=other)]
    inits = [_init("s", 0.1), _init("z", 0.0), _init("b", 4.0), _init("cond", True, np.bool_)]
    return _model(nodes, inits)


CORPUS: dict[str, Callable[[], bytes | onnx.ModelProto]] = {
    "empty.onnx": empty,
    "truncated.onnx": truncated,
    "random_bytes.onnx": random_bytes,
    "tensor_proto.onnx": tensor_proto,
    "graph_proto.onnx": graph_proto,
    "no_nodes.onnx": no_nodes,
    "cyclic.onnx": cyclic,
    "dangling_input.onnx": dangling_input,
    "duplicate_tensor_names.onnx": duplicate_tensor_names,
    "duplicate_initializer_output.onnx": duplicate_initializer_output,
    "duplicate_quantizer_names.onnx": duplicate_quantizer_names,
    "output_from_nothing.onnx": output_from_nothing,
    "inconsistent_tensor_data.onnx": inconsistent_tensor_data,
    "quant_nan_scale.onnx": quant_nan_scale,
    "quant_inf_scale.onnx": quant_inf_scale,
    "quant_zero_scale.onnx": quant_zero_scale,
    "quant_negative_scale.onnx": quant_negative_scale,
    "quant_empty_scale.onnx": quant_empty_scale,
    "quant_bitwidth_0.onnx": quant_bitwidth_0,
    "quant_bitwidth_nan.onnx": quant_bitwidth_nan,
    "quant_bitwidth_vector.onnx": quant_bitwidth_vector,
    "quant_zero_point_nan.onnx": quant_zero_point_nan,
    "quant_scale_wrong_rank.onnx": quant_scale_wrong_rank,
    "quant_scale_wrong_channels.onnx": quant_scale_wrong_channels,
    "quant_unknown_rounding_mode.onnx": quant_unknown_rounding_mode,
    "quant_missing_inputs.onnx": quant_missing_inputs,
    "bipolar_negative_scale.onnx": bipolar_negative_scale,
    "weight_quant_zero_scale.onnx": weight_quant_zero_scale,
    "float_quant_overflow_undefined.onnx": float_quant_overflow_undefined,
    "float_quant_mantissa_2_5.onnx": float_quant_mantissa_2_5,
    "float_quant_max_val_0.onnx": float_quant_max_val_0,
    "trunc_v1_declared_v2.onnx": trunc_v1_declared_v2,
    "trunc_v2_declared_v1.onnx": trunc_v2_declared_v1,
    "trunc_four_inputs.onnx": trunc_four_inputs,
    "trunc_v1_no_rounding_mode.onnx": trunc_v1_no_rounding_mode,
    "trunc_v2_no_rounding_mode.onnx": trunc_v2_no_rounding_mode,
    "external_data_traversal.onnx": external_data_traversal,
    "external_data_absolute.onnx": external_data_absolute,
    "external_data_missing.onnx": external_data_missing,
    "opset_too_new.onnx": opset_too_new,
    "unknown_qonnx_op.onnx": unknown_qonnx_op,
    "control_flow.onnx": control_flow,
}


# Valid QONNX that older qlower refused; lowered and verified now (not written as files).
LOWERED: dict[str, Callable[[], onnx.ModelProto]] = {
    "dynamic_scale": dynamic_scale,
    "trunc_dynamic_scale": trunc_dynamic_scale,
    "quant_bitwidth_2_5": quant_bitwidth_2_5,
    "quant_bitwidth_33": quant_bitwidth_33,
    "quant_zero_point_out_of_range": quant_zero_point_out_of_range,
}


def build() -> dict[str, bytes]:
    """File name -> exact file contents, for every corpus entry."""
    files = {}
    for name, make in CORPUS.items():
        made = make()
        files[name] = made if isinstance(made, bytes) else made.SerializeToString()
    return files


def main(dest: Path = HERE) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in build().items():
        (dest / name).write_bytes(data)
    print(f"wrote {len(CORPUS)} files to {dest}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
