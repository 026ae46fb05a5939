"""Quantizers prepared once (``semantics.quantizer``, ``reference.prepare_qonnx_node``) give the
bits the per-call evaluation gives: the reference executor prepares each quantizer whose
parameters are constants on its first run and reuses it on every later batch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

from helpers import QONNX_DOMAIN
from qlower import semantics
from qlower.errors import InvalidQuantizerError
from qlower.reference import ReferenceExecutor, evaluate_qonnx_node, prepare_qonnx_node
from qlower.semantics import F32


def _quant_per_call(x, scale, zero_point, bit_width, signed, narrow, mode):  # type: ignore[no-untyped-def]
    """Quant as ``semantics`` computed it before preparation existed, step for step."""
    with np.errstate(all="ignore"):
        t = np.asarray(x, F32) / np.asarray(scale, F32) + np.asarray(zero_point, F32)
        if signed and bit_width == 1:
            q = np.where(t >= 0, F32(1), F32(-1)).astype(F32)
        else:
            q_min, q_max = semantics.float_range(signed, narrow, bit_width)
            q = semantics.round_with_mode(np.clip(t, q_min, q_max), mode)
        return ((q - np.asarray(zero_point, F32)) * np.asarray(scale, F32)).astype(F32)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


SPECIAL = [0.0, -0.0, 0.5, -0.5, 1.5, -2.5, 127.5, -128.5, 1e-45, np.inf, -np.inf, np.nan, 3e38]
values = st.one_of(st.sampled_from(SPECIAL), st.floats(-1e4, 1e4, width=32))
scales = st.one_of(st.sampled_from([1.0, 0.0625, 0.1, 3.0, 1e-30, 0.0, -0.5]), st.floats(2.0**-20, 1024, width=32))
modes = st.sampled_from([*semantics.ROUNDING_MODES, "round", b"HALF_EVEN", "half_up"])
bit_widths = st.one_of(st.integers(1, 24).map(float), st.sampled_from([2.5, 1.0, 31.0, 8.0]))


@settings(max_examples=300, deadline=None)
@given(
    x=hnp.arrays(np.float32, st.integers(0, 12), elements=values),
    scale=scales,
    per_channel=st.booleans(),
    zero_point=st.sampled_from([0.0, 1.0, -3.0, 0.5, 128.0]),
    bit_width=bit_widths,
    signed=st.booleans(),
    narrow=st.booleans(),
    mode=modes,
)
def test_prepared_quant_equals_the_per_call_arithmetic(x, scale, per_channel, zero_point, bit_width, signed, narrow, mode) -> None:  # type: ignore[no-untyped-def]
    s = np.full(x.shape, scale, F32) * np.linspace(1, 2, x.size, dtype=F32) if per_channel else np.array(scale, F32)
    z = np.array(zero_point, F32)
    expected = _quant_per_call(x, s, z, bit_width, signed, narrow, semantics.normalize_rounding_mode(mode))
    with np.errstate(all="ignore"):
        prepared = semantics.quantizer(s, z, bit_width, signed, narrow, mode)
        assert _same_bits(prepared(x), expected)
        assert _same_bits(prepared(x), expected)  # reusable: nothing kept from a call
        assert _same_bits(semantics.quant(x, s, z, bit_width, signed, narrow, mode), expected)
        # the node evaluation, with the bit width and flags as a model holds them
        attrs = {"signed": int(signed), "narrow": int(narrow), "rounding_mode": mode}
        inputs = [x, s, z, np.array(bit_width, F32)]
        node = prepare_qonnx_node("Quant", inputs, attrs)
        assert _same_bits(node(x), expected)
    assert _same_bits(evaluate_qonnx_node("Quant", inputs, attrs), expected)


def test_prepared_quant_on_a_zero_dimensional_input() -> None:
    for x in (np.array(2.6, F32), np.array(-0.0, F32)):
        expected = _quant_per_call(x, np.array(0.5, F32), np.array(0, F32), 4.0, True, False, "ROUND")
        assert _same_bits(semantics.quantizer(np.array(0.5, F32), np.array(0, F32), 4.0, True, False)(x), expected)


@settings(max_examples=200, deadline=None)
@given(
    x=hnp.arrays(np.float32, st.integers(1, 8), elements=values),
    scale=st.floats(2.0**-10, 16, width=32),
    out_scale=st.floats(2.0**-10, 128, width=32),
    zero_point=st.sampled_from([0.0, 2.0, -1.0]),
    in_bits=st.integers(2, 16),
    out_bits=st.integers(1, 12),
    signed=st.booleans(),
    narrow=st.booleans(),
    mode=modes,
    six=st.booleans(),
)
def test_prepared_trunc_equals_semantics(x, scale, out_scale, zero_point, in_bits, out_bits, signed, narrow, mode, six) -> None:  # type: ignore[no-untyped-def]
    s, z, o = np.array(scale, F32), np.array(zero_point, F32), np.array(out_scale, F32)
    attrs = {"signed": int(signed), "narrow": int(narrow), "rounding_mode": mode}
    normalized = semantics.normalize_rounding_mode(mode)
    with np.errstate(all="ignore"):
        if six:
            inputs = [x, s, z, np.array(in_bits, F32), o, np.array(out_bits, F32)]
            expected = semantics.trunc_v2(x, s, z, o, float(out_bits), signed, narrow, normalized)
        else:
            inputs = [x, s, z, np.array(in_bits, F32), np.array(out_bits, F32)]
            expected = semantics.trunc_v1(x, s, z, float(in_bits), float(out_bits), normalized)
        node = prepare_qonnx_node("Trunc", inputs, attrs)
        assert _same_bits(node(x), expected)
        assert _same_bits(node(x), expected)


@settings(max_examples=200, deadline=None)
@given(
    x=hnp.arrays(np.float32, st.integers(1, 8), elements=values),
    scale=st.floats(2.0**-10, 16, width=32),
    format_=st.sampled_from([(4, 3, 7, 448.0), (5, 2, 15, 57344.0), (2, 1, 1, 6.0), (3, 0, 3, 1e9)]),
    flags=st.sampled_from([(0, 0, 1), (1, 0, 0), (0, 1, 0), (1, 1, 1)]),
    mode=modes,
)
def test_prepared_float_quant_equals_semantics(x, scale, format_, flags, mode) -> None:  # type: ignore[no-untyped-def]
    exponent, mantissa, bias, max_val = format_
    has_inf, has_nan, saturation = flags
    attrs = {"has_inf": has_inf, "has_nan": has_nan, "saturation": saturation, "rounding_mode": mode}
    params = [np.array(v, F32) for v in (scale, exponent, mantissa, bias, max_val)]
    with np.errstate(all="ignore"):
        expected = semantics.float_quant(
            x, params[0], exponent, mantissa, bias, max_val, has_inf=bool(has_inf), has_nan=bool(has_nan),
            saturation=bool(saturation), rounding_mode=mode,
        )
        node = prepare_qonnx_node("FloatQuant", [x, *params], attrs)
        assert _same_bits(node(x), expected)


def test_prepared_bipolar_quant_equals_semantics() -> None:
    x = np.array([-1.0, -0.0, 0.0, 2.0, np.nan], F32)
    scale = np.array([0.5, 1, 2, 3, 4], F32)
    assert _same_bits(prepare_qonnx_node("BipolarQuant", [x, scale], {})(x), semantics.bipolar_quant(x, scale))


@pytest.mark.parametrize(
    "op, inputs, attrs, message",
    [
        ("Quant", [np.ones(2, F32), F32(1), F32(0), np.array(0.5, F32)], {}, "Quant bit width must be a finite number >= 1"),
        ("Quant", [np.ones(2, F32), F32(1), F32(0), np.array(8, F32)], {"rounding_mode": "NEAREST"}, "unknown rounding_mode"),
        ("Quant", [np.ones(2, F32), F32(1), F32(0), np.array(8, F32)], {"narrow": 2}, "attribute narrow must be 0 or 1"),
        ("Trunc", [np.ones(2, F32), F32(1), F32(0), F32(8), F32(4)], {}, "Trunc needs a rounding_mode attribute"),
        ("FloatQuant", [np.ones(2, F32), F32(1), F32(4), F32(3), F32(7), F32(448)], {"saturation": 0},
         "FloatQuant with saturation=0 needs has_inf or has_nan"),
    ],
)
def test_prepared_nodes_refuse_what_evaluation_refuses(op: str, inputs: list, attrs: dict, message: str) -> None:
    with pytest.raises(InvalidQuantizerError, match=message):
        evaluate_qonnx_node(op, inputs, attrs)
    with pytest.raises(InvalidQuantizerError, match=message):
        with np.errstate(all="ignore"):
            prepare_qonnx_node(op, inputs, attrs)(inputs[0])


def _activation_chain(mode: str, runtime_scale: bool) -> object:
    """x -> Quant -> Relu -> Quant: the first quantizer's scale is a graph input when
    ``runtime_scale`` (so it cannot be prepared), else an initializer like the others."""
    inits = [
        numpy_helper.from_array(np.array([0.25, 0.5, 1.0, 0.1], F32), "s"),
        numpy_helper.from_array(np.array(1.0, F32), "z"),
        numpy_helper.from_array(np.array(3.0, F32), "b"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])]
    if runtime_scale:
        inputs.append(helper.make_tensor_value_info("rs", TensorProto.FLOAT, [4]))
    nodes = [
        helper.make_node("Quant", ["x", "rs" if runtime_scale else "s", "z", "b"], ["q0"], domain=QONNX_DOMAIN,
                         signed=1, narrow=1, rounding_mode=mode),
        helper.make_node("Relu", ["q0"], ["r"]),
        helper.make_node("Quant", ["r", "s", "z", "b"], ["y"], domain=QONNX_DOMAIN, signed=0, narrow=0, rounding_mode=mode),
    ]
    graph = helper.make_graph(nodes, "chain", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QONNX_DOMAIN, 1)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("mode", ["ROUND", "HALF_UP", "FLOOR", "UP"])
@pytest.mark.parametrize("runtime_scale", [False, True])
def test_executor_batches_after_the_first_equal_a_fresh_executor(mode: str, runtime_scale: bool) -> None:
    rng = np.random.default_rng(3)
    batches = [{"x": (rng.standard_normal((2, 4)) * 3).astype(F32)} for _ in range(4)]
    batches.append({"x": np.array([[-0.0, 0.125, 0.375, np.nan], [np.inf, -1.25, 2.5, -0.05]], F32)})
    if runtime_scale:
        for feeds in batches:
            feeds["rs"] = np.array([0.25, 0.5, 1.0, 0.1], F32)
    executor = ReferenceExecutor(_activation_chain(mode, runtime_scale))  # type: ignore[arg-type]
    for feeds in batches:
        fresh = ReferenceExecutor(_activation_chain(mode, runtime_scale)).trace(feeds)  # type: ignore[arg-type]
        reused = executor.trace(feeds)
        for name in ("q0", "r", "y"):
            assert _same_bits(reused[name], fresh[name]), name
        r = np.maximum(fresh["q0"], F32(0))
        expected = evaluate_qonnx_node("Quant", [r, np.array([0.25, 0.5, 1.0, 0.1], F32), np.array(1.0, F32), np.array(3.0, F32)],
                                       {"signed": 0, "narrow": 0, "rounding_mode": mode})
        assert _same_bits(fresh["y"], expected)
