"""``--to qop``: quantized compute units (with the constant affine ops after them) become
QLinearConv / MatMulInteger with exact per-channel requantization, the rest stays exact
QCDQ, and every result verifies within one LSB."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qlower
from qlower import taps
from qlower.ir import OP_ALIASES, is_qonnx_node
from qlower.verification import make_inputs

from paths import BREVITAS_DIR, BREVITAS_MANIFEST, REAL_DIR, REAL_MANIFEST, ZOO_MODELS

QONNX = "qonnx.custom_op.general"
INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "MatMulInteger")
FIXTURES = [BREVITAS_DIR / entry["qonnx"] for entry in BREVITAS_MANIFEST]
ALL_MODELS = ZOO_MODELS + FIXTURES


# ---- tiny QONNX units: Quant(x) -> op(Quant(W) [, Quant(B)]) -> [Relu] -> Quant(y) -------


class UnitBuilder:
    """Collects nodes and initializers for one hand-built QONNX compute unit."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray | float) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def quant(self, name: str, source: str, scale: np.ndarray | float, zero_point: np.ndarray | float, bits: float,
              signed: int = 1, narrow: int = 0, rounding_mode: str = "ROUND") -> str:
        inputs = [source, self.const(f"{name}_s", scale), self.const(f"{name}_z", zero_point), self.const(f"{name}_b", bits)]
        self.nodes.append(helper.make_node("Quant", inputs, [f"{name}_out"], name=name, domain=QONNX,
                                           signed=signed, narrow=narrow, rounding_mode=rounding_mode))
        return f"{name}_out"

    def node(self, op: str, inputs: list[str], output: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def model(self, x_shape: tuple[int, ...], output: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "unit", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QONNX, 1)])
        model.ir_version = 8
        return model


def unit_model(
    op: str,
    x_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    *,
    attrs: dict[str, object] | None = None,
    x_signed: int = 1,
    w_bits: int = 7,
    w_per_channel_axis: int | None = None,
    bias: bool = True,
    bias_scale_factor: float = 1.0,
    bias_multiples: list[int] | None = None,
    relu: bool = False,
    between: str | None = None,
    y_bits: float = 8,
    y_signed: int = 0,
    y_scale: np.ndarray | float = 0.05,
    y_zero_point: float = 0.0,
    y_rounding: str = "ROUND",
    seed: int = 0,
) -> onnx.ModelProto:
    """``Quant(x) -> op(x, Quant(W) [, Quant(B)]) -> [Relu] -> [between] -> Quant(y)``.

    Weights are random grid points, per tensor or with scales along ``w_per_channel_axis``;
    the bias is an int32-range Quant at ``bias_scale_factor * s_x * s_w`` (factor 1 is
    Brevitas's layout) of ``bias_multiples`` (default random). MatMul takes its bias as a
    following Add.
    """
    rng = np.random.default_rng(seed)
    b = UnitBuilder()
    sx = np.float32(0.04)
    x = b.quant("qx", "x", sx, 0.0, 8, signed=x_signed)
    q_max = 2 ** (w_bits - 1) - 1
    if w_per_channel_axis is None:
        sw = np.float32(0.01)
        sw_broadcast = sw
    else:
        sw = (rng.uniform(0.005, 0.02, w_shape[w_per_channel_axis])).astype(np.float32)
        shape = [1] * len(w_shape)
        shape[w_per_channel_axis] = -1
        sw_broadcast = sw.reshape(shape)
    weights = (rng.integers(-q_max, q_max + 1, w_shape) * sw_broadcast).astype(np.float32)
    w = b.quant("qw", b.const("W", weights), sw_broadcast, 0.0, w_bits, narrow=1)
    out_channels = w_shape[0] if op in ("Conv", "ConvTranspose") or (attrs or {}).get("transB") else w_shape[-1]
    inputs = [x, w]
    bias_name = None
    if bias:
        accumulator = (sx * np.asarray(sw, np.float32)).astype(np.float32) * np.float32(bias_scale_factor)
        multiples = rng.integers(-300, 300, out_channels) if bias_multiples is None else np.asarray(bias_multiples, np.float64)
        values = (multiples * accumulator).astype(np.float32)
        bias_name = b.quant("qb", b.const("B", values), accumulator, 0.0, 32)
        if op != "MatMul":
            inputs.append(bias_name)
    y = b.node(op, inputs, "compute", **(attrs or {}))
    if op == "MatMul" and bias_name is not None:
        y = b.node("Add", [y, bias_name], "bias_add")
    if relu:
        y = b.node("Relu", [y], "relu")
    if between is not None:
        y = b.node(between, [y], "between")
    y = b.quant("qy", y, y_scale, y_zero_point, y_bits, signed=y_signed, rounding_mode=y_rounding)
    return b.model(x_shape, y)


def convert_qop(model: onnx.ModelProto) -> qlower.ConversionResult:
    """Convert with verification (which raises above one LSB) and check the bound again."""
    result = qlower.convert(model, to="qop", batches=4)
    verification = result.report.verification
    assert verification is not None and verification.passed, verification.failures
    for row in verification.outputs:
        assert row.max_lsb_diff is None or row.max_lsb_diff <= 1.0, row
    return result


def nodes_of(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op]


