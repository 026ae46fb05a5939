"""Models over protobuf's 2 GB limit, with the limit lowered to a few KB (issue 9).

``qlower.output.MAX_PROTOBUF_BYTES`` is read when used, so a test that lowers it sends a
model of a few KB down every path a >2 GB model takes: the checker on a skeleton by path,
ONNX Runtime given the large initializers as external initializers (lowered model and
reference groups alike), the saved optimized graph with its data file, and the output
written with external data. ``make bench`` runs the same paths at real size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qlower
from qlower import ir, large_models, ort_sessions, output, reference, semantics
from qlower.errors import ModelLoadError

QONNX = "qonnx.custom_op.general"
LIMIT = 6000  # bytes: each 32x32 float weight (4 KiB) is over EXTERNAL_MIN_BYTES, the model over this


def float_weights_beside_a_quantized_unit(seed: int = 0) -> onnx.ModelProto:
    """x -> Quant -> MatMul(Quant(w0)) -> MatMul(float w1) -> Add(float b) -> MatMul(float w2):
    the float weights stay float when lowered, so the lowered model stays over the limit."""
    rng = np.random.default_rng(seed)
    width = 32
    inits = [
        numpy_helper.from_array(np.array(0.0625, np.float32), "scale"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero_point"),
        numpy_helper.from_array(np.array(8.0, np.float32), "bit_width"),
        numpy_helper.from_array((rng.standard_normal((width, width)) * 0.25).astype(np.float32), "w0"),
        numpy_helper.from_array((rng.standard_normal((width, width)) * 0.1).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((width, width)) * 0.1).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal((1, width)).astype(np.float32), "b"),
    ]
    quant = dict(domain=QONNX, signed=1, rounding_mode="ROUND")
    nodes = [
        helper.make_node("Quant", ["x", "scale", "zero_point", "bit_width"], ["a"], name="act_quant", narrow=0, **quant),
        helper.make_node("Quant", ["w0", "scale", "zero_point", "bit_width"], ["wq"], name="weight_quant", narrow=1, **quant),
        helper.make_node("MatMul", ["a", "wq"], ["m0"], name="matmul_q"),
        helper.make_node("MatMul", ["m0", "w1"], ["m1"], name="matmul_float"),
        helper.make_node("Add", ["m1", "b"], ["m2"], name="bias"),
        helper.make_node("MatMul", ["m2", "w2"], ["y"], name="matmul_float_2"),
    ]
    graph = helper.make_graph(
        nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QONNX, 1)])
    model.ir_version = 8
    return model


def _bytes(model: onnx.ModelProto) -> bytes:
    """The model's bytes with no tensor saying where its data was read from (onnx.load
    leaves ``data_location`` DEFAULT set on tensors it read from external data)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for tensor in model.graph.initializer:
        tensor.ClearField("data_location")
    return model.SerializeToString()


