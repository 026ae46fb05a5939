"""The structure that keeps conversion and verification linear in model size (issue 9).

Speed itself is measured by ``make bench`` (``tests/benchmarks/bench_scale.py``), never
asserted here; these tests pin what makes it linear on a graph whose quantizers all share
one scale, zero-point and bit-width tensor: no deep node comparisons while lowering,
exact links after every pass, one ORT session per distinct reference group, and one copy
of each small constant in the output.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from benchmarks.synthetic import shared_chain

import qlower
from qlower import ir, links, pipeline
from qlower.passes.base import LoweringContext, run_graph_pass
from qlower.passes.registry import graph_passes_for, quantizer_passes_for
from qlower.progress import Progress
from qlower.reference import ReferenceExecutor


@pytest.fixture
def node_comparisons(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts ``gs.Node.__eq__`` calls: what SynchronizedList.remove makes per list entry."""
    calls: Counter = Counter()
    original = gs.Node.__eq__

    def counted(self: gs.Node, other: object) -> bool:
        calls["eq"] += 1
        return original(self, other)

    monkeypatch.setattr(gs.Node, "__eq__", counted)
    return calls


@pytest.mark.parametrize("to", ["qcdq", "qop"])
def test_lowering_a_shared_parameter_chain_compares_no_nodes(node_comparisons: Counter, to: str) -> None:
    # Detaching each of n quantizers from a tensor all n read used to scan that tensor's
    # consumer list comparing nodes deeply: O(n^2) comparisons.
    result = qlower.convert(shared_chain(200), to=to, verify_result=False)
    assert node_comparisons["eq"] == 0
    assert not any(node.domain == "qonnx.custom_op.general" for node in result.model.graph.node)


def _shared_graph() -> tuple[gs.Graph, gs.Constant, list[gs.Node]]:
    shared = gs.Constant("shared", np.ones((), np.float32))
    x = gs.Variable("x", np.float32, (1,))
    nodes = []
    for i in range(6):
        out = gs.Variable(f"y{i}", np.float32, (1,))
        nodes.append(gs.Node("Mul", f"mul{i}", inputs=[x, shared], outputs=[out]))
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[n.outputs[0] for n in nodes]), shared, nodes


def test_detach_is_exact_for_run_time_tensors_at_once_and_for_constants_after_the_block() -> None:
    graph, shared, nodes = _shared_graph()
    x = graph.inputs[0]
    with links.constant_links_deferred():
        links.detach(nodes[1], nodes[4])
        assert [n.name for n in x.outputs] == ["mul0", "mul2", "mul3", "mul5"]  # at once
        assert not nodes[1].inputs and not nodes[1].outputs
    assert [n.name for n in shared.outputs] == ["mul0", "mul2", "mul3", "mul5"]


def test_replace_input_keeps_both_sides_of_the_link() -> None:
    graph, shared, nodes = _shared_graph()
    x = graph.inputs[0]
    other = gs.Constant("other", np.full((), 2, np.float32))
    with links.constant_links_deferred():
        links.replace_input(nodes[0], 0, other)
        links.replace_input(nodes[1], 1, other)
        assert nodes[0].inputs[0] is other and [n.name for n in other.outputs] == ["mul0", "mul1"]
        assert all(n is not nodes[0] for n in x.outputs)
    assert [n.name for n in shared.outputs] == ["mul0", "mul2", "mul3", "mul4", "mul5"]


def test_deferred_links_rebuild_only_the_constants_edits_left_stale() -> None:
    graph, shared, nodes = _shared_graph()
    untouched = gs.Constant("untouched", np.ones((), np.float32))
    reader = gs.Node("Neg", "reader", inputs=[untouched], outputs=[gs.Variable("n", np.float32, (1,))])
    list.append(untouched.outputs, nodes[0])  # a stale entry no edit in the block made
    with links.constant_links_deferred():
        links.detach(nodes[1], nodes[4])
        assert len(shared.outputs) == 6  # stale until the block ends
    assert [n.name for n in shared.outputs] == ["mul0", "mul2", "mul3", "mul5"]
    assert [n.name for n in untouched.outputs] == ["reader", "mul0"]  # not swept: only stale constants are rebuilt
    assert reader.inputs[0] is untouched