def init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def unit_record(result: qlower.ConversionResult, node: str = "compute") -> dict[str, object]:
    return next(u for u in result.report.unit_records if u["node"] == node and u["pass"].startswith("qlinear"))


# ---- single units ------------------------------------------------------------------


CONVS = {
    "conv2d": ((2, 3, 8, 8), (4, 3, 3, 3), {}),
    "conv1d": ((2, 3, 10), (4, 3, 3), {}),
    "conv3d": ((1, 2, 5, 5, 5), (3, 2, 3, 3, 3), {}),
    "depthwise": ((2, 4, 6, 6), (4, 1, 3, 3), {"group": 4}),
    "grouped_strided_padded": ((2, 4, 7, 7), (6, 2, 3, 3), {"group": 2, "strides": [2, 2], "pads": [1, 1, 1, 1]}),
}


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("case", CONVS, ids=str)
def test_conv_becomes_qlinearconv(case: str, per_channel: bool) -> None:
    x_shape, w_shape, attrs = CONVS[case]
    result = convert_qop(unit_model("Conv", x_shape, w_shape, attrs=attrs, w_per_channel_axis=0 if per_channel else None))
    model = result.model
    assert not nodes_of(model, "Conv")
    (conv,) = nodes_of(model, "QLinearConv")
    x_zp, w, w_scale, w_zp, y_zp, bias = (init(model, conv.input[i]) for i in (2, 3, 4, 5, 7, 8))
    assert x_zp.dtype == np.uint8 and int(x_zp) == 128  # signed int8 input, shifted bit-identically
    assert w.dtype == np.int8 and w.shape == w_shape and not np.any(w_zp)
    assert w_scale.shape == (w_shape[0],)  # the exact multiplier M' is per channel
    assert float(init(model, conv.input[1])) == float(init(model, conv.input[6])) == 1.0  # x_scale = y_scale = 1
    assert y_zp.dtype == np.uint8 and int(y_zp) == 0
    assert bias.dtype == np.int32 and bias.shape == (w_shape[0],)
    assert {a.name: helper.get_attribute_value(a) for a in conv.attribute}.get("group", 1) == attrs.get("group", 1)
    assert unit_record(result)["became"].startswith("QLinearConv")


@pytest.mark.parametrize(
    "op, x_shape, w_shape, attrs, bias, per_channel_axis, expected",
    [
        ("MatMul", (2, 5, 16), (16, 8), {}, False, 1, "MatMulInteger"),
        ("MatMul", (3, 16), (16, 8), {}, True, None, "MatMulInteger"),
        ("Gemm", (3, 16), (8, 16), {"transB": 1}, True, 0, "MatMulInteger"),
        ("Gemm", (16, 3), (16, 8), {"transA": 1}, False, None, "MatMulInteger"),
        ("Gemm", (3, 16), (16, 8), {"alpha": 0.5, "beta": 2.0}, True, None, "MatMulInteger"),
    ],
    ids=["matmul_3d_per_column", "matmul_add_bias", "gemm_transB_bias_per_channel", "gemm_transA", "gemm_alpha_beta"],
)
def test_matmul_and_gemm(op: str, x_shape: tuple[int, ...], w_shape: tuple[int, ...], attrs: dict[str, object],
                         bias: bool, per_channel_axis: int | None, expected: str) -> None:
    model = unit_model(op, x_shape, w_shape, attrs=attrs, bias=bias, w_per_channel_axis=per_channel_axis)
    result = convert_qop(model)
    ops = Counter(n.op_type for n in result.model.graph.node)
    assert ops[expected] == 1 and not ops["MatMul"] and not ops["Gemm"]
    (node,) = nodes_of(result.model, expected)
    w = init(result.model, node.input[1])
    assert w.dtype == np.int8 and w.shape == (16, 8)  # Gemm's transB folded into [K, N]
    assert not np.any(init(result.model, node.input[3]))  # weight zero point 0
    (add,) = [n for n in result.model.graph.node if n.op_type == "Add" and n.input[0] == node.output[0]]
    assert init(result.model, add.input[1]).dtype == np.int32 and init(result.model, add.input[1]).shape == (8,)
    (mul,) = nodes_of(result.model, "Mul")
    assert init(result.model, mul.input[1]).shape == (8,)  # the per-column multiplier M'
    if attrs.get("transA"):
        (transpose,) = nodes_of(result.model, "Transpose")
        assert transpose.output[0] == node.input[0]


def test_relu_folds_into_the_integer_clip() -> None:
    # Unsigned output, zero point 0: Relu is uint8 saturation, nothing to emit.
    result = convert_qop(unit_model("Conv", (1, 3, 6, 6), (4, 3, 3, 3), relu=True))
    assert not nodes_of(result.model, "Relu") and not nodes_of(result.model, "Clip")
    assert "implied by saturation" in unit_record(result)["became"]
    # Signed 8-bit output (uint8, zero point 128): Relu becomes Clip[128, 255] after QLinearConv.
    result = convert_qop(unit_model("Conv", (1, 3, 6, 6), (4, 3, 3, 3), relu=True, y_signed=1))
    (conv,), (clip,) = nodes_of(result.model, "QLinearConv"), nodes_of(result.model, "Clip")
    assert clip.input[0] == conv.output[0] and not nodes_of(result.model, "Relu")
    assert (int(init(result.model, clip.input[1])), int(init(result.model, clip.input[2]))) == (128, 255)
    # Signed 4-bit output: the range Clip stays and its lower bound becomes the zero point.
    result = convert_qop(unit_model("Conv", (1, 3, 6, 6), (4, 3, 3, 3), relu=True, y_signed=1, y_bits=4))
    (clip,) = nodes_of(result.model, "Clip")
    assert (int(init(result.model, clip.input[1])), int(init(result.model, clip.input[2]))) == (128, 135)


