"""onnx-graphsurgeon's ``fold_constants``, without its copy of the whole graph.

``Graph.fold_constants`` copies every node and tensor of the graph to find and evaluate the
few nodes whose inputs are all constant: on a small real export that copy, its cleanup and
export are most of the fold's cost (a quarter of a 30-node conversion). :func:`fold_constants`
computes the same thing from the graph itself and copies only the nodes ONNX Runtime
evaluates, for the call qlower makes (``fold_shapes=False``, no partitioning, ``error_ok``,
no size threshold).

It is exact, not approximate: the same nodes are folded, ONNX Runtime gets the same model
bytes (the copied nodes in graph order, cleaned up and exported as onnx-graphsurgeon does)
and the same session arguments, so the folded values are the same bits. Where this module
would have to reproduce more of onnx-graphsurgeon (control-flow subgraphs, which it
flattens; local functions; an evaluation that fails, which it reports) it calls
``Graph.fold_constants`` itself. ``tests/test_constant_folding.py`` holds the two equal,
model bytes sent to ONNX Runtime included.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import export_onnx
from onnx_graphsurgeon.logger import G_LOGGER

# Constant-node attributes onnx-graphsurgeon turns into constant tensors (any other is left).
_CONSTANT_ATTRIBUTES = frozenset({"value", "value_float", "value_floats", "value_int", "value_ints"})
_NEVER_FOLDED = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
_LARGE_BYTES = 1 << 20  # onnx-graphsurgeon warns about folded tensors above this size


def fold_constants(graph: gs.Graph, should_exclude_node: Callable[[gs.Node], bool]) -> None:
    """``graph.fold_constants(fold_shapes=False, error_ok=True, should_exclude_node=...)``, in place."""
    if graph.functions or any(any(True for _ in node.subgraphs()) for node in graph.nodes):
        graph.fold_constants(fold_shapes=False, should_exclude_node=should_exclude_node, error_ok=True)
        return
    _lower_constant_nodes(graph)
    constants = {name for name, tensor in graph.tensors().items() if isinstance(tensor, gs.Constant)}
    folded: list[gs.Node] = []
    produced: dict[str, gs.Tensor] = {}
    for node in graph.nodes:
        if _foldable(node, constants, should_exclude_node):
            outputs = {out.name: out for out in node.outputs}
            constants.update(outputs)
            produced.update(outputs)
            folded.append(node)
    # onnx-graphsurgeon evaluates a folded tensor that is a graph output or has a consumer
    # whose *name* is not a folded tensor's (its test compares node names with tensor names).
    evaluated = [
        tensor for tensor in produced.values()
        if not isinstance(tensor, gs.Constant) and (not tensor.outputs or any(n.name not in constants for n in tensor.outputs))
    ]
    if not evaluated:
        return
    part = gs.Graph(
        nodes=folded, outputs=evaluated, name=graph.name, doc_string=graph.doc_string, opset=graph.opset,
        import_domains=graph.import_domains, ir_version=graph.ir_version,
    ).copy()
    part.producer_name = ""
    part.producer_version = ""
    part.cleanup(remove_unused_graph_inputs=True, recurse_functions=False)
    names = [tensor.name for tensor in part.outputs]
    try:
        import onnxruntime

        session = onnxruntime.InferenceSession(
            export_onnx(part, do_type_check=False).SerializeToString(), providers=["CPUExecutionProvider"]
        )
        values = session.run(names, {})
    except Exception:  # onnx-graphsurgeon's own path reports the failure (and folds nothing)
        graph.fold_constants(fold_shapes=False, should_exclude_node=should_exclude_node, error_ok=True)
        return
    tensors = graph.tensors()
    large = {}
    for name, array in zip(names, values):
        tensor = tensors[name]
        if isinstance(tensor, gs.Constant):
            continue
        if array.nbytes > _LARGE_BYTES:
            large[name] = array.nbytes
        tensor.to_constant(array)
        tensor.inputs.clear()
    if large:
        sizes = {name: f"{size // _LARGE_BYTES} MiB" for name, size in large.items()}
        G_LOGGER.warning(
            "It looks like this model contains foldable nodes that produce large outputs.\n"
            "In order to avoid bloating the model, you may want to set a constant-folding size threshold.\n"
            f"Note: Large tensors and their corresponding sizes were: {sizes}"
        )


def _lower_constant_nodes(graph: gs.Graph) -> None:
    """Turn the outputs of Constant nodes into constant tensors (the fold's first step)."""
    for tensor in graph.tensors().values():
        if len(tensor.inputs) != 1 or tensor.inputs[0].op != "Constant":
            continue
        node = tensor.inputs[0]
        if len(node.attrs) != 1:
            G_LOGGER.warning("Constant node must contain exactly one attribute")
            continue
        name, value = next(iter(node.attrs.items()))
        if name not in _CONSTANT_ATTRIBUTES:
            G_LOGGER.warning(f"Unsupported attribute for Constant node: {name}")
            continue
        if isinstance(value, gs.Node.AttributeRef):
            continue
        tensor.to_constant(value._values if isinstance(value, gs.Constant) else np.array(value))
        tensor.inputs.clear()


def _foldable(node: gs.Node, constants: set[str], should_exclude_node: Callable[[gs.Node], bool]) -> bool:
    if node.op in _NEVER_FOLDED:
        return False
    if not all(tensor.name in constants for tensor in node.inputs if not tensor.is_empty()):
        return False
    if any(isinstance(value, gs.Node.AttributeRef) for value in node.attrs.values()):
        return False
    return not should_exclude_node(node)
