"""The pipeline table: which passes run, in order, for each target.

A new lowering is a new module in this package plus one line here. Quantizer passes are
tried in order on every quantizer not yet lowered; the first whose check passes wins, so
the exact-but-slow fallbacks come last.
"""

from __future__ import annotations

from .activation_qcdq import ActivationQCDQ
from .base import GraphPass, QuantizerPass
from .bias_accumulator_grid import BiasAccumulatorGrid
from .bipolar_activation import BipolarActivation
from .bipolar_float_path import BipolarFloatPath
from .float8_activation import Float8Activation
from .float_quant_float_path import FloatQuantFloatPath
from .float_quant_format_float_path import FloatQuantFormatFloatPath
from .float_quant_input_lookup import FloatQuantInputLookup
from .fold_constant_float import FoldConstantToFloat
from .float_average_pool import FloatAveragePool
from .fold_constant_float8 import FoldConstantFloat8
from .fold_constant_quantizer import FoldConstantQuantizer
from .input_quantizer_thresholds import ExactInputQuantizers
from .qlinear_conv import QLinearConvPass
from .qlinear_matmul import QLinearMatMulPass
from .quant_float_path import QuantFloatPath
from .rounded_outputs import RoundedOutputsAsIntegers
from .saturated_relu import SaturatedRelu
from .trunc import TruncToFloatOps
from .trunc_qdq import TruncUnitRatioQDQ

_QCDQ_QUANTIZER_PASSES: tuple[QuantizerPass, ...] = (
    FoldConstantQuantizer(),
    FoldConstantFloat8(),
    ActivationQCDQ(),
    Float8Activation(),
    BipolarActivation(),
    BipolarFloatPath(),
    TruncUnitRatioQDQ(),
    TruncToFloatOps(),
    QuantFloatPath(),
    FloatQuantInputLookup(),
    FloatQuantFloatPath(),
    FloatQuantFormatFloatPath(),
    FoldConstantToFloat(),
)

_GRAPH_PASSES: dict[str, tuple[GraphPass, ...]] = {
    # A bias on its own grid (QKeras) is exact in QCDQ but ONNX Runtime's QGemm/QLinearConv
    # fusion assumes the s_x*s_w grid and silently misreads it, so qcdq moves it too.
    # A profile may keep average pools on dequantized integers in float (openvino); the
    # profile may quantize graph inputs by exact thresholds where a reciprocal multiply
    # would move ties (openvino).
    "qcdq": (BiasAccumulatorGrid(), FloatAveragePool(), ExactInputQuantizers()),
    # Biases onto the accumulator grid (exact), float-path quantizer outputs that feed a unit
    # as integers (exact), then the compute units (exact requantization), then the Relus of
    # units left float that their QuantizeLinear's saturation already applies (exact).
    "qop": (BiasAccumulatorGrid(), RoundedOutputsAsIntegers(), QLinearConvPass(), QLinearMatMulPass(), SaturatedRelu()),
}


def quantizer_passes_for(target: str) -> tuple[QuantizerPass, ...]:
    """Quantizer lowering passes; qop starts from the same exact QCDQ form."""
    return _QCDQ_QUANTIZER_PASSES


def graph_passes_for(target: str) -> tuple[GraphPass, ...]:
    """Passes over the lowered graph: the bias grid fix, and qop's QLinear fusion."""
    return _GRAPH_PASSES[target]