def test_sub_8_bit_output_keeps_its_integer_clip() -> None:
    result = convert_qop(unit_model("MatMul", (3, 16), (16, 8), bias=False, y_bits=3))
    (quantize,) = [n for n in nodes_of(result.model, "QuantizeLinear") if n.name == "compute/requantize"]
    (clip,) = nodes_of(result.model, "Clip")
    assert clip.input[0] == quantize.output[0]
    assert (int(init(result.model, clip.input[1])), int(init(result.model, clip.input[2]))) == (0, 7)


def test_output_zero_point_form_is_folded() -> None:
    """The QCDQ passes emit Div -> Add(zp) -> Q(1, 0) for a non-zero zero point."""
    result = convert_qop(unit_model("Conv", (1, 3, 6, 6), (4, 3, 3, 3), y_zero_point=37.0, y_scale=0.02))
    (conv,) = nodes_of(result.model, "QLinearConv")
    assert int(init(result.model, conv.input[7])) == 37
    assert not nodes_of(result.model, "Div") and not nodes_of(result.model, "Add")


def test_int8_weights_by_default_and_the_x86_without_vnni_option() -> None:
    """int8 weights (the fast u8s8 kernel, exact with VNNI/AMX and on ARM) by default; for
    x86 without VNNI, weights above |w| = 64 are stored uint8 (zero point 128, u8u8 kernel)."""
    model = unit_model("Conv", (1, 3, 6, 6), (4, 3, 3, 3), w_bits=8)
    result = convert_qop(model)
    (conv,) = nodes_of(result.model, "QLinearConv")
    w = init(result.model, conv.input[3])
    assert w.dtype == np.int8 and int(np.abs(w.astype(int)).max()) > 64
    result = qlower.convert(model, to="qop", batches=4, x86_without_vnni=True)
    assert result.report.verification.passed
    (conv,) = nodes_of(result.model, "QLinearConv")
    w, w_zp = init(result.model, conv.input[3]), init(result.model, conv.input[5])
    assert w.dtype == np.uint8 and int(w_zp) == 128 and int(np.abs(w.astype(int) - 128).max()) > 64
    assert "u8u8" in unit_record(result)["reason"]
    # Seven bits never exceed 64: int8 weights, k * w kept within 64, no note.
    result = qlower.convert(unit_model("Conv", (1, 3, 6, 6), (4, 3, 3, 3), w_bits=7), to="qop", batches=4,
                            x86_without_vnni=True)
    w = init(result.model, nodes_of(result.model, "QLinearConv")[0].input[3])
    assert w.dtype == np.int8 and int(np.abs(w.astype(int)).max()) <= 64
    assert unit_record(result)["reason"] is None


def test_weights_wider_than_int8_around_their_zero_point_store_uint8() -> None:
    """Signed 8-bit weights with zero point -1 span -127..128 around it: no int8 fits, so the
    chosen ``k * (w - zw)`` (k 0 for a constant channel, k 2 for a narrow one) is stored uint8
    around one zero point (a fuzz graph once crashed here with an internal error)."""
    b = UnitBuilder()
    x = b.quant("qx", "x", 0.25, 0.0, 2, signed=0)
    sw = np.float32(2.0**-12)
    q = np.array([[127, -128, 5, 0], [3, -4, 2, 1], [-1, -1, -1, -1]], np.float32)  # [N, K] for transB
    w = b.quant("qw", b.const("W", (q + 1) * sw), sw, -1.0, 8)
    y = b.node("Gemm", [x, w], "compute", transB=1)
    model = b.model((2, 4), b.quant("qy", y, 2.0**-9, 0.0, 8, signed=1))
    result = convert_qop(model)
    weights = [init(result.model, n.input[1]) for n in result.model.graph.node if n.op_type == "MatMulInteger"]
    weights += [init(result.model, n.input[3]) for n in nodes_of(result.model, "QLinearConv")]
    assert weights and all(w.dtype == np.uint8 for w in weights), [w.dtype for w in weights]
    assert "wider than int8" in str(unit_record(result)["reason"])


def test_bias_on_a_coarser_grid_is_rescaled_exactly() -> None:
    """A bias at 4 * s_x*s_w (QKeras-style) is an exact int32 at s_x*s_w."""
    result = convert_qop(unit_model("Gemm", (3, 16), (8, 16), attrs={"transB": 1}, bias_scale_factor=4.0))
    assert nodes_of(result.model, "MatMulInteger")
    assert any(u["pass"] == "bias_accumulator_grid" and u["became"] for u in result.report.unit_records)