def test_deferred_links_keep_a_node_as_often_as_it_still_reads_the_constant() -> None:
    shared = gs.Constant("shared", np.ones((), np.float32))
    other = gs.Constant("other", np.ones((), np.float32))
    square = gs.Node("Mul", "square", inputs=[shared, shared], outputs=[gs.Variable("y", np.float32, (1,))])
    cube = gs.Node("Mul", "cube", inputs=[shared, shared], outputs=[gs.Variable("z", np.float32, (1,))])
    assert [n.name for n in shared.outputs] == ["square", "square", "cube", "cube"]
    with links.constant_links_deferred():
        links.replace_input(square, 1, other)
        links.detach(cube)
    assert [n.name for n in shared.outputs] == ["square"]
    assert [n.name for n in other.outputs] == ["square"]


def test_after_every_pass_each_constant_lists_exactly_its_readers() -> None:
    # Every pass runs its edits in a deferred block; afterwards each constant, also one no
    # node reads any more (the shared quantizer parameters), lists exactly its readers.
    graph = ir.to_graph(ir.normalize(shared_chain(40), ir.MIN_OUTPUT_OPSET))
    constants = {id(t): t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    ctx = LoweringContext(graph=graph, opset=ir.MIN_OUTPUT_OPSET, target="qop")
    pipeline._lower(graph, quantizer_passes_for("qop"), ctx, Progress())
    for rule in graph_passes_for("qop"):
        run_graph_pass(rule, ctx)
    constants.update((id(t), t) for t in graph.tensors().values() if isinstance(t, gs.Constant))
    readers: Counter = Counter((id(t), id(node)) for node in graph.nodes for t in node.inputs if isinstance(t, gs.Constant))
    listed: Counter = Counter((key, id(node)) for key, t in constants.items() for node in t.outputs)
    assert listed == readers and len(constants) > 40


def test_equal_small_constants_are_shared_in_the_output() -> None:
    result = qlower.convert(shared_chain(80), to="qcdq", verify_result=False)
    small = [init for init in result.model.graph.initializer if onnx.numpy_helper.to_array(init).size == 1]
    roles = Counter((init.name.rsplit("/", 1)[-1], init.data_type, onnx.numpy_helper.to_array(init).tobytes()) for init in small)
    assert set(roles.values()) == {1}  # one copy per role and value, not one per quantizer
    assert len(small) < 20  # 20 blocks, each quantizer with its own 2-3 constants before sharing
    assert qlower.verify(shared_chain(80), result.model, batches=2).passed


def test_reference_groups_that_differ_only_in_names_share_one_session() -> None:
    model = shared_chain(80)  # 20 MatMul -> Relu groups between quantizers
    executor = ReferenceExecutor(model)
    assert executor.session_count == 1
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((1, 16)).astype(np.float32)}
    first, again = executor.run(feeds), executor.run(feeds)
    np.testing.assert_array_equal(first[executor.output_names[0]], again[executor.output_names[0]])


def test_progress_is_drawn_on_a_terminal_after_the_delay_only() -> None:
    from io import StringIO

    from rich.console import Console

    from qlower.progress import Progress, TerminalProgress, for_terminal

    screen = StringIO()
    terminal = Console(file=screen, force_terminal=True, width=100)
    with TerminalProgress(terminal, delay=0.0) as progress:
        qlower.convert(shared_chain(40), to="qcdq", verify_result=True, batches=2, progress=progress)
    assert "verifying on 2 batches" in screen.getvalue()
    assert type(for_terminal(terminal, quiet=True)) is Progress  # -q
    assert type(for_terminal(Console(file=StringIO()), quiet=False)) is Progress  # not a terminal
    assert isinstance(for_terminal(terminal, quiet=False), TerminalProgress)

    quick = StringIO()
    with TerminalProgress(Console(file=quick, force_terminal=True), delay=60.0) as progress:
        qlower.convert(shared_chain(40), to="qcdq", verify_result=False, progress=progress)
    assert quick.getvalue() == ""  # runs shorter than the delay draw nothing


