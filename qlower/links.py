"""Editing onnx-graphsurgeon links in time linear in the graph, whatever the sharing.

onnx-graphsurgeon keeps both directions of every edge in ``SynchronizedList``s: clearing
``node.inputs`` removes the node from each input tensor's consumer list with
``list.remove``, which scans that list comparing nodes with ``Node.__eq__`` (a deep
comparison). A quantizer parameter shared by n quantizers has n consumers, so detaching
the n quantizers one by one cost O(n^2) deep comparisons (issue 9: 38 of 46 s at 10k
nodes). Here:

* run-time tensors (``gs.Variable``) lose a detached node at once, by identity: passes
  read their producer and consumer lists while they match, so those stay exact;
* constants keep stale consumer entries until the :func:`constant_links_deferred` block
  the edits ran in ends (every pass runs in one); then only the constants an edit left
  stale are rebuilt, each from its own consumer list. The passes never read a
  constant's consumers (only its values), so between passes all links are exact again.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.util.misc import SynchronizedList

# The constants whose consumer lists edits left stale, by id, while a pass runs (None
# outside one). A context variable, so conversions in other threads keep their own.
_stale_constants: contextvars.ContextVar[dict[int, gs.Constant] | None] = contextvars.ContextVar(
    "qlower_stale_constants", default=None
)


def _note_stale(tensor: gs.Tensor) -> None:
    stale = _stale_constants.get()
    if stale is not None:
        stale[id(tensor)] = tensor


def _drop(links: list, node: gs.Node) -> None:
    """Remove every occurrence of ``node`` from one side of a link, by identity, without
    SynchronizedList's mirroring (the caller handles the other side)."""
    list.__setitem__(links, slice(None), [other for other in links if other is not node])


def detach(*nodes: gs.Node | None) -> None:
    """Disconnect replaced nodes from the graph's tensors; ``graph.cleanup`` drops them."""
    for node in nodes:
        if node is None:
            continue
        for tensor in node.outputs:
            _drop(tensor.inputs, node)
        for tensor in {id(t): t for t in node.inputs}.values():
            if isinstance(tensor, gs.Constant):
                _note_stale(tensor)
            else:
                _drop(tensor.outputs, node)
        list.clear(node.inputs)
        list.clear(node.outputs)


def replace_input(node: gs.Node, index: int, tensor: gs.Tensor) -> None:
    """``node.inputs[index] = tensor`` without scanning the old tensor's consumers by equality."""
    old = node.inputs[index]
    list.__setitem__(node.inputs, index, tensor)
    if isinstance(old, gs.Constant):
        _note_stale(old)
    elif not any(other is old for other in node.inputs):
        _drop(old.outputs, node)
    else:
        # The node still reads ``old`` elsewhere: drop one occurrence only.
        position = next(i for i, other in enumerate(old.outputs) if other is node)
        list.__delitem__(old.outputs, position)
    list.append(tensor.outputs, node)


def _relink_constant(tensor: gs.Constant) -> None:
    """Make one constant's consumer list exact from the list itself: each node on it as
    often as it still reads the constant (detached nodes read nothing), in list order."""
    seen: set[int] = set()
    readers: list[gs.Node] = []
    for node in tensor.outputs:
        if id(node) in seen:
            continue
        seen.add(id(node))
        for other in node.inputs:
            if other is tensor:
                readers.append(node)
    list.__setitem__(tensor.outputs, slice(None), readers)


@contextlib.contextmanager
def constant_links_deferred() -> Iterator[None]:
    """Run a pass's edits with constants' consumer lists rebuilt once, at the end, and
    only for the constants :func:`detach` and :func:`replace_input` left stale.

    Each is rebuilt from its own consumer list, which holds every node that read it
    since the last exact state (edits through gs's own lists keep both sides, and new
    nodes add themselves): the cost is the length of the stale lists, not a sweep over
    every node of the graph per pass. Each ends up listing exactly the nodes that read
    it, as often as they read it.
    """
    stale: dict[int, gs.Constant] = {}
    token = _stale_constants.set(stale)
    try:
        yield
    finally:
        _stale_constants.reset(token)
        for tensor in stale.values():
            _relink_constant(tensor)


# ---- gs objects built without their per-attribute hooks -------------------------------
#
# gs's constructors route every attribute through ``__setattr__`` hooks (one raised and
# caught AttributeError per link list) and build each link list by appending element by
# element: about three quarters of what a pass spends emitting its nodes (a 100k-node
# conversion emits 100k nodes and 225k constants). These build the same objects, with
# the same attributes in the same order and both sides of every link (tests compare them
# with gs's own).


def _link_list(owner: object, mirror: str, items: Sequence[object] = ()) -> SynchronizedList:
    """``SynchronizedList(owner, mirror, items)`` without mirroring ``items`` (the caller does)."""
    links = list.__new__(SynchronizedList)
    list.extend(links, items)
    links.parent_obj = owner
    links.field_name = mirror
    return links


def new_constant(name: str, values: np.ndarray) -> gs.Constant:
    """``gs.Constant(name, values)``."""
    tensor = object.__new__(gs.Constant)
    tensor.__dict__.update(
        name=name, inputs=_link_list(tensor, "outputs"), outputs=_link_list(tensor, "inputs"),
        _values=values, data_location=None, _export_dtype=None,
    )
    return tensor


