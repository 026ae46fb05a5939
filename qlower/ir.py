"""Model I/O and normalization: the only place that reads or writes model files.

``load_model`` accepts a path, bytes or a ModelProto and never mutates what it is given.
``normalize`` gives every later stage one spelling of the QONNX ops (one domain, ``Quant``
for ``IntQuant``), a graph that is structurally sound, and a real opset upgrade.
Writing models is :mod:`qlower.output`'s job.
"""

from __future__ import annotations

import mmap
import os
import sys
import weakref
from pathlib import Path
from typing import Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import numpy_helper, version_converter

from . import output
from .errors import InvalidModelError, ModelLoadError, UnsupportedError
from .links import remove_unused_nodes, replace_input

QONNX_DOMAIN = "qonnx.custom_op.general"
QONNX_DOMAINS = frozenset({QONNX_DOMAIN, "onnx.brevitas", "finn.custom_op.general", "finn"})
QONNX_OPS = frozenset({"Quant", "BipolarQuant", "Trunc", "FloatQuant"})
OP_ALIASES = {"IntQuant": "Quant"}
MIN_OUTPUT_OPSET = 13

ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto]


def is_qonnx_node(node: onnx.NodeProto | gs.Node) -> bool:
    """True for a QONNX quantizer node in any of the domain spellings seen in real models."""
    op = node.op_type if isinstance(node, onnx.NodeProto) else node.op
    return node.domain in QONNX_DOMAINS and OP_ALIASES.get(op, op) in QONNX_OPS


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain imported by the model (1 when absent)."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def _parse(data: bytes, origin: str) -> onnx.ModelProto:
    if not data:
        raise ModelLoadError(f"{origin} is empty, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{origin} is not an ONNX model (protobuf parse failed: {exc})") from None
    if model.ir_version <= 0 or not model.HasField("graph") or len(model.graph.node) == 0:
        raise ModelLoadError(f"{origin} parses as protobuf but is not an ONNX model (no ir_version or empty graph)")
    return model


