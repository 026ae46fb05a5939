"""Errors qlower reports to users.

Every error renders as one line, ``<node>: <reason>`` when a node is to blame, so the CLI
can print it without a traceback. The exit code tells CI what went wrong: 2 for input
that qlower refuses, 1 for a lowering that failed verification.
"""

from __future__ import annotations


class QlowerError(Exception):
    """Base class: a user-facing failure with a one-line message."""

    exit_code = 2

    def __init__(self, reason: str, node: str | None = None) -> None:
        self.reason = " ".join(reason.split())
        self.node = node
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.node}: {self.reason}" if self.node else self.reason


class ModelLoadError(QlowerError):
    """The input is not a readable ONNX model (missing, truncated, not protobuf, bad external data)."""


class InvalidModelError(QlowerError):
    """The model is ONNX but structurally broken (cycles, dangling inputs, duplicate names)."""


class InvalidQuantizerError(QlowerError):
    """A QONNX quantizer node has parameters outside its contract (zero/NaN scale, bad bit width)."""


class UnsupportedError(QlowerError):
    """A valid construct that qlower cannot lower exactly (dynamic scales, control flow)."""


class VerificationError(QlowerError):
    """The lowered model's outputs differ from the QONNX reference beyond the allowed bound."""

    exit_code = 1
    report: object | None = None  # the ConversionReport, attached by the pipeline


class OutputError(QlowerError):
    """An output (model, external data, report) cannot be written where the user asked."""