def new_variable(name: str, dtype: np.dtype | type | None) -> gs.Variable:
    """``gs.Variable(name, dtype=dtype)``."""
    tensor = object.__new__(gs.Variable)
    tensor.__dict__.update(
        name=name, inputs=_link_list(tensor, "outputs"), outputs=_link_list(tensor, "inputs"),
        dtype=dtype, shape=None, type="tensor_type",
    )
    return tensor


def new_node(op: str, name: str, attrs: dict[str, object], inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Tensor]) -> gs.Node:
    """``gs.Node(op, name, attrs, inputs, outputs)``: linked to its tensors on both sides."""
    node = object.__new__(gs.Node)
    node.__dict__.update(
        op=op, name=name, attrs=attrs, inputs=_link_list(node, "outputs", inputs),
        outputs=_link_list(node, "inputs", outputs), domain=None,
    )
    for tensor in inputs:
        list.append(tensor.outputs, node)
    for tensor in outputs:
        list.append(tensor.inputs, node)
    return node


SHARED_CONSTANT_BYTES = 4096


def share_equal_constants(graph: gs.Graph) -> int:
    """Point every reader of a small constant at the first constant with the same role
    (last part of the name), type, shape and bytes (in node order, so the result is
    deterministic); return how many constants became unused.

    Each quantizer's rewrite emits its own scale and zero-point constants, so a model
    whose quantizers share parameters gets one copy per quantizer. ONNX Runtime's
    session creation grows faster than linearly in the number of initializers (10k
    nodes: 20 s with 22,500 initializers, 4 s with the 2,504 distinct ones), and so
    do file size and export time. Large tensors (weights) are left alone: equal weights
    are rare and hashing them would cost a pass over every weight byte.
    """
    first: dict[tuple[str, str, tuple[int, ...], bytes], gs.Constant] = {}
    replaced = 0
    with constant_links_deferred():  # both sides of every changed link
        for node in graph.nodes:
            for index, tensor in enumerate(node.inputs):
                if not isinstance(tensor, gs.Constant):
                    continue
                values = tensor.values
                if not isinstance(values, np.ndarray) or values.nbytes > SHARED_CONSTANT_BYTES:
                    continue
                # Only constants of one role share (the name's last part: "scale", "clip_min"),
                # so a reader still finds each node's parameters under the name its pass gave.
                key = (tensor.name.rsplit("/", 1)[-1], values.dtype.str, values.shape, values.tobytes())
                kept = first.setdefault(key, tensor)
                if kept is not tensor:
                    replace_input(node, index, kept)
                    replaced += 1
    return replaced


def _has_subgraphs(graph: gs.Graph) -> bool:
    if graph.functions:
        return True
    for node in graph.nodes:
        if node.attrs and any(isinstance(value, gs.Graph) for value in node.attrs.values()):
            return True
    return False


def remove_unused_nodes(graph: gs.Graph) -> bool:
    """``graph.cleanup()`` in one sweep: detach and drop every node no graph output depends
    on. False (nothing done) for graphs with subgraphs or functions, which cleanup handles.

    gs's cleanup clears each removed node's inputs one by one: the quadratic removal again
    when many of them read one shared tensor (a qop rewrite leaves each replaced
    quantizer's parameters behind), plus a second full traversal to find them.
    """
    if _has_subgraphs(graph):
        return False
    used: set[int] = set()
    pending = [producer for tensor in graph.outputs for producer in tensor.inputs]
    while pending:
        node = pending.pop()
        if id(node) in used:
            continue
        used.add(id(node))
        for tensor in node.inputs:
            pending.extend(tensor.inputs)
    if len(used) < len(graph.nodes):
        with constant_links_deferred():
            detach(*[node for node in graph.nodes if id(node) not in used])
        graph.nodes = [node for node in graph.nodes if id(node) in used]
    return True


def _producers(node: gs.Node) -> list[gs.Node]:
    """The nodes writing ``node``'s inputs, first occurrence first, as gs's toposort lists them."""
    found: dict[int, gs.Node] = {}
    for tensor in node.inputs:
        for producer in tensor.inputs:
            found.setdefault(id(producer), producer)
    return list(found.values())


def toposort(graph: gs.Graph) -> bool:
    """``graph.toposort()`` without recursion, in the same order: each node's level is one
    more than its producers' highest (0 without producers), levels computed depth first in
    node order, nodes stably sorted by level. False (nothing done) for graphs with
    subgraphs or functions, which gs's toposort handles."""
    if _has_subgraphs(graph):
        return False
    level: dict[int, int] = {}
    order: list[gs.Node] = []
    for root in graph.nodes:
        if id(root) in level:
            continue
        producers = _producers(root)
        stack = [(root, producers, iter(producers))]
        on_stack = {id(root)}
        while stack:
            node, producers, unvisited = stack[-1]
            for producer in unvisited:
                if id(producer) in level:
                    continue
                if id(producer) in on_stack:
                    raise ValueError(f"the graph has a cycle through node {producer.name!r}")
                below = _producers(producer)
                stack.append((producer, below, iter(below)))
                on_stack.add(id(producer))
                break
            else:
                stack.pop()
                on_stack.discard(id(node))
                level[id(node)] = max([level[id(p)] for p in producers], default=-1) + 1
                order.append(node)
    graph.nodes = sorted(order, key=lambda node: level[id(node)])
    return True
