"""The reference executor against qonnx's own executor and functions, and on its own terms.

Where qonnx and the SPEC disagree, a test below shows the disagreement and that qlower
follows the SPEC (see the ``test_qonnx_disagrees_*`` tests).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.custom_op.general.bipolar_quant import binary_quant as qonnx_bipolar
from qonnx.custom_op.general.floatquant import float_quant as qonnx_float_quant
from qonnx.custom_op.general.quant import quant as qonnx_quant
from qonnx.custom_op.general.quant import resolve_rounding_mode
from qonnx.custom_op.general.trunc import trunc_v1 as qonnx_trunc_v1
from qonnx.custom_op.general.trunc import trunc_v2 as qonnx_trunc_v2
from qonnx.transformation.infer_shapes import InferShapes

from helpers import QONNX_DOMAIN, make_conv_chain_model, make_qonnx_model, make_quant_model
from paths import ZOO_MODELS
from qlower import semantics
from qlower.errors import InvalidModelError, InvalidQuantizerError, UnsupportedError
from qlower.ir import QONNX_DOMAINS, load_model
from qlower.ort_sessions import make_session
from qlower.reference import ReferenceExecutor, evaluate_qonnx_node
from qlower.verification import make_inputs

F32 = np.float32


def _qonnx_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """qonnx's executor, on a copy with the domain spelled its way and shapes inferred."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.domain in QONNX_DOMAINS:
            node.domain = QONNX_DOMAIN
    for entry in copy.opset_import:
        if entry.domain in QONNX_DOMAINS:
            entry.domain = QONNX_DOMAIN
    wrapper = ModelWrapper(copy).transform(InferShapes())
    return execute_onnx(wrapper, feeds)


# ---------------------------------------------------------------------------------------
# Whole models: the zoo


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("path", ZOO_MODELS, ids=lambda p: p.stem)
def test_zoo_models_match_qonnx_exactly(path: Path) -> None:
    model = load_model(path)
    executor = ReferenceExecutor(model)
    batches = make_inputs(model, 4, seed=1)
    rng = np.random.default_rng(2)
    # Plus plain uniform inputs, which the quantizer-aware draws do not produce.
    batches += [{name: rng.uniform(-3, 3, a.shape).astype(a.dtype) for name, a in batches[0].items()} for _ in range(2)]
    if "unsw" in path.stem:  # the input is annotated BIPOLAR; qonnx sanitizes other values
        batches = batches[:4]
    for feeds in batches:
        ours = executor.run(feeds)
        theirs = _qonnx_run(model, feeds)
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert ours[name].shape == theirs[name].shape
            assert np.abs(ours[name] - theirs[name]).max() == 0, name


# ---------------------------------------------------------------------------------------
# One operator against qonnx's functions