FALLBACKS = {
    "convtranspose": (dict(op="ConvTranspose", x_shape=(1, 4, 5, 5), w_shape=(4, 4, 3, 3)), "no integer ConvTranspose"),
    "float_op_before_quantizer": (dict(op="Conv", x_shape=(1, 3, 6, 6), w_shape=(4, 3, 3, 3), between="Sigmoid"), "Sigmoid"),
    "16_bit_output": (dict(op="Conv", x_shape=(1, 3, 6, 6), w_shape=(4, 3, 3, 3), y_bits=16), "float ops"),
    "floor_rounding_output": (dict(op="MatMul", x_shape=(3, 16), w_shape=(16, 8), y_rounding="FLOOR"), "float ops"),
    # One accumulator step worth ~4e8 output steps: the reference's float32 rounding decides.
    "output_finer_than_accumulator": (dict(op="MatMul", x_shape=(3, 16), w_shape=(16, 8), y_scale=1e-12), ">= 1"),
}


@pytest.mark.parametrize("case", FALLBACKS, ids=str)
def test_unsupported_units_stay_exact_qcdq_with_a_reason(case: str) -> None:
    kwargs, reason = dict(FALLBACKS[case][0]), FALLBACKS[case][1]
    op = kwargs.pop("op")
    model = unit_model(op, kwargs.pop("x_shape"), kwargs.pop("w_shape"), **kwargs)
    result = qlower.convert(model, to="qop", batches=4, verify_result=False)
    record = unit_record(result)
    assert record["became"] is None and reason in str(record["reason"])
    assert not any(n.op_type in INTEGER_OPS for n in result.model.graph.node)
    assert nodes_of(result.model, op)
    # Still the exact QCDQ lowering: bit-identical to the reference without ORT's fusions.
    report = qlower.verify(model, result.model, target="qcdq", batches=4, check_optimized=False)
    assert report.passed, report.failures


def test_a_long_run_of_ops_before_a_unit_moves_onto_the_integers() -> None:
    """1,200 Reshapes between the quantizer and the unit: unusual, not invalid. The walk back
    to the quantizer keeps its own stack (recursing per op overflowed Python's stack)."""
    b = UnitBuilder()
    current = b.quant("qx", "x", 0.05, 0.0, 8, signed=1)
    b.inits.append(numpy_helper.from_array(np.array([2, 48], np.int64), "shape"))
    shape = "shape"
    for i in range(1200):
        current = b.node("Reshape", [current, shape], f"reshape{i}")
    w = b.quant("qw", b.const("W", np.random.default_rng(1).integers(-60, 61, (48, 8)) * 0.01), 0.01, 0.0, 8, narrow=1)
    y = b.quant("qy", b.node("MatMul", [current, w], "compute"), 0.1, 0.0, 8, signed=0)
    result = convert_qop(b.model((2, 48), y))
    assert unit_record(result)["became"].count("Reshape") == 1200
    assert len(nodes_of(result.model, "MatMulInteger")) == 1


def test_ops_before_a_unit_move_onto_the_integers() -> None:
    """Quant -> MaxPool -> Flatten -> Clip -> Gemm: the ops move onto the integers, the
    Gemm fuses, and the whole integer region between them becomes uint8 (zero point 128)."""
    b = UnitBuilder()
    x = b.quant("qx", "x", 0.05, 0.0, 8, signed=1)
    pooled = b.node("MaxPool", [x], "pool", kernel_shape=[2, 2], strides=[2, 2])
    flat = b.node("Flatten", [pooled], "flat")
    clipped = b.node("Clip", [flat, b.const("lo", 0.0), b.const("hi", 0.05 * 40)], "clip")  # bounds on the grid
    w = b.quant("qw", b.const("W", np.random.default_rng(1).integers(-60, 61, (8, 48)) * 0.01), 0.01, 0.0, 8, narrow=1)
    y = b.quant("qy", b.node("Gemm", [clipped, w], "compute", transB=1), 0.1, 0.0, 8, signed=0)
    result = convert_qop(b.model((2, 3, 8, 8), y))
    assert "input through integer MaxPool -> Flatten -> Clip" in unit_record(result)["became"]
    (gemm,) = nodes_of(result.model, "MatMulInteger")
    assert gemm.input[0] == "clip/integers" and int(init(result.model, gemm.input[2])) == 128
    (clip,) = nodes_of(result.model, "Clip")
    assert [int(init(result.model, name)) for name in clip.input[1:]] == [128, 168]
    (quantize,) = [n for n in nodes_of(result.model, "QuantizeLinear") if n.input[0] == "x"]
    assert init(result.model, quantize.input[2]).dtype == np.uint8


@pytest.mark.parametrize("same_params", [True, False], ids=["equal_qparams", "different_qparams"])
def test_concat_before_a_unit(same_params: bool) -> None:
    """Concat of integers that share scale, zero point and container stays integer."""
    b = UnitBuilder()
    left = b.quant("qa", "x", 0.05, 0.0, 8, signed=0)
    right = b.quant("qb", b.node("Neg", ["x"], "neg"), 0.05 if same_params else 0.04, 0.0, 8, signed=0)
    joined = b.node("Concat", [left, right], "concat", axis=1)
    w = b.quant("qw", b.const("W", np.random.default_rng(2).integers(-60, 61, (4, 6, 1, 1)) * 0.01), 0.01, 0.0, 8, narrow=1)
    y = b.quant("qy", b.node("Conv", [joined, w], "compute"), 0.1, 0.0, 8, signed=0)
    result = convert_qop(b.model((1, 3, 5, 5), y))
    record = unit_record(result)
    if same_params:
        assert "input through integer Concat" in record["became"]
        (conv,), (concat,) = nodes_of(result.model, "QLinearConv"), nodes_of(result.model, "Concat")
        assert conv.input[0] == concat.output[0]
    else:
        assert record["became"] is None and "different scales" in record["reason"]


