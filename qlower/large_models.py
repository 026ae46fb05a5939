"""Models over protobuf's 2 GB limit in memory: checked and run without serialising them whole.

A model whose protobuf would exceed the limit (``output.MAX_PROTOBUF_BYTES``; tests lower
it) cannot be serialised, so neither ``onnx.checker.check_model(model)`` nor
``onnxruntime.InferenceSession(model bytes)`` takes it. :func:`split` turns it into a
*skeleton* (the model with the bytes of every initializer of ``output.EXTERNAL_MIN_BYTES``
or more replaced by an external-data reference, which is how ``output.write_model``
writes it) and the arrays of those initializers:

* :func:`check` runs the checker (``full_check``) on the skeleton by path, beside an empty
  data file. The checker by path reads no external tensor data (it checks that the data
  file is a regular file in the model's folder, and shape inference never parses external
  tensors), so this is the check ``check_model(path, full_check=True)`` makes of the
  model written with its external data, without writing gigabytes to do it;
* :func:`session_inputs` gives ONNX Runtime the skeleton's bytes and the arrays, which
  ``ort_sessions.make_session`` hands over as external initializers
  (``SessionOptions.add_external_initializers``: ORT replaces each external tensor of that
  name with a copy of the array in its own memory) or, at ``ORT_DISABLE_ALL``, as shared
  initializers (``add_initializer``: ORT reads the array itself; see :func:`stub_folder`).
  Either way ORT never looks for the data file, and the session holds the same
  initializers as one loaded from the written files.
"""

from __future__ import annotations

import mmap
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import onnx

from . import ir, output

# Where the skeleton's external tensors say their bytes are (never read: see the docstring).
DATA_LOCATION = "weights.data"
# Large initializers adding up to this many bytes or more are verified the way a model over
# protobuf's limit is, even below it: each copy of the weights a session or a serialised
# graph makes is then the memory that matters, not the time a session takes to create
# (tests lower it; no zoo or fixture model comes near it).
MEMORY_BOUND_BYTES = 1 << 26


def memory_bound(model_bytes: int, weight_bytes: int) -> bool:
    """Whether a model of ``model_bytes`` (its skeleton) and ``weight_bytes`` of large
    initializers is over protobuf's limit or has :data:`MEMORY_BOUND_BYTES` of weights."""
    return weight_bytes >= MEMORY_BOUND_BYTES or model_bytes + weight_bytes > output.MAX_PROTOBUF_BYTES


def fits_inline(model: onnx.ModelProto) -> bool:
    """Whether ``model`` serialises within the protobuf limit (found without serialising it)."""
    return output.fits_inline(model)