def _random_x(rng: np.random.Generator, scale: np.ndarray, zero_point: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform values plus exact rounding ties of the grid."""
    uniform = rng.uniform(-300, 300, shape).astype(F32) * scale
    ties = ((rng.integers(-200, 200, shape) + F32(0.5) - zero_point) * scale).astype(F32)
    return np.where(rng.random(shape) < 0.3, ties, uniform).astype(F32)


@pytest.mark.parametrize("mode", ["ROUND", "FLOOR", "CEIL"])
@pytest.mark.parametrize("seed", range(6))
def test_quant_matches_qonnx(mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(20):
        per_channel = rng.random() < 0.5
        scale = np.exp2(rng.uniform(-8, 2, (1, 4, 1) if per_channel else ())).astype(F32)
        zero_point = F32(rng.integers(-3, 4)) if rng.random() < 0.7 else F32(rng.uniform(-2, 2))
        bits = F32(rng.integers(1, 17))
        signed, narrow = int(rng.integers(0, 2)), int(rng.integers(0, 2))
        x = _random_x(rng, scale, zero_point, (2, 4, 5))
        args = (np.asarray(scale, F32), np.asarray(zero_point, F32), np.asarray(bits, F32))
        ours = evaluate_qonnx_node("Quant", [x, *args], {"signed": signed, "narrow": narrow, "rounding_mode": mode})
        theirs = qonnx_quant(x, *args, signed, narrow, mode)
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("mode", ["ROUND", "FLOOR", "CEIL"])
@pytest.mark.parametrize("seed", range(4))
def test_trunc_matches_qonnx(mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(20):
        scale = F32(np.exp2(rng.integers(-6, 2)) * rng.uniform(0.5, 1.5))
        zero_point = F32(rng.integers(-2, 3))
        in_bits, out_bits = F32(rng.integers(8, 17)), F32(rng.integers(2, 8))
        out_scale = F32(scale * np.exp2(rng.integers(0, 6)) * rng.uniform(0.8, 1.2))
        signed, narrow = int(rng.integers(0, 2)), int(rng.integers(0, 2))
        x = _random_x(rng, np.asarray(scale), zero_point, (3, 7))
        p = [np.asarray(v, F32) for v in (scale, zero_point, in_bits, out_scale, out_bits)]
        v2 = evaluate_qonnx_node("Trunc", [x, *p], {"signed": signed, "narrow": narrow, "rounding_mode": mode})
        np.testing.assert_array_equal(v2, qonnx_trunc_v2(x, p[0], p[1], p[2], narrow, signed, p[3], p[4], mode))
        v1 = evaluate_qonnx_node("Trunc", [x, p[0], p[1], p[2], p[4]], {"rounding_mode": mode})
        np.testing.assert_array_equal(v1, qonnx_trunc_v1(x, p[0], p[1], p[2], p[4], mode))


def test_bipolar_quant_matches_qonnx() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(500), [0.0, -0.0, 1e-45, -1e-45]]).astype(F32)
    scale = np.asarray(F32(0.37))
    np.testing.assert_array_equal(evaluate_qonnx_node("BipolarQuant", [x, scale], {}), qonnx_bipolar(x, scale))


def test_float_quant_matches_qonnx_with_round() -> None:
    rng = np.random.default_rng(0)
    for exponent, mantissa, bias, max_val in [(4, 3, 7, 448.0), (5, 2, 15, 57344.0), (3, 4, 3, 30.0), (4, 3, 9, 60.0)]:
        scale = np.asarray(F32(rng.uniform(0.1, 2)))
        magnitudes = np.exp2(rng.uniform(-bias - mantissa - 2, np.log2(max_val) + 1, 5000))
        x = (magnitudes * rng.choice([-1, 1], 5000)).astype(F32) * scale
        # Include the float32 neighbours of every power of two in range.
        powers = np.exp2(np.arange(-bias - mantissa - 1, np.log2(max_val) + 1)).astype(F32)
        x = np.concatenate([x, powers, np.nextafter(powers, F32(0)), np.nextafter(powers, F32(np.inf))]).astype(F32)
        params = [np.asarray(F32(v)) for v in (exponent, mantissa, bias, max_val)]
        ours = evaluate_qonnx_node("FloatQuant", [x, scale, *params], {})
        # qonnx returns float64 here (its max value is a float64 scalar); its CustomOp casts
        # the exact float64 product back to float32, which is the float32 product.
        theirs = qonnx_float_quant(x, scale, *params[:3], True, params[3]).astype(F32)
        np.testing.assert_array_equal(ours, theirs)


# ---------------------------------------------------------------------------------------
# Where qonnx disagrees with the SPEC: qlower follows the SPEC


def test_qonnx_disagrees_half_up_next_to_a_tie_and_above_2_pow_23() -> None:
    values = np.array([0.49999997, -0.49999997, 2**23 + 1], dtype=F32)
    # qonnx: sign(x) * floor(|x| + 0.5); 0.49999997 + 0.5 rounds up to 1.0 in float32, and
    # 8388609 + 0.5 rounds to the even 8388610.
    assert resolve_rounding_mode("HALF_UP")(values).tolist() == [1, -1, 8388610]
    assert semantics.round_with_mode(values, "HALF_UP").tolist() == [0, 0, 8388609]
    # HALF_DOWN as sign(x) * ceil(|x| - 0.5) fails above 2**23 too.
    assert resolve_rounding_mode("HALF_DOWN")(np.array([2**23 + 1], F32)).tolist() == [8388608]
    assert semantics.round_with_mode(np.array([2**23 + 1], F32), "HALF_DOWN").tolist() == [8388609]
    # The same through a whole Quant node (32-bit, scale 1).
    args = [np.asarray(F32(1)), np.asarray(F32(0)), np.asarray(F32(32))]
    x = np.array([0.49999997, 2**23 + 1], dtype=F32)
    assert qonnx_quant(x, *args, 1, 0, "HALF_UP").tolist() == [1, 8388610]
    assert evaluate_qonnx_node("Quant", [x, *args], {"rounding_mode": "HALF_UP"}).tolist() == [0, 8388609]


@pytest.mark.filterwarnings("ignore")
def test_qonnx_disagrees_on_six_input_trunc_without_a_declared_version() -> None:
    # qonnx picks the Trunc version from opset_import alone: with the domain missing it runs
    # version 1 on a six-input node and reads out_scale as the output bit width.
    model = make_qonnx_model("Trunc", [0.5, 0.0, 8.0, 2.0, 4.0], {"rounding_mode": "FLOOR"}, shape=(1, 4))
    del model.opset_import[1]
    x = np.array([[6.5, 40.0, -40.0, -0.75]], dtype=F32)
    ours = ReferenceExecutor(model).run({"x": x})["y"]
    assert ours.tolist() == [[6.0, 14.0, -16.0, -2.0]]  # SPEC 1.3, version 2 (see test_semantics)
    theirs = _qonnx_run(model, {"x": x})["y"]
    assert not np.array_equal(theirs, ours)


def test_qonnx_disagrees_with_an_int64_zero_point() -> None:
    # qonnx adds an int64 zero point in float64 (numpy promotes float32 + int64); the SPEC
    # fixes float32. x/s = 0.49999997 and zp = 1: in float32 the sum rounds to the tie 1.5,
    # which rounds to 2, giving (2 - 1) * s = 1; in float64 it stays below 1.5 and gives 0.
    x = np.array([0.49999997], dtype=F32)
    scale, zero_point, bits = np.asarray(F32(1)), np.asarray(1, dtype=np.int64), np.asarray(8, dtype=np.int64)
    assert qonnx_quant(x, scale, zero_point, bits, 1, 0, "ROUND").tolist() == [0.0]
    assert evaluate_qonnx_node("Quant", [x, scale, zero_point, bits], {}).tolist() == [1.0]


def test_qonnx_disagrees_on_float_quant_just_below_a_power_of_two() -> None:
    # qonnx finds the binade with a float32 log2, which rounds log2(15.999999) up to 4.0 and
    # puts the value in [16, 32) (step 2) instead of [8, 16) (step 1): visible with FLOOR.
    x = np.array([np.nextafter(F32(16), F32(0))], dtype=F32)
    params = [np.asarray(F32(v)) for v in (4, 3, 7, 448)]
    theirs = qonnx_float_quant(x, np.asarray(F32(1)), *params[:3], True, params[3], rounding_mode="FLOOR").astype(F32)
    ours = evaluate_qonnx_node("FloatQuant", [x, np.asarray(F32(1)), *params], {"rounding_mode": "FLOOR"})
    assert theirs.tolist() == [14.0]
    assert ours.tolist() == [15.0]


# ---------------------------------------------------------------------------------------
# evaluate_qonnx_node on its own


def test_attributes_defaults_aliases_and_spellings() -> None:
    x = np.array([-3.3, -0.5, 0.5, 1.5, 200.0], dtype=F32)
    params = [np.asarray(F32(1)), np.asarray(F32(0)), np.asarray(F32(8))]
    default = evaluate_qonnx_node("Quant", [x, *params], {})  # signed 1, narrow 0, ROUND
    assert default.tolist() == [-3, 0, 0, 2, 127]
    assert np.array_equal(evaluate_qonnx_node("IntQuant", [x, *params], {}), default)
    assert np.array_equal(evaluate_qonnx_node("Quant", [x, *params], {"rounding_mode": b"round"}), default)
    floor = evaluate_qonnx_node("Quant", [x, *params], {"rounding_mode": "Floor", "signed": 0})
    assert floor.tolist() == [0, 0, 0, 1, 200]


def test_evaluation_is_pure() -> None:
    x = np.array([0.3, -0.7], dtype=F32)
    params = [np.asarray(F32(0.25)), np.asarray(F32(1)), np.asarray(F32(4))]
    before = [a.copy() for a in (x, *params)]
    evaluate_qonnx_node("Quant", [x, *params], {"signed": 0})
    assert all(np.array_equal(a, b) for a, b in zip((x, *params), before))


@pytest.mark.parametrize(
    ("op", "inputs", "attrs", "error", "message"),
    [
        ("Quant", 3, {}, InvalidQuantizerError, "Quant takes 4 inputs, got 3"),
        ("Quant", 4, {"rounding_mode": "NEAREST"}, InvalidQuantizerError, "unknown rounding_mode"),
        ("Quant", 4, {"signed": 2}, InvalidQuantizerError, "attribute signed must be 0 or 1"),
        ("Trunc", 6, {}, InvalidQuantizerError, "Trunc needs a rounding_mode attribute"),
        ("Trunc", 4, {"rounding_mode": "FLOOR"}, InvalidQuantizerError, "Trunc takes 5 or 6 inputs"),
        ("MultiThreshold", 2, {}, UnsupportedError, "MultiThreshold is not a QONNX quantizer"),
    ],
)
def test_malformed_nodes_are_refused(op: str, inputs: int, attrs: dict, error: type, message: str) -> None:
    values = [np.ones(3, F32)] + [np.asarray(F32(1))] * (inputs - 1)
    with pytest.raises(error, match=message):
        evaluate_qonnx_node(op, values, attrs)


def test_bit_width_must_be_a_single_number_of_at_least_one() -> None:
    x, one = np.ones(3, F32), np.asarray(F32(1))
    with pytest.raises(InvalidQuantizerError, match=r"Quant bit width must be a single value, got shape \[2\]"):
        evaluate_qonnx_node("Quant", [x, one, one, np.array([4, 4], F32)], {})
    with pytest.raises(InvalidQuantizerError, match="finite number >= 1"):
        evaluate_qonnx_node("Quant", [x, one, one, np.asarray(F32(0))], {})


# ---------------------------------------------------------------------------------------
# The executor on hand-built graphs


def _model(nodes: list, inputs: list, outputs: list, initializers: list, opset: int = 13, ir: int = 8) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(QONNX_DOMAIN, 1)])
    model.ir_version = ir
    return model


def test_single_quant_model_and_every_domain_spelling() -> None:
    x = np.array([[-1.3, -0.25, 0.0, 0.25, 0.75, 1.1, 63.0, -70.0]], dtype=F32)
    expected = semantics.quant(x, F32(0.5), F32(0), 7, True, False)
    for domain in sorted(QONNX_DOMAINS):
        model = make_quant_model(scale=0.5, bit_width=7, domain=domain)
        executor = ReferenceExecutor(model)
        assert executor.input_names == ("x",) and executor.output_names == ("y",)
        assert np.array_equal(executor.run({"x": x})["y"], expected)


def test_constant_and_runtime_weights_give_the_same_bits_unoptimized() -> None:
    # ORT prepacks constant MatMul weights and then sums in another order than for a
    # runtime weight (ORT 1.32, [1,300]x[300,64]: 53 of 64 results differ). The unoptimized
    # sessions turn prepacking off, so a folded float weight and a DequantizeLinear'd one
    # verify alike; the reference keeps the original's initializers as initializers too.
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((300, 64)).astype(F32)
    x = rng.standard_normal((1, 300)).astype(F32)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 300])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])
    matmul = helper.make_node("MatMul", ["x", "W"], ["y"])
    constant = _model([matmul], [x_info], [y_info], [numpy_helper.from_array(weight, "W")])
    runtime = _model([matmul], [x_info, helper.make_tensor_value_info("W", TensorProto.FLOAT, [300, 64])], [y_info], [])
    ours = ReferenceExecutor(constant).run({"x": x})["y"]
    assert np.array_equal(ours, make_session(constant, optimized=False).run(None, {"x": x})[0])
    assert np.array_equal(ours, make_session(runtime, optimized=False).run(None, {"x": x, "W": weight})[0])


def test_old_opset_constant_nodes_unsorted_and_initializers_as_inputs() -> None:
    # Opset 9, IR 3 style (initializers listed as inputs), a Constant node, nodes out of
    # order, Unsqueeze with an axes attribute (an input from opset 13 on): run as written.
    nodes = [
        helper.make_node("Unsqueeze", ["q"], ["u"], axes=[0]),
        helper.make_node("Quant", ["m", "s", "z", "b"], ["q"], domain="onnx.brevitas", rounding_mode="ROUND"),
        helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(np.asarray(F32(0.25)))),
        helper.make_node("Mul", ["x", "two"], ["m"]),
    ]
    initializers = [numpy_helper.from_array(np.asarray(F32(v)), n) for n, v in (("two", 2), ("z", 0), ("b", 4))]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])]
    inputs += [helper.make_tensor_value_info(i.name, TensorProto.FLOAT, []) for i in initializers]
    model = _model(nodes, inputs, [helper.make_tensor_value_info("u", TensorProto.FLOAT, None)], initializers, opset=9, ir=3)
    executor = ReferenceExecutor(model)
    assert executor.input_names == ("x",)
    x = np.array([[0.1, -0.2, 3.0], [0.06, 0.07, -5.0]], dtype=F32)
    expected = semantics.quant(x * F32(2), F32(0.25), F32(0), 4, True, False)[None]
    assert np.array_equal(executor.run({"x": x})["u"], expected)


def test_outputs_can_be_inputs_initializers_or_intermediate() -> None:
    model = make_quant_model(shape=(2,))
    model.graph.output.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]))
    model.graph.output.append(helper.make_tensor_value_info("p1", TensorProto.FLOAT, []))
    result = ReferenceExecutor(model).run({"x": np.array([0.3, 0.8], F32)})
    assert result["y"].tolist() == [0.5, 1.0]
    assert np.array_equal(result["x"], np.array([0.3, 0.8], F32)) and result["p1"] == F32(0.5)


def test_control_flow_and_unknown_domains_are_refused_by_name() -> None:
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["o"])], "b", [], [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    if_node = helper.make_node("If", ["c"], ["y"], name="the_if", then_branch=branch, else_branch=branch)
    model = _model(
        [if_node],
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [],
    )
    with pytest.raises(UnsupportedError, match=r"^the_if: control flow \(If\) is not supported"):
        ReferenceExecutor(model)
    model = make_quant_model()
    model.graph.node[0].domain = "com.example"
    with pytest.raises(UnsupportedError, match="^Quant_0: operator Quant of domain 'com.example'"):
        ReferenceExecutor(model)


def test_dangling_input_and_quantizer_errors_name_the_node() -> None:
    model = make_quant_model()
    model.graph.node[0].input[1] = "nowhere"
    with pytest.raises(InvalidModelError, match="^Quant_0: input 'nowhere' is produced by nothing"):
        ReferenceExecutor(model)
    model = make_quant_model(scale=np.ones(3, F32))  # a scale that does not broadcast to (1, 8)
    with pytest.raises(InvalidQuantizerError, match="^Quant_0: "):
        ReferenceExecutor(model).run({"x": np.zeros((1, 8), F32)})


def test_groups_of_standard_nodes_match_whole_model_ort() -> None:
    # Standard nodes only: the executor's grouped sessions equal one ORT run of the model.
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Shape", ["r"], ["shape"]),
        helper.make_node("Reshape", ["r", "shape"], ["y"]),
        helper.make_node("Softmax", ["a"], ["z"], axis=-1),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None), helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(rng.standard_normal((16, 5)).astype(F32), "W")],
    )
    x = rng.standard_normal((3, 16)).astype(F32)
    ours = ReferenceExecutor(model).run({"x": x})
    whole = make_session(model, optimized=False).run(["y", "z"], {"x": x})
    assert np.array_equal(ours["y"], whole[0]) and np.array_equal(ours["z"], whole[1])


def test_a_run_from_a_trace_recomputes_only_what_changed_and_equals_a_full_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # The verifier's probe and unit-local runs start from the trace of the plain run.
    import qlower.reference as reference_module

    model = make_conv_chain_model(4, seed=3)
    executor = ReferenceExecutor(model)
    feeds = make_inputs(model, 1, seed=5)[0]
    base = executor.trace(feeds)
    quantized = [node.output[0] for node in model.graph.node if node.op_type == "Quant" and node.output[0].startswith("act_")]
    assert len(quantized) == 5 and model.graph.node[-1].op_type == "Identity"  # act_4_out -> Identity -> y
    ort_runs = []
    original_run = reference_module._OrtStep.run
    monkeypatch.setattr(reference_module._OrtStep, "run", lambda step, env: (ort_runs.append(step), original_run(step, env))[1])
    unchanged = executor.run(feeds, keep=quantized, base=base)
    assert ort_runs == []  # nothing differs from the trace: nothing runs again
    assert all(np.array_equal(unchanged[name], base[name]) for name in [*executor.output_names, *quantized])
    for moved in (quantized[0], quantized[-1]):
        def nudge(values: np.ndarray) -> np.ndarray:
            return values + np.float32(0.25)

        ort_runs.clear()
        full = executor.run(feeds, keep=quantized, perturb={moved: nudge})
        full_runs = len(ort_runs)
        ort_runs.clear()
        partial = executor.run(feeds, keep=quantized, perturb={moved: nudge}, base=base)
        for name in [*executor.output_names, *quantized]:
            assert partial[name].tobytes() == full[name].tobytes(), (moved, name)
        # moving the last quantizer reruns only the Identity; the first reruns what it reaches
        assert full_runs == 5 and (len(ort_runs) == 1 if moved == quantized[-1] else 1 <= len(ort_runs) <= 5)
    # A signed zero is a different value: it is recomputed from, not taken from the trace.
    assert not reference_module.identical(np.array([0.0], F32), np.array([-0.0], F32))
    assert reference_module.identical(np.array([np.nan], F32), np.array([np.nan], F32))