def test_cli_prints_no_progress_when_stderr_is_not_a_terminal(tmp_path) -> None:
    import subprocess
    import sys

    path = tmp_path / "chain.onnx"
    onnx.save(shared_chain(40), path)
    for quiet in ([], ["-q"]):
        done = subprocess.run(
            [sys.executable, "-m", "qlower", "convert", str(path), "-o", str(tmp_path / "out.onnx"), "--batches", "2", *quiet],
            capture_output=True, text=True, check=True,
        )
        assert done.stderr == ""


def _same_object(fast: object, made: object) -> None:
    """Same type, same attributes in the same order; link lists equal element by element
    (by identity) and mirrored to the same owner and field."""
    assert type(fast) is type(made)
    assert list(vars(fast)) == list(vars(made))
    for key, value in vars(made).items():
        other = vars(fast)[key]
        if isinstance(value, list):
            assert type(other) is type(value) and [id(v) for v in other] == [id(v) for v in value], key
            assert (other.parent_obj is fast, other.field_name) == (value.parent_obj is made, value.field_name), key
        elif isinstance(value, np.ndarray):
            assert other is value
        else:
            assert other == value and type(other) is type(value), key


def test_fast_constructors_build_what_gs_builds() -> None:
    values = np.arange(3, dtype=np.int8)
    _same_object(links.new_constant("c", values), gs.Constant("c", values))
    _same_object(links.new_variable("v", np.uint8), gs.Variable("v", dtype=np.uint8))
    x, c = gs.Variable("x", dtype=np.float32), gs.Constant("k", values)
    made_out, fast_out = gs.Variable("y", dtype=np.float32), gs.Variable("y", dtype=np.float32)
    made = gs.Node("Mul", "mul", {"a": 1}, [x, c, x], [made_out])
    fast = links.new_node("Mul", "mul", {"a": 1}, [x, c, x], [fast_out])
    assert list(vars(fast)) == list(vars(made)) and (fast.op, fast.name, fast.attrs, fast.domain) == (made.op, made.name, made.attrs, made.domain)
    assert [t for t in fast.inputs] == [x, c, x] and fast.outputs[0] is fast_out
    # Both sides of each link, as often as gs links them: x is read twice by each node.
    assert [id(n) for n in x.outputs] == [id(made), id(made), id(fast), id(fast)]
    assert [id(n) for n in c.outputs] == [id(made), id(fast)]
    assert list(made_out.inputs) == [made] and list(fast_out.inputs) == [fast]
    assert (fast.inputs.parent_obj, fast.inputs.field_name, fast.outputs.field_name) == (fast, "outputs", "inputs")
    fast.inputs[1] = x  # gs's own edits work on them: both sides kept
    # (gs removes the first node equal to it: the equal twin ``made``, as for gs-built nodes)
    assert fast.inputs[1] is x and len(c.outputs) == 1 and [id(n) for n in x.outputs].count(id(fast)) == 3


def test_shared_parameters_are_checked_again_for_another_input_shape() -> None:
    from qlower.analysis import analyse
    from qlower.errors import InvalidQuantizerError

    scale, zero_point, bits = (gs.Constant(name, np.asarray(v, np.float32)) for name, v in
                               (("scale", [0.5, 0.25, 1.0]), ("zero_point", 0.0), ("bit_width", 8.0)))
    nodes = []
    for name, width in (("fits", 3), ("also_fits", 3), ("wrong_width", 4)):
        x, y = gs.Variable(f"{name}_x", np.float32, (1, width)), gs.Variable(f"{name}_y", np.float32, (1, width))
        nodes.append(gs.Node("Quant", name, {"signed": 1, "narrow": 0, "rounding_mode": "ROUND"},
                             [x, scale, zero_point, bits], [y], domain="qonnx.custom_op.general"))
    graph = gs.Graph(nodes=nodes, inputs=[n.inputs[0] for n in nodes], outputs=[n.outputs[0] for n in nodes])
    with pytest.raises(InvalidQuantizerError, match="does not broadcast") as refused:
        analyse(graph)
    assert refused.value.node == "wrong_width"
    nodes.pop()
    graph.nodes = nodes
    assert [q.name for q in analyse(graph)] == ["fits", "also_fits"]