@pytest.fixture
def lowered_limit(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Lower protobuf's limit to ``LIMIT`` and count what takes the large-model paths."""
    calls = {"check": 0, "external_sessions": 0}
    check = large_models.check

    def counted_check(model: onnx.ModelProto) -> None:
        calls["check"] += 1
        check(model)

    make_session = ort_sessions.make_session

    def counted_session(model: onnx.ModelProto | bytes, **kwargs: object):  # type: ignore[no-untyped-def]
        if kwargs.get("external") or (isinstance(model, onnx.ModelProto) and large_models.needs_split(model)):
            calls["external_sessions"] += 1
        return make_session(model, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(output, "MAX_PROTOBUF_BYTES", LIMIT)
    monkeypatch.setattr(large_models, "check", counted_check)
    monkeypatch.setattr(reference, "make_session", counted_session)
    monkeypatch.setattr("qlower.verification.runners.make_session", counted_session)
    return calls


def test_a_lowered_model_over_the_limit_converts_verifies_and_writes_external_data(
    lowered_limit: dict[str, int], tmp_path: Path
) -> None:
    source = tmp_path / "large.onnx"
    onnx.save_model(float_weights_beside_a_quantized_unit(), str(source), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="large.onnx.data", size_threshold=1024)
    out = tmp_path / "large.qcdq.onnx"
    result = qlower.convert(source, to="qcdq", output_path=out)
    report = result.report.verification
    assert report is not None and report.passed, report.failures if report else None
    assert lowered_limit["check"] == 1
    # both ORT levels (deployed and tapped) and the reference group holding w1, b and w2
    assert lowered_limit["external_sessions"] >= 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["large.onnx", "large.onnx.data", "large.qcdq.onnx", "large.qcdq.onnx.data"]
    )
    assert not output.fits_inline(result.model), "the lowered model must stay over the limit"
    assert result.report.verification.kernels is not None  # counted in ORT's saved graph and its data file

    # The same model, the same bytes, the same verification as with the limit out of the way.
    written = onnx.load(str(out))
    lowered_limit["check"] = 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(output, "MAX_PROTOBUF_BYTES", 2**31 - 1)
        inline = qlower.convert(float_weights_beside_a_quantized_unit(), to="qcdq")
    assert lowered_limit["check"] == 0
    assert _bytes(written) == _bytes(result.model) == _bytes(inline.model)
    assert inline.report.verification is not None
    assert report.to_dict() == inline.report.verification.to_dict()


def test_verify_reads_both_models_with_external_data(lowered_limit: dict[str, int], tmp_path: Path) -> None:
    source, out = tmp_path / "large.onnx", tmp_path / "large.qop.onnx"
    onnx.save_model(float_weights_beside_a_quantized_unit(1), str(source), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="large.onnx.data", size_threshold=1024)
    qlower.convert(source, to="qop", output_path=out, verify_result=False)
    assert Path(f"{out}.data").is_file()
    calls = lowered_limit["external_sessions"]
    report = qlower.verify(source, out, target="qop")
    assert report.passed, report.failures
    assert lowered_limit["external_sessions"] >= calls + 3


def test_the_checker_by_path_passes_a_valid_large_model_and_refuses_an_invalid_one(lowered_limit: dict[str, int]) -> None:
    model = float_weights_beside_a_quantized_unit()
    del model.graph.node[:3]  # the float part: standard ops only
    model.graph.node[0].input[0] = "x"
    del model.opset_import[1:]
    assert not large_models.fits_inline(model)
    large_models.check(model)
    model.graph.node[1].op_type = "NoSuchOp"
    with pytest.raises(onnx.checker.ValidationError, match="NoSuchOp"):
        large_models.check(model)


@pytest.mark.parametrize("to", ["qcdq", "qop"])
def test_reference_quantizing_weights_a_slice_at_a_time_verifies_the_same(monkeypatch: pytest.MonkeyPatch, to: str) -> None:
    # The reference bounds its temporaries by quantizing a constant SLICE_ELEMENTS at a
    # time; per-channel scales and a narrow range must give the verification report (and
    # model) they give when quantized whole.
    model = float_weights_beside_a_quantized_unit(2)
    channels = np.linspace(0.01, 0.08, 32, dtype=np.float32).reshape(1, 32)
    model.graph.initializer.append(numpy_helper.from_array(channels, "channel_scale"))
    model.graph.node[1].input[1] = "channel_scale"
    whole = qlower.convert(model, to=to)
    monkeypatch.setattr(semantics, "SLICE_ELEMENTS", 7 * 32)  # 7 rows, 5 slices
    sliced = qlower.convert(model, to=to)
    assert sliced.model.SerializeToString() == whole.model.SerializeToString()
    assert sliced.report.verification is not None and whole.report.verification is not None
    assert sliced.report.verification.passed
    assert sliced.report.verification.to_dict() == whole.report.verification.to_dict()


def _save_external(model: onnx.ModelProto, path: Path) -> None:
    model = onnx.ModelProto.FromString(model.SerializeToString())  # onnx.save_model moves the data out of it
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=1024)


