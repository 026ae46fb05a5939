"""The ONNX float8 types a FloatQuant can be stored in, and when that is exact.

A FloatQuant's grid depends only on its mantissa width and exponent bias, and its range on
``limit = min(minifloat_max, max_val)`` (``semantics.float_quant_grid``). ONNX's
FLOAT8E4M3FN is that grid with mantissa 3, bias 7 and limit 448; FLOAT8E5M2 with mantissa
2, bias 15 and limit 57344. ``QuantizeLinear`` to these types (opset 19+, ``saturate=1``)
rounds ``x/scale`` to nearest even and clamps to +-limit, which is FloatQuant with
``saturation=1`` and ROUND/HALF_EVEN for every finite ``x/scale`` (measured over all
binades, ties, subnormals and overflow, ``tests/test_float8.py``). Two places differ and
keep a FloatQuant off QuantizeLinear: without saturation ONNX Runtime 1.32's float8
QuantizeLinear saturates E4M3FN and gives NaN for E5M2 where FloatQuant gives NaN and inf
respectively; and where ``x/scale`` is infinite (an infinite input, or an overflowing
division) FloatQuant gives NaN while ``saturate=1`` gives +-limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
from onnx import TensorProto

from .analysis import Minifloat


@dataclass(frozen=True)
class Float8Type:
    name: str
    numpy: type
    onnx: int
    mantissa_bits: int
    bias: int
    limit: float


FLOAT8_TYPES = (
    Float8Type("FLOAT8E4M3FN", ml_dtypes.float8_e4m3fn, TensorProto.FLOAT8E4M3FN, 3, 7, 448.0),
    Float8Type("FLOAT8E5M2", ml_dtypes.float8_e5m2, TensorProto.FLOAT8E5M2, 2, 15, 57344.0),
)


def quantize_linear_type(minifloat: Minifloat, rounding_mode: str) -> Float8Type | None:
    """The float8 type whose saturating QuantizeLinear is exactly this FloatQuant, if any."""
    if not minifloat.saturation or rounding_mode not in ("ROUND", "HALF_EVEN"):
        return None
    for kind in FLOAT8_TYPES:
        if (minifloat.mantissa_bits, minifloat.bias, float(minifloat.limit)) == (kind.mantissa_bits, kind.bias, kind.limit):
            return kind
    return None


def storing_type(values: np.ndarray) -> Float8Type | None:
    """The first float8 type (finest first) that holds every value exactly (NaN stays NaN)."""
    for kind in FLOAT8_TYPES:
        with np.errstate(all="ignore"):
            back = values.astype(kind.numpy).astype(np.float32)
        if np.array_equal(back, values, equal_nan=True) and np.array_equal(np.signbit(back), np.signbit(values)):
            return kind
    return None
