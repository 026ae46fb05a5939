"""Opening the lowered model in each runner: as deployed, and with its taps exposed.

An :class:`Opened` runner holds the sessions :func:`open_runner` made (see its docstring
for where taps are read at ORT_ENABLE_ALL: ORT's own saved optimized graph, reopened as
is). Each ORT runner opens and runs its sessions on a thread of its own
(:func:`runner_thread`; ORT releases the GIL while it creates or runs a session);
OpenVINO's runners work in line (:class:`InLine`). ORT is given the lowered weights as
arrays (:class:`Lowered`, see :mod:`qlower.large_models`): ``ORT_DISABLE_ALL`` reads them
(memory maps of the data file, the reference's own where the bytes are the original's),
``ORT_ENABLE_ALL`` copies them (a memory-mapped one read from its data file by ORT itself); for large weights those copies exist one at a time
(:func:`open_deployed`, :func:`open_runner`).
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import onnx

from ..large_models import is_large, memory_bound, reuse_original, split
from ..reference import first_line, identical
from .internal import TapPoint
from .kernels import KernelCount, count_kernels
from .optimized_taps import carried_taps
from .runners import OPTIMIZED, OrtRunner, Runner, Session, with_outputs

Result = TypeVar("Result")


@dataclass
class Opened:
    """A runner with the lowered model open: as deployed, and with the taps exposed.

    With ``fallback``, ``tapped`` is the runner's own optimized graph reopened (see
    :func:`open_runner`): its graph outputs must equal the deployed session's bit for bit on
    every batch; the first time they do not, ``fallback`` gives the lowered model opened
    with its taps exposed, and the taps are read from that from then on.
    """

    runner: Runner
    deployed: Session
    tapped: Session
    points: list[TapPoint]
    fallback: Callable[[list[str]], tuple[Session, list[TapPoint]]] | None = None
    # What the report gets from opening and running it, taken by the main thread in order.
    notes: list[str] = field(default_factory=list)
    kernels: KernelCount | None = None
    failed: bool = False  # a run raised: the batches queued after it are not run

    def run_batch(
        self, outputs: list[str], feeds: dict[str, np.ndarray]
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[str]] | None:
        """:meth:`run` on this runner's thread, with the notes it made; None once a run failed."""
        if self.failed:
            return None
        self.notes = []
        try:
            results, inside = self.run(outputs, feeds)
        except BaseException:
            self.failed = True
            raise
        return results, inside, self.notes

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        exposed = [point.exposed for point in self.points]
        if self.tapped is self.deployed:
            results = self.deployed.run(outputs + exposed, feeds)
            return results[: len(outputs)], results[len(outputs) :]
        deployed = self.deployed.run(outputs, feeds)
        if not exposed:
            return deployed, []
        if self.fallback is None:
            return deployed, self.tapped.run(exposed, feeds)
        reopened = self.tapped.run(outputs + exposed, feeds)
        if all(identical(ours, theirs) for ours, theirs in zip(deployed, reopened)):
            return deployed, reopened[len(outputs) :]
        self.tapped, self.points = self.fallback(self.notes)
        self.fallback = None
        return deployed, self.tapped.run([point.exposed for point in self.points], feeds) if self.points else []


@contextmanager
def scratch_file() -> Iterator[Path]:
    """A temporary file path for ORT's saved optimized graph (a file: removing a directory costs more),
    and the external data file ORT writes beside it for a model with large weights."""
    handle, name = tempfile.mkstemp(prefix="qlower-", suffix=".onnx")
    os.close(handle)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)
        Path(f"{name}.data").unlink(missing_ok=True)