def test_external_weights_are_memory_mapped_and_convert_as_if_inline(tmp_path: Path) -> None:
    model = float_weights_beside_a_quantized_unit(3)
    _save_external(model, tmp_path / "m.onnx")
    loaded = ir.load_model(tmp_path / "m.onnx")
    mapped = {tensor.name for tensor in loaded.graph.initializer if ir.is_mapped(tensor)}
    assert mapped == {"w0", "w1", "w2"}  # 4 KiB each; the small ones were written inline
    by_name = {tensor.name: tensor for tensor in model.graph.initializer}
    for tensor in loaded.graph.initializer:
        values = ir.tensor_array(tensor)
        assert isinstance(values, np.memmap) == (tensor.name in mapped)
        assert np.array_equal(values, numpy_helper.to_array(by_name[tensor.name]))
        ir.release_pages(values)  # dropped pages read back from the file unchanged
        assert np.array_equal(values, numpy_helper.to_array(by_name[tensor.name]))
    assert ir.tensor_array(loaded.graph.initializer[3]) is ir.tensor_array(loaded.graph.initializer[3])  # one mapping
    from_file = qlower.convert(tmp_path / "m.onnx", to="qcdq")
    inline = qlower.convert(model, to="qcdq")
    assert from_file.model.SerializeToString() == inline.model.SerializeToString()
    assert from_file.report.verification is not None and inline.report.verification is not None
    assert from_file.report.verification.to_dict() == inline.report.verification.to_dict()


def test_external_data_shorter_than_its_tensor_is_refused(tmp_path: Path) -> None:
    _save_external(float_weights_beside_a_quantized_unit(), tmp_path / "m.onnx")
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="needs 4096 bytes of external data"):
        qlower.convert(tmp_path / "m.onnx", verify_result=False)


def _resident_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
def test_released_pages_of_a_mapped_weight_stop_being_resident(tmp_path: Path) -> None:
    weight = np.arange(1 << 20, dtype=np.float32).reshape(1024, 1024)  # 4 MiB
    model = float_weights_beside_a_quantized_unit()
    model.graph.initializer.append(numpy_helper.from_array(weight, "big"))
    _save_external(model, tmp_path / "m.onnx")
    loaded = ir.load_model(tmp_path / "m.onnx")
    values = ir.tensor_array(next(t for t in loaded.graph.initializer if t.name == "big"))
    data = (tmp_path / "m.onnx.data").resolve()
    assert float(values[512:].sum(dtype=np.float64)) == float(weight[512:].sum(dtype=np.float64))
    assert _resident_kib(data) >= 2048  # the half it read
    ir.release_pages(values[512:])
    assert _resident_kib(data) < 64
    assert np.array_equal(values, weight)  # read again from the file


def test_ort_is_given_weights_as_external_initializers_whatever_the_model_size() -> None:
    # onnxruntime.InferenceSession keeps the bytes it is given for the session's life: they
    # must not hold the weights (ORT has its own copy), so a model with weights is split
    # even far below protobuf's limit, and a session opened that way runs the same.
    model = qlower.convert(float_weights_beside_a_quantized_unit(), to="qcdq", verify_result=False).model
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if large_models.is_large(t)}
    assert weights and output.fits_inline(model)
    data, arrays = large_models.session_inputs(model)
    skeleton = {t.name: t for t in onnx.ModelProto.FromString(data).graph.initializer}
    assert all(not skeleton[name].raw_data and skeleton[name].data_location == TensorProto.EXTERNAL for name in weights)
    assert arrays.keys() == weights.keys() and all(np.array_equal(arrays[n], weights[n]) for n in weights)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32)}
    for optimized in (False, True):
        split_session = ort_sessions.make_session(model, optimized=optimized)
        inline_session = ort_sessions.make_session(model.SerializeToString(), optimized=optimized)  # bytes: as given
        assert reference.identical(split_session.run(None, feeds)[0], inline_session.run(None, feeds)[0])