# Initializers of these types are memory-mapped from their external data file (bytes as
# stored: little-endian, one element after another); others are read into the model.
MAPPABLE_TYPES = frozenset({
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
    onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
    onnx.TensorProto.INT32, onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64,
    onnx.TensorProto.BOOL,
})
_MAPPED_KEY = "qlower_mapped"  # marks the external data entries load_model checked and made absolute
_MAPPED = ((_MAPPED_KEY, "1"),)
_byte_bounds = getattr(np, "byte_bounds", None) or np.lib.array_utils.byte_bounds  # moved in numpy 2
# One mapping per region of a file, shared by everyone who reads it while anyone holds it.
_mapped: "weakref.WeakValueDictionary[tuple[object, ...], np.memmap]" = weakref.WeakValueDictionary()


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _map_external(tensor: onnx.TensorProto, target: Path, origin: str) -> bool:
    """Point an external initializer at its file by absolute path, to be memory-mapped by
    :func:`tensor_array` instead of read; False for a type that is not mapped."""
    if tensor.data_type not in MAPPABLE_TYPES or sys.byteorder != "little":
        return False
    info = _external_info(tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    expected = int(np.prod(tensor.dims, dtype=np.int64)) * dtype.itemsize
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else target.stat().st_size - offset
    except ValueError:
        raise ModelLoadError(f"{origin}: tensor {tensor.name!r} has a malformed external data offset or length") from None
    if offset < 0 or length != expected or offset + length > target.stat().st_size:
        raise ModelLoadError(
            f"{origin}: tensor {tensor.name!r} needs {expected} bytes of external data at offset {offset} of "
            f"{info.get('location', '')!r}, which has {max(0, target.stat().st_size - offset)} there (length {length})"
        )
    output.point_to_external(tensor, str(target), offset, length, _MAPPED)
    return True


def release_pages(array: np.ndarray) -> None:
    """Drop the resident pages under ``array`` if it views a memory map of external data.

    The pages are clean copies of the file, read again if the values are used again, so
    nothing changes but memory: a weight read once (folded, or quantized by the reference)
    then stops counting towards the peak. Anything else is left alone.
    """
    root = array
    while isinstance(root, np.ndarray) and not isinstance(root.base, mmap.mmap):
        root = root.base
    if not isinstance(root, np.memmap) or not isinstance(root.base, mmap.mmap) or array.size == 0:
        return
    mapped = root.base
    start_address = root.ctypes.data - root.offset % mmap.ALLOCATIONGRANULARITY  # where np.memmap mapped
    low, high = _byte_bounds(array)
    first = (low - start_address) // mmap.PAGESIZE * mmap.PAGESIZE
    last = min(len(mapped), -(-(high - start_address) // mmap.PAGESIZE) * mmap.PAGESIZE)
    if last > first >= 0:
        mapped.madvise(mmap.MADV_DONTNEED, first, last - first)


def _load_external_data(model: onnx.ModelProto, base_dir: Path, origin: str) -> None:
    """Check every external tensor's file; map initializers of plain numeric types, read the rest."""
    base = base_dir.resolve()
    # The graph's own initializers first (mapped), then every other tensor (subgraph
    # initializers, attribute tensors: read), skipping those already mapped.
    tensors = [(tensor, True) for tensor in model.graph.initializer]
    tensors += [(tensor, False) for tensor in onnx.external_data_helper._get_all_tensors(model)]
    for tensor, is_initializer in tensors:
        if not onnx.external_data_helper.uses_external_data(tensor) or is_mapped(tensor):
            continue
        location = _external_info(tensor).get("location", "")
        target = (base / location).resolve()
        if os.path.isabs(location) or base not in target.parents:
            raise ModelLoadError(
                f"tensor {tensor.name!r} points its external data at {location!r}, outside the model's folder"
            )
        if not target.is_file():
            raise ModelLoadError(f"tensor {tensor.name!r} needs external data file {location!r}, which is missing")
        if is_initializer and _map_external(tensor, target, origin):
            continue
        try:
            onnx.external_data_helper.load_external_data_for_tensor(tensor, str(base))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{origin}: cannot read external data ({exc})") from None
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def is_mapped(tensor: onnx.TensorProto) -> bool:
    """An initializer :func:`load_model` left in its external data file, to be mapped (its
    checked, absolute location marked as such: a model given as a ModelProto is never
    read from the files it names)."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(entry.key == _MAPPED_KEY for entry in tensor.external_data)


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The values of an initializer: a read-only memory map of its external data where
    :func:`load_model` left it in the file (shared while anyone holds it; pages are read
    on use and count once), else ``numpy_helper.to_array``."""
    if not is_mapped(tensor):
        return numpy_helper.to_array(tensor)
    info = _external_info(tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    if int(info["length"]) == 0:  # mmap cannot map zero bytes
        return np.zeros(tuple(tensor.dims), dtype)
    # (the file's identity is in the key: a data file replaced since is mapped afresh)
    file = os.stat(info["location"])
    key = (info["location"], file.st_dev, file.st_ino, file.st_mtime_ns, int(info["offset"]), dtype.str, tuple(tensor.dims))
    array = _mapped.get(key)
    if array is None:
        array = np.memmap(info["location"], dtype=dtype, mode="r", offset=int(info["offset"]), shape=tuple(tensor.dims))
        _mapped[key] = array
    return array


def load_model(source: ModelSource, *, copy: bool = True) -> onnx.ModelProto:
    """Read a model from a path, bytes or ModelProto; the caller's object is never modified.

    ``copy`` False hands a ModelProto back as is, for callers that only read it (a model
    with gigabytes of weights is then not held twice).
    """
    if isinstance(source, onnx.ModelProto):
        if not copy:
            return source
        model = onnx.ModelProto()
        model.CopyFrom(source)
        return model
    if isinstance(source, (bytes, bytearray)):
        return _parse(bytes(source), "input bytes")
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a regular file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc.strerror})") from None
    model = _parse(data, str(path))
    _load_external_data(model, path.parent, str(path))
    return model


def _check_structure(graph: onnx.GraphProto) -> None:
    """Reject duplicate tensor names, dangling inputs and cycles with the node named."""
    produced: dict[str, str] = {}
    for value in graph.input:
        produced[value.name] = "graph input"
    for init in graph.initializer:
        produced.setdefault(init.name, "initializer")
    for index, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}#{index}"
        for output in node.output:
            if not output:
                continue
            if output in produced:
                raise InvalidModelError(f"output {output!r} is already produced by a {produced[output]}", name)
            produced[output] = f"node {name}"
    for index, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}#{index}"
        for value in node.input:
            if value and value not in produced:
                raise InvalidModelError(f"input {value!r} is produced by nothing in the graph", name)
    for output in graph.output:
        if output.name not in produced:
            raise InvalidModelError(f"graph output {output.name!r} is produced by nothing in the graph")
    _check_acyclic(graph)


# Bytes per element of the types whose raw data numpy_helper reads as one element after another.
_PLAIN_TYPES = {data_type: onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize for data_type in MAPPABLE_TYPES}


def _check_initializers(graph: onnx.GraphProto) -> None:
    """Reject an initializer whose stored data does not match its declared shape and type."""
    for init in graph.initializer:
        if is_mapped(init):
            continue  # its size was checked against its file when it was loaded
        if init.data_type in _PLAIN_TYPES and init.HasField("raw_data"):
            # Raw bytes of a fixed-width type match exactly when their length does (what
            # to_array's reshape checks), found without decoding them.
            expected = _PLAIN_TYPES[init.data_type] * int(np.prod(init.dims, dtype=np.int64))
            if len(init.raw_data) == expected:
                continue
        try:
            numpy_helper.to_array(init)
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidModelError(f"initializer {init.name!r} is corrupt: {exc}") from None