@dataclass(frozen=True)
class Lowered:
    """The lowered model as read (``model``) and as runtimes open it: ``skeleton`` and its
    large initializers ``weights``, which ORT takes as external initializers (see
    :mod:`qlower.large_models`; then exposing taps copies no weight). Another runtime
    opens ``model`` itself (``skeleton`` is ``model`` and ``weights`` empty)."""

    model: onnx.ModelProto
    skeleton: onnx.ModelProto
    weights: dict[str, np.ndarray]

    @staticmethod
    def of(model: onnx.ModelProto, runtime: str, original: onnx.ModelProto | None = None) -> Lowered:
        """``original``: the model the reference runs; a weight of the same name and bytes
        is given to ORT as the reference's memory map of it (:func:`reuse_original`)."""
        if runtime != "onnxruntime" or not any(is_large(tensor) for tensor in model.graph.initializer):
            return Lowered(model, model, {})  # (a skeleton would be a copy of the whole graph)
        skeleton, weights = split(model)
        return Lowered(model, skeleton, reuse_original(weights, original) if original is not None else weights)

    def open(self, runner: Runner, exposed: list[str], saved_graph: Path | None = None) -> Session:
        return runner.open(with_outputs(self.skeleton, exposed) if exposed else self.skeleton, saved_graph, self.weights)

    @cached_property
    def memory_bound(self) -> bool:
        """Whether the weights are large (over protobuf's limit, or
        :data:`qlower.large_models.MEMORY_BOUND_BYTES`): ORT saves the optimized graph with
        external data, and its ``ORT_ENABLE_ALL`` sessions hold the weights one at a time."""
        return bool(self.weights) and memory_bound(self.skeleton.ByteSize(), sum(array.nbytes for array in self.weights.values()))


@dataclass
class Deployed:
    """The session an optimizing runner opens first, as deployed; :func:`open_runner` takes
    it from here, so that the future that made it does not keep it alive."""

    session: Session | None


def open_deployed(runner: Runner, lowered: Lowered, saved_graph: Path | None) -> Deployed:
    """Open ``lowered`` as deployed, its optimized graph written to ``saved_graph``.

    An ORT session that saves its optimized graph with external data and prepacks keeps a
    second copy of the weights for its life (measured, ORT 1.32, over protobuf's limit: 2x
    the weights, 1x without saving or without prepacking), so for large weights
    (:attr:`Lowered.memory_bound`) the graph is saved by a session that does not prepack,
    closed at once, and the deployed session saves nothing.
    """
    if saved_graph is not None and isinstance(runner, OrtRunner) and lowered.memory_bound:
        runner.save_optimized(lowered.skeleton, saved_graph, lowered.weights)
        saved_graph = None
    return Deployed(lowered.open(runner, [], saved_graph))