def test_the_unoptimized_level_reads_the_callers_weights_and_the_optimized_level_a_copy() -> None:
    # ORT_DISABLE_ALL (no graph transformer, no prepacking) is given the arrays themselves
    # (add_initializer): no copy, so sessions given one memory map hold its pages once.
    # ORT_ENABLE_ALL's transformers read the weights, so it is given a copy of its own.
    model = qlower.convert(float_weights_beside_a_quantized_unit(), to="qcdq", verify_result=False).model
    data, split_arrays = large_models.session_inputs(model)
    arrays = {name: array.copy() for name, array in split_arrays.items()}  # writable
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32)}
    sessions = {optimized: ort_sessions.make_session(data, optimized=optimized, external=arrays) for optimized in (False, True)}
    before = {optimized: session.run(None, feeds)[0] for optimized, session in sessions.items()}
    inline = ort_sessions.make_session(model.SerializeToString(), optimized=False).run(None, feeds)[0]
    assert reference.identical(before[False], inline)
    arrays["w2"][...] = 0  # (changing a weight after the sessions are made shows which reads it)
    assert not np.any(sessions[False].run(None, feeds)[0])
    assert reference.identical(sessions[True].run(None, feeds)[0], before[True])


def test_a_lowered_weight_with_the_originals_bytes_is_given_to_ort_as_the_originals_map(tmp_path: Path) -> None:
    from qlower.verification.sessions import Lowered

    original = float_weights_beside_a_quantized_unit(2)
    _save_external(original, tmp_path / "m.onnx")
    lowered = qlower.convert(tmp_path / "m.onnx", to="qcdq", verify_result=False).model
    changed = next(t for t in lowered.graph.initializer if t.name == "w2")
    changed.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(changed) * 2, "w2"))  # same shape, other bytes
    _save_external(lowered, tmp_path / "m.qcdq.onnx")
    loaded_original, loaded_lowered = ir.load_model(tmp_path / "m.onnx"), ir.load_model(tmp_path / "m.qcdq.onnx")
    maps = {t.name: ir.tensor_array(t) for t in loaded_original.graph.initializer if ir.is_mapped(t)}
    opening = Lowered.of(loaded_lowered, "onnxruntime", loaded_original)
    assert opening.weights["w1"] is maps["w1"]  # kept as it was: the reference's own map
    assert opening.weights["w2"] is not maps["w2"] and np.array_equal(opening.weights["w2"], numpy_helper.to_array(original.graph.initializer[5]) * 2)
    assert all(np.array_equal(opening.weights[name], weight) for name, weight in Lowered.of(loaded_lowered, "onnxruntime").weights.items())
    report = qlower.verify(tmp_path / "m.onnx", tmp_path / "m.qcdq.onnx")
    assert not report.passed  # w2 doubled: the lowered model's own bytes are what ORT ran