def _check_acyclic(graph: onnx.GraphProto) -> None:
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    consumers: dict[int, list[int]] = {i: [] for i in range(len(graph.node))}
    pending = [0] * len(graph.node)
    for i, node in enumerate(graph.node):
        for value in node.input:
            if value in producer:
                consumers[producer[value]].append(i)
                pending[i] += 1
    ready = [i for i, count in enumerate(pending) if count == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for j in consumers[i]:
            pending[j] -= 1
            if pending[j] == 0:
                ready.append(j)
    if done != len(graph.node):
        stuck = next(i for i, count in enumerate(pending) if count > 0)
        node = graph.node[stuck]
        raise InvalidModelError("the graph has a cycle through this node", node.name or f"{node.op_type}#{stuck}")


def _canonicalize_qonnx_nodes(graph: onnx.GraphProto) -> dict[str, int]:
    """Rewrite QONNX domains/aliases in place; return the original domains seen."""
    seen: dict[str, int] = {}
    for node in graph.node:
        if is_qonnx_node(node):
            seen[node.domain] = seen.get(node.domain, 0) + 1
            node.domain = QONNX_DOMAIN
            node.op_type = OP_ALIASES.get(node.op_type, node.op_type)
    return seen


def declared_trunc_version(model: onnx.ModelProto) -> int | None:
    """The QONNX opset version the model imports for its quantizer domain, if any."""
    versions = [entry.version for entry in model.opset_import if entry.domain in QONNX_DOMAINS]
    return max(versions) if versions else None


def _check_trunc_versions(model: onnx.ModelProto) -> None:
    declared = declared_trunc_version(model)
    for node in model.graph.node:
        if not (is_qonnx_node(node) and node.op_type == "Trunc"):
            continue
        count = len(node.input)
        if count not in (5, 6):
            raise InvalidModelError(f"Trunc has {count} inputs; version 1 has 5 and version 2 has 6", node.name)
        if declared is not None and declared >= 2 and count == 5:
            raise InvalidModelError(
                f"Trunc has 5 inputs (version 1) but the model declares QONNX opset {declared}", node.name
            )
        if declared == 1 and count == 6:
            raise InvalidModelError(
                "Trunc has 6 inputs (version 2) but the model declares QONNX opset 1", node.name
            )


def _upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    current = default_opset(model)
    if current >= target:
        return model
    try:
        upgraded = version_converter.convert_version(model, target)
    except Exception as exc:  # the converter raises bare RuntimeError/ValidationError subclasses
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedError(f"cannot upgrade the model from opset {current} to {target}: {first_line}") from None
    return upgraded


def normalize(model: onnx.ModelProto, target_opset: int, *, copy: bool = True) -> onnx.ModelProto:
    """Canonical QONNX domain, initializers out of graph.input, opset >= ``target_opset``.

    Raises InvalidModelError / UnsupportedError with the node named. Works on a copy
    unless ``copy`` is False (the caller's own model is then normalized in place).
    """
    if copy:
        normalized = onnx.ModelProto()
        normalized.CopyFrom(model)
    else:
        normalized = model
    graph = normalized.graph
    known = onnx.defs.onnx_opset_version()
    current = default_opset(normalized)
    if current > known:
        raise UnsupportedError(f"the model uses ONNX opset {current}, newer than the {known} this onnx knows")
    _check_structure(graph)
    _check_initializers(graph)
    _check_trunc_versions(normalized)
    initializer_names = {init.name for init in graph.initializer}
    real_inputs = [value for value in graph.input if value.name not in initializer_names]
    del graph.input[:]
    graph.input.extend(real_inputs)
    _canonicalize_qonnx_nodes(graph)
    kept = [e for e in normalized.opset_import if e.domain not in QONNX_DOMAINS]
    del normalized.opset_import[:]
    normalized.opset_import.extend(kept)
    normalized.opset_import.append(onnx.helper.make_opsetid(QONNX_DOMAIN, 1))
    if normalized.ir_version < 7:
        # IR < 4 listed initializers as inputs; the version converter and ORT want IR >= 7
        # for opset 13+, and nothing else in the file depends on the older IR.
        normalized.ir_version = 7
    return _upgrade_opset(normalized, target_opset)


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import into onnx-graphsurgeon, turning Constant nodes into constant tensors."""
    graph = gs.import_onnx(model)
    # (load_model maps only the graph's own initializers: without one, nothing to look for)
    for tensor in graph.tensors().values() if any(is_mapped(init) for init in model.graph.initializer) else ():
        # A weight left in its external data file is read through its memory map; the
        # exported model then holds its values (never a reference to the input's file).
        lazy = getattr(tensor, "_values", None)
        if isinstance(lazy, gs.ir.tensor.LazyValues) and is_mapped(lazy.tensor):
            tensor.values = tensor_array(lazy.tensor)
            tensor.data_location = None  # exported with its values, not as external data
    for node in list(graph.nodes):
        if node.op == "Constant" and node.domain in ("", "ai.onnx") and "value" in node.attrs:
            value = node.attrs["value"]
            values = value.values if isinstance(value, gs.Constant) else value
            out = node.outputs[0]
            node.outputs.clear()
            replace_tensor(graph, out, gs.Constant(out.name, values))
    taken = {node.name for node in graph.nodes if node.name}
    for index, node in enumerate(graph.nodes):
        if not node.name:
            # A generated name must not collide with one the model already uses.
            name, suffix = f"{node.op}_{index}", 0
            while name in taken:
                suffix += 1
                name = f"{node.op}_{index}_{suffix}"
            node.name = name
            taken.add(name)
    if not remove_unused_nodes(graph):
        graph.cleanup(remove_unused_graph_inputs=False)
    return graph


def replace_tensor(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Point every consumer of ``old`` (and the graph outputs) at ``new``."""
    for consumer in {id(node): node for node in old.outputs}.values():
        for index, tensor in enumerate(consumer.inputs):
            if tensor is old:
                replace_input(consumer, index, new)
    graph.outputs = [new if tensor is old else tensor for tensor in graph.outputs]


def to_model(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export a graph, keeping the template's IR version, metadata and non-default opsets."""
    # (weights are mapped only where the template's initializers are)
    referenced = _refer_to_mapped_files(graph) if any(is_mapped(init) for init in template.graph.initializer) else []
    try:
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for tensor, values in referenced:
            tensor.values = values
    if referenced:
        _read_mapped_initializers(model)
    # The model holds the values now: a mapped weight's pages can go (weights are mapped
    # only where the template's initializers are).
    for tensor in graph.tensors().values() if any(is_mapped(init) for init in template.graph.initializer) else ():
        values = getattr(tensor, "_values", None)
        if isinstance(values, np.ndarray):
            release_pages(values)
    _fill_missing_output_shapes(model)
    model.ir_version = template.ir_version
    model.producer_name = "qlower"
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    return model


def _refer_to_mapped_files(graph: gs.Graph) -> list[tuple[gs.Constant, np.memmap]]:
    """Make each constant whose values are still a whole memory map of a weight (as
    :func:`to_graph` read it) a reference to its file, for :func:`_read_mapped_initializers`
    to read into the exported model; the constants and the memory maps they held.

    The exporter would copy every weight twice at once (its list of tensors, then the
    graph's copies of them) beside the pages of the files it read them from: read one at a
    time into the model instead, each weight's pages given back once copied, exporting holds
    the weights once and one weight more.
    """
    referenced = []
    for tensor in graph.tensors().values():
        values = getattr(tensor, "_values", None)
        # (a view of a map, e.g. a slice, is not the whole map: its base is the map, not the mmap)
        if not (isinstance(values, np.memmap) and isinstance(values.base, mmap.mmap) and values.filename):
            continue
        if tensor.export_dtype != tensor.dtype or tensor.data_location is not None:
            continue
        reference = onnx.TensorProto(name=tensor.name, dims=values.shape, data_type=onnx.helper.np_dtype_to_tensor_dtype(values.dtype))
        output.point_to_external(reference, values.filename, values.offset, values.nbytes, _MAPPED)
        tensor._values = gs.ir.tensor.LazyValues(reference)
        referenced.append((tensor, values))
    return referenced


def _read_mapped_initializers(model: onnx.ModelProto) -> None:
    """Read each initializer :func:`_refer_to_mapped_files` left in its file into the model
    (as the exporter writes a constant: its bytes as raw data), giving back its pages."""
    for tensor in model.graph.initializer:
        if not is_mapped(tensor):
            continue
        values = tensor_array(tensor)
        tensor.raw_data = values.tobytes()
        del tensor.external_data[:]
        tensor.ClearField("data_location")
        release_pages(values)


def _fill_missing_output_shapes(model: onnx.ModelProto) -> None:
    """Give graph outputs declared without a shape the inferred one (the checker wants one)."""
    missing = [out for out in model.graph.output if not out.type.tensor_type.HasField("shape")]
    if not missing:
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except (onnx.shape_inference.InferenceError, RuntimeError):
        return
    by_name = {out.name: out for out in inferred.graph.output}
    for out in missing:
        found = by_name.get(out.name)
        if found is not None and found.type.tensor_type.HasField("shape"):
            out.type.CopyFrom(found.type)
