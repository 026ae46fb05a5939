"""qlower: lower QONNX quantizers to standard ONNX, and prove the result exact.

Python API::

    import qlower
    result = qlower.convert("model.onnx", to="qcdq")   # ConversionResult(model, report)
    report = qlower.verify("model.onnx", result.model)  # VerificationReport
    summary = qlower.inspect("model.onnx")              # InspectionReport
"""

from .errors import (
    InvalidModelError,
    InvalidQuantizerError,
    ModelLoadError,
    OutputError,
    QlowerError,
    UnsupportedError,
    VerificationError,
)
from .inspection import InspectionReport, inspect
from .pipeline import ConversionReport, ConversionResult, convert
from .verification import VerificationReport, verify

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