@pytest.mark.parametrize("bound", ["over the limit", "large weights below it"])
def test_with_large_weights_one_optimized_session_is_alive_at_a_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bound: str
) -> None:
    # Each ORT_ENABLE_ALL session holds the weights: the one that saves the optimized graph
    # is closed before the deployed one opens, and the deployed one (its batches run) before
    # the saved graph is reopened, with the taps as outputs and its weights read from the
    # data file ORT wrote beside it; over protobuf's limit and for large weights below it.
    from qlower.verification.runners import OrtRunner
    import gc
    import weakref

    monkeypatch.setattr(output, "MAX_PROTOBUF_BYTES", LIMIT) if bound == "over the limit" else monkeypatch.setattr(
        large_models, "MEMORY_BOUND_BYTES", LIMIT
    )
    source, out = tmp_path / "large.onnx", tmp_path / "large.qcdq.onnx"
    _save_external(float_weights_beside_a_quantized_unit(4), source)
    qlower.convert(source, to="qcdq", output_path=out, verify_result=False)
    assert Path(f"{out}.data").exists() == (bound == "over the limit")
    alive: list[weakref.ref] = []  # type: ignore[type-arg]
    opened = []
    make_session = ort_sessions.make_session

    def one_at_a_time(model: onnx.ModelProto | bytes, **kwargs: object):  # type: ignore[no-untyped-def]
        if kwargs.get("optimized"):
            gc.collect()
            assert not [ref for ref in alive if ref() is not None], "an optimized session is still open"
        session = make_session(model, **kwargs)  # type: ignore[arg-type]
        if kwargs.get("optimized"):
            alive.append(weakref.ref(session))
            opened.append(kwargs.get("prepacking", True))
        return session

    monkeypatch.setattr("qlower.verification.runners.make_session", one_at_a_time)
    reopened: list[bool] = []
    reopen = OrtRunner.reopen

    def recording_reopen(runner: OrtRunner, saved: onnx.ModelProto, folder: Path):  # type: ignore[no-untyped-def]
        reopened.append(any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in saved.graph.initializer))
        return reopen(runner, saved, folder)

    monkeypatch.setattr(OrtRunner, "reopen", recording_reopen)
    report = qlower.verify(source, out)
    assert report.passed, report.failures
    assert opened == [False, True, True]  # saves the graph; deployed; the saved graph reopened
    assert reopened == [True] and not report.notes
    assert report.kernels is not None and any(record.level == "ORT_ENABLE_ALL" for record in report.internal)

    with monkeypatch.context() as patch:
        patch.setattr(output, "MAX_PROTOBUF_BYTES", 2**31 - 1)
        patch.setattr(large_models, "MEMORY_BOUND_BYTES", 2**31 - 1)
        patch.setattr("qlower.verification.runners.make_session", make_session)
        inline = qlower.verify(source, out)
    assert report.to_dict() == inline.to_dict()


def test_the_reference_reads_large_weights_below_the_limit_as_arrays(monkeypatch: pytest.MonkeyPatch) -> None:
    # Where a model's constants are memory bound, each reference group is given its large
    # constants as arrays (which ORT_DISABLE_ALL reads in place) instead of inside the
    # group's model bytes; it computes the same values.
    model = float_weights_beside_a_quantized_unit(6)
    feeds = {"x": np.random.default_rng(6).standard_normal((1, 32)).astype(np.float32)}
    inline = reference.ReferenceExecutor(model)
    given: list[dict[str, np.ndarray]] = []
    make_session = ort_sessions.make_session

    def recording(model: onnx.ModelProto | bytes, **kwargs: object):  # type: ignore[no-untyped-def]
        given.append(dict(kwargs.get("external") or {}))  # type: ignore[call-overload]
        return make_session(model, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(reference, "make_session", recording)
    monkeypatch.setattr(large_models, "MEMORY_BOUND_BYTES", LIMIT)
    bound = reference.ReferenceExecutor(model)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in ("w1", "w2", "b")}
    passed = [array for arrays in given for array in arrays.values()]
    assert len(passed) == 2 and all(any(np.array_equal(a, w) for a in passed) for w in (weights["w1"], weights["w2"]))  # b: 128 bytes
    assert reference.identical(bound.run(feeds)["y"], inline.run(feeds)["y"])


