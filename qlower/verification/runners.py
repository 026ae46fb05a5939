"""Runtimes the lowered model is verified on, behind one small interface.

A :class:`Runner` is one runtime at one setting: it opens a model into a :class:`Session`
(run feeds, fetch outputs by name), says whether it rewrites the graph before running it
(``optimizes``: then exposing an internal tensor as an extra output can change what runs,
so the verifier reads the taps elsewhere: from ORT's saved optimized graph, or from the
model opened a second time with its taps exposed), and describes its settings for the report.

* ``onnxruntime``: ``ORT_DISABLE_ALL`` (one thread, no prepacking; a ``qcdq`` lowering is
  held to bit-identity there) and, unless told not to, ``ORT_ENABLE_ALL`` as users deploy it.
* ``openvino`` (optional: ``pip install 'qlower[openvino]'``): the CPU plugin with
  ``INFERENCE_PRECISION_HINT`` f32, held to the tolerance. OpenVINO's default hint
  (bf16 on CPUs with AMX or avx512_bf16) runs float ops in bf16; the verifier runs it once
  more as an advisory and reports what it changes, without failing on it.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from ..errors import UnsupportedError
from ..ort_sessions import make_session
from ..profiles import RUNTIMES

UNOPTIMIZED = "ORT_DISABLE_ALL"
OPTIMIZED = "ORT_ENABLE_ALL"
OPENVINO_F32 = "OPENVINO_CPU_F32"
OPENVINO_DEFAULT = "OPENVINO_CPU_DEFAULT"


class Session(ABC):
    """A model opened in a runtime."""

    input_names: list[str]
    output_names: list[str]

    @abstractmethod
    def run(self, names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The tensors ``names`` (graph outputs of the opened model) for one batch of ``feeds``."""


class Runner(ABC):
    """One runtime at one setting."""

    runtime: str  # how messages name the runtime
    level: str  # how the report names this setting
    optimizes: bool  # rewrites the graph before running it
    exact_for_qcdq: bool = False  # a qcdq lowering must be bit-identical here
    advisory: bool = False  # run for the report only, never failing verification
    # Taps may be read as the integers a DequantizeLinear takes; else as the float it writes.
    reads_integer_taps: bool = True
    # Hold a quantizer that reads a graph input bit-identical even where a tolerance applies
    # (see qlower.verification.internal.GRAPH_INPUT_RULE).
    exact_graph_input_quantizers: bool = False

    @abstractmethod
    def settings(self) -> dict[str, str]:
        """What this runner runs with, for the report."""

    @abstractmethod
    def open(
        self, model: onnx.ModelProto, saved_graph: Path | None = None, external: Mapping[str, np.ndarray] | None = None
    ) -> Session:
        """Load ``model``; where the runtime can, write the graph it runs to ``saved_graph``.

        ``external``: the arrays of the initializers ``model`` (a skeleton, see
        :mod:`qlower.large_models`) holds as external data; only ORT takes them.
        Raises whatever the runtime raises on a model it cannot load.
        """


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the internal tensors ``names`` (untyped: the
    runtimes infer their types, and ONNX shape inference would cost more than the run)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    declared = {value.name for value in model.graph.output}
    exposed.graph.output.extend(onnx.ValueInfoProto(name=name) for name in dict.fromkeys(names) if name not in declared)
    return exposed


# ---------------------------------------------------------------------------------------
# ONNX Runtime


class _OrtSession(Session):
    def __init__(self, session: object) -> None:
        self._session = session
        self.input_names = [meta.name for meta in session.get_inputs()]  # type: ignore[attr-defined]
        self.output_names = [meta.name for meta in session.get_outputs()]  # type: ignore[attr-defined]

    def run(self, names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(value) for value in self._session.run(list(names), dict(feeds))]  # type: ignore[attr-defined]


class OrtRunner(Runner):
    runtime = "ONNX Runtime"

    def __init__(self, optimized: bool) -> None:
        self.optimizes = optimized
        self.level = OPTIMIZED if optimized else UNOPTIMIZED
        self.exact_for_qcdq = not optimized

    def settings(self) -> dict[str, str]:
        import onnxruntime

        settings = {"runtime": "onnxruntime", "version": onnxruntime.__version__, "provider": "CPUExecutionProvider"}
        settings["graph_optimization_level"] = self.level
        if not self.optimizes:
            settings.update({"intra_op_num_threads": "1", "session.disable_prepacking": "1"})
        return settings

    def open(
        self, model: onnx.ModelProto, saved_graph: Path | None = None, external: Mapping[str, np.ndarray] | None = None
    ) -> Session:
        return _OrtSession(make_session(model, optimized=self.optimizes, saved_graph=saved_graph, external=external))

    def save_optimized(self, model: onnx.ModelProto, saved_graph: Path, external: Mapping[str, np.ndarray] | None = None) -> None:
        """Write the graph :meth:`open` would write to ``saved_graph``, from a session closed
        at once (one that does not prepack its weights: ORT prepacks after saving the graph)."""
        make_session(model, optimized=self.optimizes, saved_graph=saved_graph, external=external, prepacking=False)

    def reopen(self, saved: onnx.ModelProto, folder: Path) -> Session:
        """Open the graph this runner saved (``open``'s ``saved_graph``, in ``folder`` with
        the data file of its large weights, if it has one) as it runs, without optimizing it
        again."""
        return _OrtSession(make_session(saved, optimized=self.optimizes, already_optimized=True, data_folder=folder))


