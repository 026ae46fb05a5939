"""qlower: lower QONNX quantizers to standard ONNX, and prove the result exact.

Python API::

    import qlower
    result = qlower.convert("model.onnx", to="qcdq")   # ConversionResult(model, report)
    report = qlower.verify("model.onnx", result.model)  # VerificationReport
"""

from .errors import (
    InvalidModelError,
    InvalidQuantizerError,
    ModelLoadError,
    QlowerError,
    UnsupportedError,
    VerificationError,
)
from .pipeline import ConversionReport, ConversionResult, convert
from .verification import VerificationReport, verify

__all__ = [
    "ConversionReport",
    "ConversionResult",
    "InvalidModelError",
    "InvalidQuantizerError",
    "ModelLoadError",
    "QlowerError",
    "UnsupportedError",
    "VerificationError",
    "VerificationReport",
    "convert",
    "verify",
]