def external_stub(name: str, array: np.ndarray) -> onnx.TensorProto:
    """A tensor ``name`` of ``array``'s type and shape whose bytes are external data."""
    stub = onnx.TensorProto(name=name, dims=array.shape, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
    output.point_to_external(stub, DATA_LOCATION, 0, array.nbytes)
    return stub


def is_large(tensor: onnx.TensorProto) -> bool:
    """An initializer of a plain numeric type that ``write_model`` would move to the data
    file (raw data of 1 KiB or more), or one ``ir.load_model`` left memory-mapped in its
    external data file."""
    if ir.is_mapped(tensor):
        return True
    return (
        tensor.data_type in ir.MAPPABLE_TYPES  # (the arrays ORT is given have these types exactly)
        and tensor.data_location != onnx.TensorProto.EXTERNAL
        and not tensor.external_data
        and tensor.HasField("raw_data")
        and len(tensor.raw_data) >= output.EXTERNAL_MIN_BYTES
    )


def needs_split(model: onnx.ModelProto) -> bool:
    """Whether ``model`` must reach a checker or runtime as a skeleton and arrays: it is over
    the limit, or holds initializers memory-mapped from a file by absolute path (which no
    runtime accepts from bytes)."""
    return any(ir.is_mapped(tensor) for tensor in model.graph.initializer) or not fits_inline(model)


def split(model: onnx.ModelProto, *, arrays: bool = True) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The skeleton of ``model`` and the arrays of the initializers it leaves out (each a
    copy, or the memory map of a mapped one; none when ``arrays`` is False).

    ``model`` is not changed and its weights are never serialised.
    """
    skeleton = output.copy_without(model, "graph")
    assert isinstance(skeleton, onnx.ModelProto)
    skeleton.graph.CopyFrom(output.copy_without(model.graph, "initializer"))
    left_out: dict[str, np.ndarray] = {}
    for tensor in model.graph.initializer:
        if not is_large(tensor):
            skeleton.graph.initializer.append(tensor)
            continue
        stub = output.copy_without(tensor, "raw_data")
        assert isinstance(stub, onnx.TensorProto)
        output.point_to_external(stub, DATA_LOCATION, 0, _nbytes(tensor))
        skeleton.graph.initializer.append(stub)
        if arrays:
            left_out[tensor.name] = ir.tensor_array(tensor)
    return skeleton, left_out


def reuse_original(arrays: Mapping[str, np.ndarray], original: onnx.ModelProto) -> dict[str, np.ndarray]:
    """``arrays`` (a lowered model's large initializers) with each one that holds the same
    bytes as the memory-mapped initializer of that name in ``original`` replaced by that one's
    memory map, the one the reference reads: a weight the lowering kept as it was (a float
    weight stays float) is then resident once for both models' sessions, not once per file.

    The bytes are compared a slice at a time, each slice's pages released once compared.
    """
    mapped = _mapped_initializers(original)
    reused = dict(arrays)
    for name, ours in arrays.items():
        if name not in mapped:
            continue
        theirs = ir.tensor_array(mapped[name])
        if theirs is ours:  # (already the original's map: see share_original)
            continue
        if _same_array(ours, theirs):
            reused[name] = theirs
    return reused


def share_original(model: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` in which each large initializer that holds the same bytes as the
    memory-mapped initializer of that name in ``original`` is that one (the same file, read
    through the same memory map), the others as they are; ``model`` itself when there is
    none. ``model`` is not changed.

    A lowered model read from one file (below protobuf's limit) holds its weights in its
    protobuf; a weight the lowering kept as it was is the original's, which the reference
    reads from the original's data file: once the caller drops ``model``, that weight is
    resident once, not once more for the lowered model's protobuf. Each weight is compared
    on its own (one copy of it at a time).
    """
    mapped = _mapped_initializers(original)
    if not any(tensor.name in mapped and is_large(tensor) and not ir.is_mapped(tensor) for tensor in model.graph.initializer):
        return model  # (nothing to share: no copy of the graph)
    shared = output.copy_without(model, "graph")
    assert isinstance(shared, onnx.ModelProto)
    shared.graph.CopyFrom(output.copy_without(model.graph, "initializer"))
    for tensor in model.graph.initializer:
        theirs = mapped.get(tensor.name)
        if theirs is not None and is_large(tensor) and not ir.is_mapped(tensor) and _same_tensor(tensor, theirs):
            shared.graph.initializer.append(theirs)
        else:
            shared.graph.initializer.append(tensor)
    return shared


def _mapped_initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """``model``'s initializers memory-mapped from its data file, by name."""
    return {tensor.name: tensor for tensor in model.graph.initializer if ir.is_mapped(tensor)}


def _same_tensor(ours: onnx.TensorProto, theirs: onnx.TensorProto) -> bool:
    """Whether an inline initializer holds the bytes of a mapped one of the same type and shape."""
    if ours.data_type != theirs.data_type or list(ours.dims) != list(theirs.dims):
        return False  # (without decoding either)
    return _same_array(ir.tensor_array(ours), ir.tensor_array(theirs))


def _same_array(ours: np.ndarray, theirs: np.ndarray) -> bool:
    """Whether ``ours`` holds the bytes of ``theirs`` (a C-contiguous memory map): same type, shape and bytes."""
    return ours.dtype == theirs.dtype and ours.shape == theirs.shape and _same_bytes(np.ascontiguousarray(ours), theirs)


_COMPARED_BYTES = 1 << 24  # per slice: 16 MiB


def _same_bytes(ours: np.ndarray, theirs: np.ndarray) -> bool:
    """Whether two C-contiguous arrays of one type and shape hold the same bytes (NaN payloads included)."""
    ours_bytes, theirs_bytes = ours.reshape(-1).view(np.uint8), theirs.reshape(-1).view(np.uint8)
    for start in range(0, ours_bytes.size, _COMPARED_BYTES):
        a, b = ours_bytes[start : start + _COMPARED_BYTES], theirs_bytes[start : start + _COMPARED_BYTES]
        same = np.array_equal(a, b)
        ir.release_pages(a)
        ir.release_pages(b)
        if not same:
            return False
    return True


def _nbytes(tensor: onnx.TensorProto) -> int:
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def check(model: onnx.ModelProto) -> None:
    """``onnx.checker.check_model(full_check=True)`` of a model too large to serialise."""
    skeleton, _ = split(model, arrays=False)
    with tempfile.TemporaryDirectory(prefix="qlower-check-") as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(skeleton.SerializeToString())
        (Path(folder) / DATA_LOCATION).touch()
        onnx.checker.check_model(str(path), full_check=True)


@contextmanager
def stub_folder() -> Iterator[str]:
    """A folder holding an empty file named :data:`DATA_LOCATION`, for ORT to open a
    skeleton whose large initializers it is given with ``SessionOptions.add_initializer``:
    ORT checks that an external tensor's file exists when it loads a model from bytes
    (looking in the folder that ``session.model_external_initializers_file_folder_path``
    names), but reads no data for a tensor whose value it was given."""
    with tempfile.TemporaryDirectory(prefix="qlower-stubs-") as folder:
        (Path(folder) / DATA_LOCATION).touch()
        yield folder


def read_from_files(
    data: bytes, arrays: Mapping[str, np.ndarray]
) -> tuple[bytes, dict[str, np.ndarray], str | None]:
    """``data`` (a skeleton's bytes) and ``arrays`` (its external tensors' values) with each
    array that is a whole memory map of a data file (:func:`ir.tensor_array` of a mapped
    initializer) left for ORT to read from that file itself: its stub in the skeleton names
    the file (by name, in the folder returned, which ORT is told to look in) and its offset,
    and it is no longer among the arrays. Arrays in other folders than the first one's stay.

    ORT copies each array it is given into its own memory while it creates a session, with
    the array's pages resident meanwhile (the memory map's, counted on top of its copy);
    reading the file itself it holds only its copy.
    """
    mapped = {name: array for name, array in arrays.items() if _whole_map(array)}
    if not mapped:
        return data, dict(arrays), None
    folder = os.path.dirname(next(iter(mapped.values())).filename)
    mapped = {name: array for name, array in mapped.items() if os.path.dirname(array.filename) == folder}
    skeleton = onnx.ModelProto.FromString(data)
    for tensor in skeleton.graph.initializer:
        array = mapped.get(tensor.name)
        if array is None:
            continue
        output.point_to_external(tensor, os.path.basename(array.filename), array.offset, array.nbytes)
    return skeleton.SerializeToString(), {name: array for name, array in arrays.items() if name not in mapped}, folder


def _whole_map(array: np.ndarray) -> bool:
    """Whether ``array`` is a whole np.memmap of a file (not a view of one), in little-endian order."""
    return (
        isinstance(array, np.memmap)
        and isinstance(array.base, mmap.mmap)
        and isinstance(array.filename, str)
        and array.flags.c_contiguous
        and array.dtype.byteorder in ("=", "<", "|")
        and sys.byteorder == "little"
        and array.nbytes > 0
    )


def session_inputs(
    model: onnx.ModelProto | bytes, external: Mapping[str, np.ndarray] | None = None
) -> tuple[bytes, dict[str, np.ndarray]]:
    """The model bytes and external initializers to open ``model`` in ONNX Runtime.

    A model with initializers :func:`is_large` would move is :func:`split` (whatever its
    size): ``onnxruntime.InferenceSession`` keeps the bytes it was given for the session's
    life, on top of its own copy of the weights, so they must be the skeleton's (measured:
    each verification session held twice the lowered weights). Any other model is its own
    bytes. ``external`` (arrays for tensors already external in a skeleton ``model``) is
    passed through.
    """
    arrays = dict(external or {})
    if isinstance(model, bytes):
        return model, arrays
    if not needs_split(model) and not any(is_large(tensor) for tensor in model.graph.initializer):
        return model.SerializeToString(), arrays
    skeleton, split_arrays = split(model)
    arrays.update(split_arrays)
    return skeleton.SerializeToString(), arrays