def test_ops_before_a_unit_that_stays_qcdq_do_not_move() -> None:
    """A Clip whose bound is off the input's grid cannot move: the unit stays exact QCDQ,
    and nothing else in the graph changes layout."""
    b = UnitBuilder()
    clipped = b.node("Clip", [b.quant("qx", "x", 0.05, 0.0, 8), b.const("lo", 0.01), b.const("hi", 1.0)], "clip")
    w = b.quant("qw", b.const("W", np.random.default_rng(1).integers(-60, 61, (8, 8)) * 0.01), 0.01, 0.0, 8, narrow=1)
    y = b.quant("qy", b.node("MatMul", [clipped, w], "compute"), 0.1, 0.0, 8, signed=0)
    model = b.model((2, 8), y)
    result = convert_qop(model)
    record = unit_record(result)
    assert record["became"] is None and "not on the input's grid" in record["reason"]
    qcdq = qlower.convert(model, to="qcdq", verify_result=False).model
    assert Counter(n.op_type for n in result.model.graph.node) == Counter(n.op_type for n in qcdq.graph.node)
    (quantize,) = [n for n in result.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x"]
    assert init(result.model, quantize.input[2]).dtype == np.int8


# ---- real models ------------------------------------------------------------------


def _qonnx_index(model: onnx.ModelProto) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]], dict[str, np.ndarray]]:
    producer = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return producer, consumers, constants


def expected_integer_units(model: onnx.ModelProto) -> int:
    """Conv/MatMul/Gemm whose input, weight and output are integer-quantized at <= 8 bits,
    read from the QONNX graph itself (not from what qlower emitted).

    Input: an activation Quant (2..8 bits, or unsigned 1 bit; ROUND; one scale and an
    integer zero point) or binary quantizer (one scale), possibly behind MaxPool/Reshape/Flatten/Transpose/Squeeze/
    Unsqueeze. Weight: a Quant or BipolarQuant of <= 8 bits on a constant, possibly behind
    Transposes. Output: only consumed (through a MatMul's bias Add, constant per-channel
    Mul/Add/Sub/Div or BatchNormalization, and a Relu) by such an activation Quant.
    """
    producer, consumers, constants = _qonnx_index(model)

    def quantizer(node: onnx.NodeProto | None) -> str | None:
        return OP_ALIASES.get(node.op_type, node.op_type) if node is not None and is_qonnx_node(node) else None

    def attr(node: onnx.NodeProto, name: str, default: object) -> object:
        found = [helper.get_attribute_value(a) for a in node.attribute if a.name == name]
        return found[0] if found else default

    def integer_activation(node: onnx.NodeProto | None, per_channel: bool = True) -> bool:
        """``per_channel``: per-channel scales (one zero point) are accepted (output quantizers,
        a depthwise conv's input). Binary activations with one scale (and an integer zero
        point) are integers too (uint8 codes 127 | 129)."""
        if quantizer(node) == "BipolarQuant" and node.input[0] not in constants:
            scale = constants.get(node.input[1])
            return scale is not None and scale.size == 1
        if quantizer(node) != "Quant" or node.input[0] in constants:
            return False
        scale, zero_point, bits = (constants.get(node.input[i]) for i in (1, 2, 3))
        if scale is None or zero_point is None or bits is None or (scale.size != 1 and not per_channel):
            return False
        if np.unique(zero_point).size != 1:
            return False
        rounding = attr(node, "rounding_mode", b"ROUND")
        rounding = (rounding.decode() if isinstance(rounding, bytes) else rounding).upper()
        signed_one_bit = attr(node, "signed", 1) and float(bits) == 1
        zero = float(zero_point.reshape(-1)[0])
        if signed_one_bit:
            return scale.size == 1 and zero == round(zero) and -128 <= zero <= 127
        return float(bits) <= 8 and rounding in ("ROUND", "HALF_EVEN") and zero == round(zero)

    def integer_weight(node: onnx.NodeProto | None) -> bool:
        kind = quantizer(node)
        if kind is None or node.input[0] not in constants:
            return False
        return kind == "BipolarQuant" or (kind == "Quant" and float(constants[node.input[3]]) <= 8)

    def source(name: str, through: set[str]) -> onnx.NodeProto | None:
        node = producer.get(name)
        while node is not None and node.op_type in through:
            node = producer.get(node.input[0])
        return node

    def only(name: str) -> onnx.NodeProto | None:
        readers = consumers.get(name, [])
        is_output = any(o.name == name for o in model.graph.output)
        return readers[0] if len(readers) == 1 and not is_output else None

    def affine(node: onnx.NodeProto, result: str) -> bool:
        """A per-channel (or scalar) constant Mul/Add/Sub/Div, or an inference BatchNormalization."""
        if node.op_type == "BatchNormalization":
            return node.input[0] == result and all(name in constants for name in node.input[1:5])
        if node.op_type not in ("Mul", "Add", "Sub", "Div"):
            return False
        other = [name for name in node.input if name != result]
        if len(other) != 1 or other[0] not in constants or (node.op_type == "Div" and node.input[0] != result):
            return False
        return sum(size > 1 for size in constants[other[0]].shape) <= 1

    count = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        weight = source(node.input[1], {"Transpose"})
        if not integer_weight(weight):
            continue
        shape = constants[weight.input[0]].shape
        depthwise = node.op_type == "Conv" and shape[1] == 1 and attr(node, "group", 1) > 1
        through = {"MaxPool", "Relu"} if depthwise else {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"}
        if not integer_activation(source(node.input[0], through), per_channel=depthwise):
            continue
        result, after = node.output[0], only(node.output[0])
        if node.op_type == "MatMul" and after is not None and after.op_type == "Add":
            bias = [name for name in after.input if name != result][0]
            if bias in constants or quantizer(producer.get(bias)) is not None:
                result, after = after.output[0], only(after.output[0])
        while after is not None and affine(after, result):
            result, after = after.output[0], only(after.output[0])
        if after is not None and after.op_type == "Relu":
            result, after = after.output[0], only(after.output[0])
        count += integer_activation(after) and after.input[0] == result
    return count


@pytest.mark.parametrize("path", ALL_MODELS, ids=lambda p: p.name.removesuffix(".onnx"))
def test_models_convert_verify_and_use_integer_operators(path: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.qop.onnx"
    result = qlower.convert(path, to="qop", output_path=out)
    verification = result.report.verification
    assert verification is not None and verification.passed, verification.failures
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])

    lowered = Counter(n.op_type for n in result.model.graph.node)
    units = [u for u in result.report.unit_records if u["pass"] in ("qlinear_conv", "qlinear_matmul")]
    # The one refusal the graph reading above cannot see: a folded BatchNorm that makes one
    # accumulator step worth a whole output step or more (the float reference decides there).
    too_fine = sum(1 for u in units if not u["became"] and "(>= 1)" in str(u["reason"]))
    expected = expected_integer_units(onnx.load(str(path))) - too_fine
    assert sum(lowered[op] for op in INTEGER_OPS) == expected
    assert sum(1 for u in units if u["became"]) == expected
    assert all(u["reason"] for u in units if not u["became"])  # every fallback says why


