"""Editing onnx-graphsurgeon links in time linear in the graph, whatever the sharing.

onnx-graphsurgeon keeps both directions of every edge in ``SynchronizedList``s: clearing
``node.inputs`` removes the node from each input tensor's consumer list with
``list.remove``, which scans that list comparing nodes with ``Node.__eq__`` (a deep
comparison). A quantizer parameter shared by n quantizers has n consumers, so detaching
the n quantizers one by one cost O(n^2) deep comparisons (issue 9: 38 of 46 s at 10k
nodes). Here:

* run-time tensors (``gs.Variable``) lose a detached node at once, by identity: passes
  read their producer and consumer lists while they match, so those stay exact;
* constants keep stale consumer entries until :func:`relink_constants` rebuilds every
  constant's consumer list in one sweep over the nodes. The passes never read a
  constant's consumers (only its values); every pass ends with that sweep, so between
  passes all links are exact again.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs


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
            if not isinstance(tensor, gs.Constant):
                _drop(tensor.outputs, node)
        list.clear(node.inputs)
        list.clear(node.outputs)


def replace_input(node: gs.Node, index: int, tensor: gs.Tensor) -> None:
    """``node.inputs[index] = tensor`` without scanning the old tensor's consumers by equality."""
    old = node.inputs[index]
    list.__setitem__(node.inputs, index, tensor)
    if not isinstance(old, gs.Constant) and not any(other is old for other in node.inputs):
        _drop(old.outputs, node)
    elif not isinstance(old, gs.Constant):
        # The node still reads ``old`` elsewhere: drop one occurrence only.
        position = next(i for i, other in enumerate(old.outputs) if other is node)
        list.__delitem__(old.outputs, position)
    list.append(tensor.outputs, node)


def relink_constants(graph: gs.Graph) -> None:
    """Rebuild every live constant's consumer list from the nodes that read it (one sweep).

    Order follows ``graph.nodes``; consumer order of a constant means nothing to export,
    cleanup or toposort, which follow node inputs and producers.
    """
    constant = gs.Constant
    readers: dict[int, list[gs.Node]] = {}
    tensors: dict[int, gs.Constant] = {}
    for node in graph.nodes:
        for tensor in node.inputs:
            if type(tensor) is constant or isinstance(tensor, constant):
                key = id(tensor)
                found = readers.get(key)
                if found is None:
                    readers[key] = [node]
                    tensors[key] = tensor
                else:
                    found.append(node)
    for key, tensor in tensors.items():
        list.__setitem__(tensor.outputs, slice(None), readers[key])
