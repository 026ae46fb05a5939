"""ONNX Runtime sessions as qlower opens them: the reference executor's groups and the
verifier's runners alike, with the options each level needs and the paths that keep a
model's large weights out of the bytes ORT is given (see :mod:`qlower.large_models`).

onnxruntime is imported where a session is made: a conversion that opens none does not
pay for importing it.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Mapping

import numpy as np
import onnx

from . import large_models
from .ir import release_pages

if TYPE_CHECKING:
    import onnxruntime as ort


def make_session(
    model: onnx.ModelProto | bytes,
    *,
    optimized: bool,
    saved_graph: str | os.PathLike | None = None,
    external: Mapping[str, np.ndarray] | None = None,
    already_optimized: bool = False,
    prepacking: bool = True,
    data_folder: str | os.PathLike | None = None,
) -> ort.InferenceSession:
    """A CPU ORT session: ``ORT_ENABLE_ALL`` as users deploy it, or ``ORT_DISABLE_ALL``.

    ``saved_graph``: where ORT writes the graph it runs after its optimizations (the
    verifier counts integer kernels in it); the initializers of a model with large weights
    (:func:`qlower.large_models.memory_bound`) go to ``<saved_graph>.data`` beside it.
    ``external``: the arrays of tensors ``model`` (bytes of a skeleton) holds as external
    data. A ModelProto with weights is split into such a skeleton and arrays
    (:mod:`qlower.large_models`): ORT never needs a model over protobuf's limit serialised
    whole, and the bytes ORT's Python session keeps for its whole life are the skeleton's.
    At ``ORT_ENABLE_ALL`` an array that is a memory map of a data file is read by ORT from
    that file (:func:`qlower.large_models.read_from_files`), not copied from the map.
    ``already_optimized`` (with ``optimized``): ``model`` is such a saved graph; it is
    opened as deployed (threads, prepacking) but without running the graph transformers
    again, which is what makes a large model's ``ORT_ENABLE_ALL`` session slow to create.
    ``prepacking`` False (with ``optimized``): weights are not prepacked, for a session made
    only to save its optimized graph (ORT prepacks after it has saved the graph).
    ``data_folder``: where the files named by ``model``'s external tensors are (a saved
    graph's ``<saved_graph>.data``); ORT reads them itself.

    The unoptimized level is the one held to bit-exactness, so it also turns off weight
    prepacking: ORT prepacks constant MatMul/Gemm weights and then sums in another order
    than for the same weight computed at run time, which would make a lowering's choice
    between a folded float constant and ``DequantizeLinear`` of integers change the last
    bits. It runs on one thread, which also keeps the many small reference sessions cheap.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Without the arena, a tensor computed at run time (a DequantizeLinear of a whole
    # weight, at ORT_DISABLE_ALL) is freed after use instead of staying reserved for the
    # session's life: up to the model's weights again in memory, and no change in values.
    options.enable_cpu_mem_arena = False
    if optimized:
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL if already_optimized else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        if not prepacking:
            options.add_session_config_entry("session.disable_prepacking", "1")
    else:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
    data, arrays = large_models.session_inputs(model, external)
    if saved_graph is not None:
        options.optimized_model_filepath = os.fspath(saved_graph)
        # Only a graph with large weights (over protobuf's limit, or memory bound below it) is
        # saved with external data: ORT builds and serialises an inline graph whole, twice the
        # weights more; the verifier reads the taps from a saved graph whose weights it holds.
        if large_models.memory_bound(len(data), sum(array.nbytes for array in arrays.values())):
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", f"{os.path.basename(saved_graph)}.data"
            )
    # ORT_DISABLE_ALL without prepacking runs no graph transformer and packs no weight, so
    # nothing reads a weight but the kernels: the session reads the arrays themselves
    # (``add_initializer``; the same bytes, so the same results) instead of a copy. Sessions
    # given the same memory map then hold its pages once between them.
    shared = bool(arrays) and not optimized
    files = None if data_folder is None else os.fspath(data_folder)
    if arrays and optimized and files is None:  # a weight mapped from a data file: ORT reads that file itself
        data, arrays, files = large_models.read_from_files(data, arrays)
    values = [ort.OrtValue.ortvalue_from_numpy(array) for array in arrays.values()]  # views of the arrays
    with large_models.stub_folder() if shared else contextlib.nullcontext(files) as folder:
        if folder is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        if shared:
            for name, value in zip(arrays, values):
                options.add_initializer(name, value)
        elif values:  # ORT copies each array into its own memory while the session is created
            options.add_external_initializers(list(arrays), values)
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    if shared:
        session.shared_initializers = values  # type: ignore[attr-defined]  # ORT reads them for the session's life
    else:
        for array in arrays.values():  # ORT holds its copy; a memory-mapped weight's pages can go
            release_pages(array)
    return session