class Recorded(Session):
    """A session's graph outputs for every batch, run when this is made, then replayed one
    batch per :meth:`run` in batch order (the session itself can then be closed). A batch
    that raised raises again when its turn comes."""

    def __init__(self, session: Session, feeds_list: list[dict[str, np.ndarray]]) -> None:
        self.input_names, self.output_names = session.input_names, session.output_names
        self._batches: deque[list[np.ndarray]] = deque()
        self._error: Exception | None = None
        for feeds in feeds_list:
            try:
                self._batches.append(session.run(self.output_names, {name: feeds[name] for name in self.input_names}))
            except Exception as exc:  # each runtime raises its own exception types; raised at its batch
                self._error = exc
                break

    def run(self, names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if not self._batches:
            assert self._error is not None, "more batches run than recorded"
            raise self._error
        outputs = dict(zip(self.output_names, self._batches.popleft()))
        return [outputs[name] for name in names]


def open_runner(
    runner: Runner,
    lowered: Lowered,
    points: list[TapPoint],
    deployed: Future[Deployed] | None,
    saved_graph: Path | None,
    feeds_list: list[dict[str, np.ndarray]],
) -> Opened:
    """Open ``lowered`` in ``runner``; raises what the runtime raises when it cannot load it.

    ``deployed`` (a runner that optimizes): the model already opening as deployed, on this
    runner's thread. ``saved_graph`` (ORT at ``ORT_ENABLE_ALL``): where the deployed session
    wrote its optimized graph, whose integer kernels the report counts. Exposing a tap as an
    output can change what an optimizing runtime fuses, so the taps are not read from the
    deployed session. They are read from that saved graph reopened without optimizing it
    again, with the taps as extra outputs, when it still holds every tap (the integers, or
    the DequantizeLinear output they decode to); it runs what the deployed session runs,
    which :class:`Opened` checks on the graph outputs of every batch. Otherwise the lowered
    model is opened a second time with the taps exposed, and optimized again. For a model
    with large weights (:attr:`Lowered.memory_bound`; ORT saved its graph's weights in a
    data file beside it, which the reopened session reads) the deployed session first runs
    every batch of ``feeds_list`` (:class:`Recorded`) and is closed before that second
    session opens: two sessions would hold the weights twice.
    """
    if not runner.reads_integer_taps:
        points = [point.reading_float() for point in points]
    exposed = list(dict.fromkeys(point.exposed for point in points))
    if deployed is None:
        session = lowered.open(runner, exposed, saved_graph)
        return Opened(runner, session, session, points)
    holder = deployed.result()
    assert holder.session is not None
    opened = Opened(runner, holder.session, holder.session, [])
    holder.session = None
    saved = None
    if saved_graph is not None:
        saved, opened.kernels = _read_saved_graph(saved_graph, opened.notes)
    if not exposed:
        return opened
    if lowered.memory_bound:
        opened.deployed = opened.tapped = Recorded(opened.deployed, feeds_list)  # the session closes here

    # What a fallback needs (not the model as read, nor ``opened``: no reference cycle keeps a session alive).
    skeleton, weights, deployed_session = lowered.skeleton, lowered.weights, opened.deployed

    def expose_in_lowered(notes: list[str]) -> tuple[Session, list[TapPoint]]:
        try:
            return runner.open(with_outputs(skeleton, exposed), None, weights), points
        except Exception as exc:  # the runtime's own exception types; the deployed model loads
            notes.append(f"{runner.level}: internal tensors not compared, exposing them failed: {first_line(exc)}")
            return deployed_session, []

    carried = carried_taps(points, lowered.model, saved) if saved is not None and isinstance(runner, OrtRunner) else None
    if carried is not None:
        saved.graph.output.extend(  # type: ignore[union-attr]
            onnx.ValueInfoProto(name=name) for name in dict.fromkeys(point.exposed for point in carried)
        )
        try:
            reopened = runner.reopen(saved, saved_graph.parent)  # type: ignore[attr-defined, arg-type, union-attr]
        except Exception:  # the runtime's own exception types: then the taps are exposed in the lowered model
            pass
        else:
            opened.tapped, opened.points, opened.fallback = reopened, carried, expose_in_lowered
            return opened
    opened.tapped, opened.points = expose_in_lowered(opened.notes)
    return opened


def _read_saved_graph(path: Path, notes: list[str]) -> tuple[onnx.ModelProto | None, KernelCount | None]:
    """The optimized graph ORT saved at ``path`` and its integer kernels (a failure noted in ``notes``)."""
    try:
        saved = onnx.load(str(path), load_external_data=False)
        return saved, count_kernels(saved)
    except Exception as exc:  # a graph ORT could not save (> 2 GB) is not counted
        notes.append(f"{OPTIMIZED}: integer kernels not counted: {first_line(exc)}")
        return None, None


class InLine(Executor):
    """Runs each task when it is submitted, on the caller's thread: OpenVINO's Python
    bindings deadlocked when first used from two threads (two runners, each with its own
    Core), so its runners work in line with the reference."""

    def submit(self, fn: Callable[..., Result], /, *args: Any, **kwargs: Any) -> Future[Result]:
        future: Future[Result] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to whoever reads the result, as a thread's would be
            future.set_exception(exc)
        return future


def runner_thread(stack: ExitStack) -> ThreadPoolExecutor:
    """A thread for one runner's sessions; on leaving ``stack`` what it has not started is
    dropped (an exception here) and what it is running finishes."""
    thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qlower-verify")
    stack.callback(thread.shutdown, wait=True, cancel_futures=True)
    return thread