def test_eligible_units_are_counted_in_the_test_data() -> None:
    """The count test above is not vacuous: the fixtures hold convs, matmuls and gemms."""
    total = sum(expected_integer_units(onnx.load(str(p))) for p in ALL_MODELS)
    assert total >= 15


def _optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> list[tuple[str, str]]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [(n.op_type, n.domain) for n in onnx.load(options.optimized_model_filepath).graph.node]


def test_ort_runs_qlinearconv_on_integer_kernels(tmp_path: Path) -> None:
    result = qlower.convert(BREVITAS_DIR / "depthwise_conv.qonnx.onnx", to="qop", verify_result=False)
    optimized = _optimized_ops(result.model, tmp_path)
    assert sum(op == "QLinearConv" for op, _ in optimized) == 2  # ONNX's or ORT's NHWC com.microsoft kernel
    assert not any(op in ("Conv", "FusedConv") for op, _ in optimized)


GRID_OUTPUT_FIXTURES = [
    "conv_w2a2", "conv_w3a5_int16bias", "depthwise_conv", "fixed_point_w4a4", "linear_w4a4_pc",
    "linear_w8a8_pt", "residual_add", "shifted_uint8_act", "shifted_uint8_weights",
]


@pytest.mark.parametrize("name", GRID_OUTPUT_FIXTURES)
def test_qop_matches_qcdq_under_ort_enable_all(name: str) -> None:
    """What users deploy: both lowerings at ORT_ENABLE_ALL agree within one output step."""
    path = BREVITAS_DIR / f"{name}.qonnx.onnx"
    original = onnx.load(str(path))
    (output_quant,) = [n for n in original.graph.node if n.output[0] == original.graph.output[0].name]
    step = float(numpy_helper.to_array(next(t for t in original.graph.initializer if t.name == output_quant.input[1])))
    feeds = make_inputs(original, 8, seed=3)
    feeds.append({original.graph.input[0].name: np.load(BREVITAS_DIR / f"{name}.input.npy")})
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    sessions = [ort.InferenceSession(qlower.convert(path, to=to, verify_result=False).model.SerializeToString(), options,
                                     providers=["CPUExecutionProvider"]) for to in ("qcdq", "qop")]
    for feed in feeds:
        qcdq, qop = (session.run(None, feed)[0] for session in sessions)
        assert np.rint(np.abs(qcdq.astype(np.float64) - qop) / step).max() <= 1


# ---- affine ops between the unit and its quantizer, exact requantization ----------------