def test_the_graph_saved_without_prepacking_is_the_one_the_deployed_session_saves(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from qlower.verification.runners import OrtRunner
    from qlower.verification.sessions import Lowered

    monkeypatch.setattr(output, "MAX_PROTOBUF_BYTES", LIMIT)
    lowered = Lowered.of(qlower.convert(float_weights_beside_a_quantized_unit(5), to="qcdq", verify_result=False).model, "onnxruntime")
    assert lowered.memory_bound
    runner = OrtRunner(True)
    runner.save_optimized(lowered.skeleton, tmp_path / "saved.onnx", lowered.weights)
    runner.open(lowered.skeleton, tmp_path / "deployed.onnx", lowered.weights)
    assert (tmp_path / "saved.onnx.data").read_bytes() == (tmp_path / "deployed.onnx.data").read_bytes()
    saved, deployed = (onnx.load(str(tmp_path / name), load_external_data=False) for name in ("saved.onnx", "deployed.onnx"))
    for tensor in deployed.graph.initializer:  # (each names its own data file)
        for entry in tensor.external_data:
            entry.value = entry.value.replace("deployed.onnx", "saved.onnx")
    assert saved.SerializeToString() == deployed.SerializeToString()


def test_recorded_outputs_replay_in_batch_order_and_a_failed_batch_raises_at_its_turn() -> None:
    from qlower.verification.runners import Session
    from qlower.verification.sessions import Recorded

    class Doubling(Session):
        input_names, output_names = ["x"], ["y", "z"]

        def run(self, names, feeds):  # type: ignore[no-untyped-def]
            if feeds["x"][0] < 0:
                raise RuntimeError("negative")
            return [feeds["x"] * 2, feeds["x"] * 3]

    batches = [{"x": np.array([value], np.float32), "unused": np.zeros(1)} for value in (1, 2, -1, 4)]
    recorded = Recorded(Doubling(), batches)
    assert recorded.run(["z"], {})[0][0] == 3 and recorded.run(["y", "z"], {})[1][0] == 6
    with pytest.raises(RuntimeError, match="negative"):
        recorded.run(["y"], {})


def test_mapped_weights_are_exported_one_at_a_time_with_the_bytes_the_exporter_writes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # to_model exports a weight that is still its whole memory map as a reference to its
    # file and reads it into the model afterwards; the model is the exporter's, byte for byte.
    import onnx_graphsurgeon as gs

    _save_external(float_weights_beside_a_quantized_unit(6), tmp_path / "m.onnx")
    loaded = ir.load_model(tmp_path / "m.onnx")
    graph = ir.to_graph(loaded)
    constants = {name: tensor for name, tensor in graph.tensors().items() if isinstance(tensor, gs.Constant)}
    maps = {name: tensor.values for name, tensor in constants.items() if isinstance(tensor.values, np.memmap)}
    assert {"w1", "w2"} <= maps.keys()
    constants["w2"].values = maps["w2"][:, :]  # a view of the map (as a pass might leave it): exported by value
    export = gs.export_onnx
    referenced: set[str] = set()

    def recording(graph: gs.Graph, **kwargs: object) -> onnx.ModelProto:
        referenced.update(n for n, t in constants.items() if isinstance(t._values, gs.ir.tensor.LazyValues))
        return export(graph, **kwargs)

    monkeypatch.setattr(ir.gs, "export_onnx", recording)
    exported = ir.to_model(graph, loaded)
    monkeypatch.setattr(ir.gs, "export_onnx", export)
    assert referenced == maps.keys() - {"w2"}
    assert all(constants[name].values is values for name, values in maps.items() if name != "w2")  # the graph is as it was
    by_value = gs.export_onnx(graph, do_type_check=False)  # the exporter's own model (every weight by value)
    assert exported.graph.SerializeToString() == by_value.graph.SerializeToString()
    assert not any(ir.is_mapped(tensor) or tensor.external_data for tensor in exported.graph.initializer)


def test_a_lowered_weight_kept_as_it_was_is_read_from_the_originals_file(tmp_path: Path) -> None:
    # A lowered model below the limit (one file) holds its weights in its protobuf; the ones
    # with the original's bytes are swapped for the original's mapped tensors, the rest kept.
    original = float_weights_beside_a_quantized_unit(7)
    _save_external(original, tmp_path / "m.onnx")
    lowered = qlower.convert(tmp_path / "m.onnx", to="qcdq", verify_result=False).model
    changed = next(t for t in lowered.graph.initializer if t.name == "w2")
    changed.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(changed) * 2, "w2"))
    onnx.save_model(lowered, str(tmp_path / "m.qcdq.onnx"))
    loaded_original, loaded_lowered = ir.load_model(tmp_path / "m.onnx"), ir.load_model(tmp_path / "m.qcdq.onnx")
    before = loaded_lowered.SerializeToString()
    shared = large_models.share_original(loaded_lowered, loaded_original)
    assert loaded_lowered.SerializeToString() == before  # not changed
    tensors = {t.name: t for t in shared.graph.initializer}
    maps = {t.name: ir.tensor_array(t) for t in loaded_original.graph.initializer if ir.is_mapped(t)}
    assert ir.is_mapped(tensors["w1"]) and ir.tensor_array(tensors["w1"]) is maps["w1"]
    assert not ir.is_mapped(tensors["w2"]) and np.array_equal(numpy_helper.to_array(tensors["w2"]), numpy_helper.to_array(changed))
    assert [t.name for t in shared.graph.initializer] == [t.name for t in loaded_lowered.graph.initializer]
    assert all(np.array_equal(ir.tensor_array(a), ir.tensor_array(b)) for a, b in zip(shared.graph.initializer, loaded_lowered.graph.initializer))
    assert list(shared.graph.node) == list(loaded_lowered.graph.node)
    inline_original = ir.load_model(onnx.load(str(tmp_path / "m.onnx")))  # nothing mapped: nothing to share
    assert large_models.share_original(loaded_lowered, inline_original) is loaded_lowered
    # verify from the paths (sharing) reports what it reports on the models as given (no sharing)
    report = qlower.verify(tmp_path / "m.onnx", tmp_path / "m.qcdq.onnx")
    assert not report.passed  # w2 doubled: the lowered model's own bytes are what ORT ran
    assert report.to_dict() == qlower.verify(onnx.load(str(tmp_path / "m.onnx")), lowered).to_dict()