# ---------------------------------------------------------------------------------------
# OpenVINO


def _openvino() -> object:
    try:
        return importlib.import_module("openvino")
    except ImportError:
        raise UnsupportedError(
            "--runtime openvino needs OpenVINO, which is not installed: pip install 'qlower[openvino]'"
        ) from None


class _OpenVinoSession(Session):
    def __init__(self, compiled: object) -> None:
        self._compiled = compiled
        self._request = compiled.create_infer_request()  # type: ignore[attr-defined]
        self.input_names = [port.get_any_name() for port in compiled.inputs]  # type: ignore[attr-defined]
        # A port can carry several tensor names (OpenVINO merges an output into the tensor
        # feeding it); each of them names it.
        self._ports = {name: port for port in compiled.outputs for name in port.get_names()}  # type: ignore[attr-defined]
        self.output_names = list(self._ports)

    def run(self, names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        results = self._request.infer(dict(feeds))  # type: ignore[attr-defined]
        return [np.array(results[self._ports[name]]) for name in names]


class OpenVinoRunner(Runner):
    """OpenVINO's CPU plugin; ``hint`` None leaves INFERENCE_PRECISION_HINT at the device default."""

    runtime = "OpenVINO"
    optimizes = True
    # Exposing a QuantizeLinear's integer output as a graph output makes the CPU plugin run
    # that QuantizeLinear apart from its DequantizeLinear, with a reciprocal multiply again
    # (measured: ties of the signed 4-bit deployment net's input flip only then), so taps
    # are read from the DequantizeLinear's float output, which changes nothing.
    reads_integer_taps = False
    # OpenVINO turns the division of a QuantizeLinear (and every float Divide) into a
    # multiply by the reciprocal. Inside a network that is one more float rounding, which
    # the unit-local tolerance covers; on a graph input nothing else differs, and a tie
    # moved there is the division computed wrongly.
    exact_graph_input_quantizers = True

    def __init__(self, hint: str | None = "f32") -> None:
        self._ov = _openvino()
        self._core = self._ov.Core()  # type: ignore[attr-defined]
        self.hint = hint
        self.level = OPENVINO_F32 if hint == "f32" else OPENVINO_DEFAULT
        self.advisory = hint is None

    def default_hint(self) -> str:
        """The CPU plugin's INFERENCE_PRECISION_HINT when none is set (bf16 on AMX/avx512_bf16 CPUs)."""
        return str(self._core.get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name())  # type: ignore[attr-defined]

    def settings(self) -> dict[str, str]:
        hint = self.hint or f"{self.default_hint()}, the device default"
        return {
            "runtime": "openvino",
            "version": str(self._ov.__version__),  # type: ignore[attr-defined]
            "device": "CPU",
            "INFERENCE_PRECISION_HINT": hint,
        }

    def open(
        self, model: onnx.ModelProto, saved_graph: Path | None = None, external: Mapping[str, np.ndarray] | None = None
    ) -> Session:
        if external:
            raise ValueError("OpenVINO opens a whole model, not a skeleton and its weights")
        read = self._core.read_model(model.SerializeToString())  # type: ignore[attr-defined]
        config = {"INFERENCE_PRECISION_HINT": self.hint} if self.hint else {}
        return _OpenVinoSession(self._core.compile_model(read, "CPU", config))  # type: ignore[attr-defined]


def check_runtime(runtime: str) -> None:
    """Refuse an unknown runtime, or one that is not installed, before any work is done."""
    if runtime not in RUNTIMES:
        raise UnsupportedError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "openvino":
        _openvino()


def runners_for(runtime: str, check_optimized: bool) -> list[Runner]:
    """The runners a lowered model is held to on ``runtime``."""
    if runtime == "onnxruntime":
        return [OrtRunner(False)] + ([OrtRunner(True)] if check_optimized else [])
    if runtime == "openvino":
        checked = OpenVinoRunner("f32")
        return [checked] + ([OpenVinoRunner(None)] if checked.default_hint() != "f32" else [])
    raise UnsupportedError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