def affine_unit_model(op: str, x_shape: tuple[int, ...], w_shape: tuple[int, ...], chain: list[str], *,
                      attrs: dict[str, object] | None = None, relu: bool = True, y_bits: int = 4, y_signed: int = 0,
                      seed: int = 0) -> onnx.ModelProto:
    """``Quant(x) -> op(x, Quant(W), b) -> chain (BN | Mul | Add | Sub | Div, per channel) -> [Relu] -> Quant(y)``
    with random float parameters: negative and zero BatchNorm gammas, a bias off any grid."""
    rng = np.random.default_rng(seed)
    b = UnitBuilder()
    x = b.quant("qx", "x", np.float32(0.0371), 0.0, 4, signed=0)
    channels = w_shape[0] if op == "Conv" or (attrs or {}).get("transB") else w_shape[-1]
    axis = 0 if op == "Conv" or (attrs or {}).get("transB") else 1
    shape = [1] * len(w_shape)
    shape[axis] = -1
    sw = rng.uniform(0.005, 0.02, channels).astype(np.float32).reshape(shape)
    w = b.quant("qw", b.const("W", (rng.integers(-7, 8, w_shape) * sw).astype(np.float32)), sw, 0.0, 4, narrow=1)
    inputs = [x, w]
    if op != "MatMul":
        inputs.append(b.const("bias", rng.normal(0, 0.05, channels).astype(np.float32)))
    y = b.node(op, inputs, "compute", **(attrs or {}))
    per_channel = (channels, 1, 1) if op == "Conv" else (channels,)
    for i, kind in enumerate(chain):
        if kind == "BatchNormalization":
            gamma = rng.normal(0, 1, channels).astype(np.float32)
            gamma[0], gamma[-1] = 0.0, -abs(gamma[-1])  # a zero and a negative gamma
            params = [b.const(f"bn{i}_{name}", value) for name, value in (
                ("gamma", gamma), ("beta", rng.normal(0, 0.3, channels)), ("mean", rng.normal(0, 0.2, channels)),
                ("var", rng.uniform(0.01, 1.0, channels)))]
            y = b.node("BatchNormalization", [y, *params], f"bn{i}", epsilon=1e-5)
        else:
            value = rng.uniform(0.5, 2.0, per_channel) * rng.choice([-1, 1], per_channel) if kind in ("Mul", "Div") \
                else rng.normal(0, 0.2, per_channel)
            y = b.node(kind, [y, b.const(f"c{i}", value)], f"{kind.lower()}{i}")
    if relu:
        y = b.node("Relu", [y], "relu")
    y = b.quant("qy", y, np.float32(0.0613), 0.0, y_bits, signed=y_signed)
    return b.model(x_shape, y)


AFFINE_CASES = {
    "conv_bn_relu": ("Conv", (2, 3, 7, 7), (8, 3, 3, 3), ["BatchNormalization"], {"pads": [1, 1, 1, 1]}, True),
    "depthwise_bn": ("Conv", (2, 6, 7, 7), (6, 1, 3, 3), ["BatchNormalization"], {"group": 6}, False),
    "conv_mul_add_sub_div": ("Conv", (2, 3, 6, 6), (5, 3, 1, 1), ["Mul", "Add", "Sub", "Div"], {}, True),
    "matmul_add_bn": ("MatMul", (16, 24), (24, 10), ["Add", "BatchNormalization"], {}, True),
    "gemm_mul": ("Gemm", (16, 24), (10, 24), ["Mul"], {"transB": 1}, False),
}


@pytest.mark.parametrize("case", AFFINE_CASES, ids=str)
def test_affine_ops_fold_into_the_unit_exactly(case: str) -> None:
    op, x_shape, w_shape, chain, attrs, relu = AFFINE_CASES[case]
    model = affine_unit_model(op, x_shape, w_shape, chain, attrs=attrs, relu=relu, y_signed=0 if relu else 1)
    result = qlower.convert(model, to="qop", batches=8)
    record = unit_record(result)
    assert record["became"] and " -> ".join(chain) + " folded" in record["became"], record
    assert "exact requantization" in record["became"] and record["reason"] is None
    ops = Counter(n.op_type for n in result.model.graph.node)
    assert not any(ops[kind] for kind in ("BatchNormalization", "Sub", "Div", "Conv", "MatMul", "Gemm", "Relu"))
    assert ops["Mul"] + ops["Add"] == (0 if op == "Conv" else 2)  # MatMulInteger's int32 Add and Mul(M')
    for row in result.report.verification.outputs:  # exact, not merely within one step
        assert row.max_lsb_diff == 0, row
    if "BatchNormalization" in chain:
        assert "negative channel multipliers" in record["became"] and "constant channels" in record["became"]


def test_a_bias_off_the_accumulator_grid_folds_exactly() -> None:
    result = convert_qop(unit_model("Conv", (1, 3, 6, 6), (4, 3, 3, 3), bias_scale_factor=1.37))
    assert "exact requantization" in unit_record(result)["became"]
    # A bias that saturates every output: the int32 bias stays in range, outputs constant.
    result = convert_qop(unit_model("Conv", (1, 3, 6, 6), (4, 3, 3, 3), bias_multiples=[2**31 - 1024, 5, -5, 0]))
    assert unit_record(result)["became"]