def test_an_optimized_session_reads_a_mapped_weight_from_its_file(tmp_path: Path) -> None:
    # ORT_ENABLE_ALL given a weight that is a memory map of a data file reads that file
    # itself (the skeleton's stub names it and the offset) instead of copying the map's
    # pages; the session runs what it runs with the weights copied in.
    _save_external(qlower.convert(float_weights_beside_a_quantized_unit(8), to="qcdq", verify_result=False).model, tmp_path / "m.onnx")
    lowered = ir.load_model(tmp_path / "m.onnx")
    data, arrays = large_models.session_inputs(lowered)
    assert {"w1", "w2"} <= arrays.keys()
    moved_data, rest, folder = large_models.read_from_files(data, arrays)
    assert folder == str(tmp_path.resolve()) and not rest.keys() & {"w1", "w2"}
    stubs = {t.name: {e.key: e.value for e in t.external_data} for t in onnx.ModelProto.FromString(moved_data).graph.initializer}
    for name in ("w1", "w2"):
        assert stubs[name]["location"] == "m.onnx.data"
        start, length = int(stubs[name]["offset"]), int(stubs[name]["length"])
        with open(tmp_path / "m.onnx.data", "rb") as file:
            file.seek(start)
            assert file.read(length) == arrays[name].tobytes()
    copied = {name: np.array(array) for name, array in arrays.items()}  # no longer maps: handed over as arrays
    assert large_models.read_from_files(data, copied) == (data, copied, None)
    feeds = {"x": np.random.default_rng(8).standard_normal((1, 32)).astype(np.float32)}
    from_files = ort_sessions.make_session(data, optimized=True, external=arrays).run(None, feeds)[0]
    from_copies = ort_sessions.make_session(data, optimized=True, external=copied).run(None, feeds)[0]
    assert reference.identical(from_files, from_copies)
