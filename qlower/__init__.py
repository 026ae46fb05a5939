"""qlower: lower QONNX quantizers to standard ONNX, and prove the result exact.

Python API::

    import qlower
    result = qlower.convert("model.onnx", to="qcdq")   # ConversionResult(model, report)
    report = qlower.verify("model.onnx", result.model)  # VerificationReport
    summary = qlower.inspect("model.onnx")              # InspectionReport

``verify`` and ``inspect`` (and their report types) are loaded on first use: a conversion
that does not verify never pays for importing verification (issue 9).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import (
    InvalidModelError,
    InvalidQuantizerError,
    ModelLoadError,
    OutputError,
    QlowerError,
    UnsupportedError,
    VerificationError,
)
from .pipeline import ConversionReport, ConversionResult, convert

if TYPE_CHECKING:
    from .inspection import InspectionReport, inspect
    from .verification import VerificationReport, verify

_LOADED_ON_FIRST_USE = {
    "InspectionReport": ".inspection",
    "inspect": ".inspection",
    "VerificationReport": ".verification",
    "verify": ".verification",
}


def __getattr__(name: str) -> object:
    """PEP 562: the public names of ``_LOADED_ON_FIRST_USE``, imported when first asked for."""
    if name not in _LOADED_ON_FIRST_USE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LOADED_ON_FIRST_USE[name], __name__), name)
    globals()[name] = value
    return value

__all__ = [
    "ConversionReport",
    "ConversionResult",
    "InspectionReport",
    "InvalidModelError",
    "InvalidQuantizerError",
    "ModelLoadError",
    "OutputError",
    "QlowerError",
    "UnsupportedError",
    "VerificationError",
    "VerificationReport",
    "convert",
    "inspect",
    "verify",
]