def test_per_channel_scales_join_the_weight_scale() -> None:
    """A per-channel output quantizer, and a depthwise conv reading it with per-channel input
    scales: both scale vectors go into the per-channel multiplier (QLinearConv takes only
    scalar x and y scales, and gets 1 for both)."""
    rng = np.random.default_rng(5)
    b = UnitBuilder()
    x = b.quant("qx", "x", 0.05, 0.0, 8, signed=1)
    w1 = b.quant("qw1", b.const("W1", rng.integers(-7, 8, (6, 3, 1, 1)) * 0.02), 0.02, 0.0, 4, narrow=1)
    per_channel = rng.uniform(0.02, 0.08, (1, 6, 1, 1)).astype(np.float32)
    y1 = b.quant("qy1", b.node("Relu", [b.node("Conv", [x, w1], "pointwise")], "relu1"), per_channel, 0.0, 4, signed=0)
    w2 = b.quant("qw2", b.const("W2", rng.integers(-7, 8, (6, 1, 3, 3)) * 0.03), 0.03, 0.0, 4, narrow=1)
    y2 = b.quant("qy2", b.node("Conv", [y1, w2], "compute", group=6, pads=[1, 1, 1, 1]), 0.07, 0.0, 8, signed=1)
    result = qlower.convert(b.model((2, 3, 7, 7), y2), to="qop", batches=8)
    assert len(nodes_of(result.model, "QLinearConv")) == 2 and not nodes_of(result.model, "Conv")
    for row in result.report.verification.outputs:
        assert row.max_lsb_diff == 0, row
    for conv in nodes_of(result.model, "QLinearConv"):
        assert float(init(result.model, conv.input[1])) == float(init(result.model, conv.input[6])) == 1.0
    # The per-channel activation between them now lives only as integers: a tap says where.
    (tap,) = [t for t in taps.read(result.model) if t.original == "qy1_out"]
    assert tap.axis is not None and len(tap.scale) == 6 and tap.tensor in {o for n in result.model.graph.node for o in n.output}


def test_trunc_output_reaches_the_next_unit_as_integers(tmp_path: Path) -> None:
    """TruncAvgPool -> Flatten -> Gemm: the Trunc's float-path output becomes Cast(uint8) ->
    DequantizeLinear (bit-identical), so the Gemm reads integers (here ORT fuses it into QGemm,
    its output being the float logits)."""
    result = qlower.convert(BREVITAS_DIR / "trunc_avgpool.qonnx.onnx", to="qop", batches=4)
    assert result.report.verification.passed
    (record,) = [u for u in result.report.unit_records if u["pass"] == "rounded_outputs_as_integers"]
    assert "exact" in record["became"]
    optimized = _optimized_ops(result.model, tmp_path)
    assert not any(op in ("Gemm", "MatMul", "FusedGemm", "Conv", "FusedConv") for op, _ in optimized)
    assert any(t.original.endswith("Trunc_output_0") or "Trunc" in t.original for t in taps.read(result.model))


def _float_input_compute_nodes(model: onnx.ModelProto) -> int:
    """Conv/MatMul/Gemm whose data input does not come from a QONNX quantizer (through ops
    that only move or pool values): the ones that stay float by design."""
    producer = {out: node for node in model.graph.node for out in node.output}
    count = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        source = producer.get(node.input[0])
        while source is not None and source.op_type in ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "MaxPool"):
            source = producer.get(source.input[0])
        count += source is None or not is_qonnx_node(source)
    return count


FLOAT_KERNELS = ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "ConvTranspose")
INTEGER_KERNELS = ("QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "DynamicQuantizeMatMul")


@pytest.mark.parametrize("entry", REAL_MANIFEST, ids=lambda e: e["name"])
def test_real_models_run_every_quantized_unit_on_integer_kernels(entry: dict, tmp_path: Path) -> None:
    """Brevitas's MobileNet v1 4b, CNV, ResNet-18 (BatchNorm after every conv) and the deployment
    nets: after ORT_ENABLE_ALL, every Conv/MatMul/Gemm whose input is quantized is an integer
    kernel (counted in the optimized graph ORT saves); the ones left are those on the float image.
    Each is verified: every tap within one step of its unit-local reference, and on MobileNet
    (where float32 near-ties of the reference compound end to end) at most 1e-5 of the tap
    elements differ from it at all."""
    path = REAL_DIR / entry["qonnx"]
    result = qlower.convert(path, to="qop", batches=2, verify_result=True)
    verification = result.report.verification
    assert verification.passed, verification.failures
    for summary in verification.to_dict()["internal_summary"]:
        assert summary["differing_share"] <= 1e-5, summary
    optimized = [op for op, _ in _optimized_ops(result.model, tmp_path)]
    original = onnx.load(str(path))
    compute = sum(n.op_type in ("Conv", "MatMul", "Gemm") for n in original.graph.node)
    float_left = _float_input_compute_nodes(original)
    assert sum(op in FLOAT_KERNELS for op in optimized) == float_left
    assert sum(op in INTEGER_KERNELS for op in optimized) == compute - float_left


def test_per_channel_input_to_a_full_conv_stays_qcdq() -> None:
    """Per-channel input scales into a conv that sums over channels: no single multiplier, so
    the unit stays exact QCDQ (and its quantized bias is left where it is)."""
    rng = np.random.default_rng(9)
    b = UnitBuilder()
    x = b.quant("qx", "x", rng.uniform(0.02, 0.08, (1, 3, 1, 1)).astype(np.float32), 0.0, 8, signed=0)
    w = b.quant("qw", b.const("W", rng.integers(-7, 8, (4, 3, 3, 3)) * 0.02), 0.02, 0.0, 4, narrow=1)
    bias = b.quant("qb", b.const("B", rng.integers(-50, 50, 4) * 0.001), 0.001, 0.0, 32)
    y = b.quant("qy", b.node("Conv", [x, w, bias], "compute"), 0.07, 0.0, 8, signed=1)
    result = convert_qop(b.model((2, 3, 6, 6), y))
    record = unit_record(result)
    assert record["became"] is None and "only a depthwise conv" in record["reason"]
