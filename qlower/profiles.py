"""Profiles: who will run the lowered model, as data the passes read (SPEC 2.2).

A profile is a small frozen layout policy. Passes ask it questions ("shift signed
activations into uint8?", "keep the range Clip on weights?") and never branch on its
name, so a new runtime is a new ``Profile`` value here, not new code paths in passes.
Every choice a profile makes is exact: the lowered model computes the same numbers as
the reference under ONNX Runtime at ORT_DISABLE_ALL whatever the profile; the profile
only changes which integer kernels a runtime's own optimizer can find in it.

``emitted_forms`` lists, per profile, what each QONNX construct becomes; the README's
support matrix is generated from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedError

RUNTIMES = ("onnxruntime", "openvino")  # what verification can run a lowered model on
UINT8_SIGNED_SHIFT = 128  # int8 value v is stored as uint8 v + 128 (same saturation bounds)


@dataclass(frozen=True)
class RuntimeSetting:
    """One setting a layout assumes, in the runtime's own spelling (a runner can apply it)."""

    runtime: str  # "any", "onnxruntime" or "openvino"
    name: str
    value: str
    why: str

    def to_dict(self) -> dict[str, str]:
        return {"runtime": self.runtime, "name": self.name, "value": self.value, "why": self.why}


@dataclass(frozen=True)
class Profile:
    """A QCDQ layout policy. Field defaults are the portable (Brevitas) layout."""

    name: str
    summary: str
    # Targets the policy applies to; qop emits QLinear ops itself, so only portable applies.
    targets: tuple[str, ...] = ("qcdq",)
    # 0: signed <= 8-bit activations in int8. 128: in uint8 with the zero point shifted by
    # 128 (ORT rewrites and fuses only uint8 Q -> Clip -> DQ chains).
    signed_activation_shift: int = 0
    # Keep Brevitas's range-marking integer Clip between a weight initializer and its DQ.
    weight_range_clip: bool = True
    # Fold a Relu feeding an activation quantizer into its integer Clip (lo = max(lo, zp)).
    fold_relu_into_clip: bool = False
    # Put Max(x, x) between a DequantizeLinear and an AveragePool, so a runtime that would
    # run the pool on the integers and round the mean (OpenVINO) computes it in float.
    average_pool_in_float: bool = False
    # Write a Trunc v2 whose scale ratio snaps to 1 as Q -> [Clip] -> DQ instead of float ops.
    trunc_unit_ratio_as_qdq: bool = False
    # Quantize a graph input under a scale that is not a power of two by comparing it with
    # exact thresholds: a runtime that multiplies by the reciprocal instead of dividing
    # (OpenVINO) would move inputs lying on a tie by 1 step. Other such QuantizeLinears are
    # reported per node.
    exact_input_quantizers: bool = False
    # Store constant weights over 8 bits as float32 constants instead of int32 + DQ.
    wide_weights_as_float: bool = False
    # Lower an activation FloatQuant of an ONNX float8 format to float8 Q/DQ (else the exact
    # float path); ``float8_why`` says why a profile does not.
    float8_activations: bool = True
    float8_why: str = ""
    # The runtime settings the layout assumes.
    runtime_settings: tuple[RuntimeSetting, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "summary": self.summary,
            "targets": list(self.targets),
            "signed_activation_shift": self.signed_activation_shift,
            "weight_range_clip": self.weight_range_clip,
            "fold_relu_into_clip": self.fold_relu_into_clip,
            "wide_weights_as_float": self.wide_weights_as_float,
            "average_pool_in_float": self.average_pool_in_float,
            "trunc_unit_ratio_as_qdq": self.trunc_unit_ratio_as_qdq,
            "exact_input_quantizers": self.exact_input_quantizers,
            "float8_activations": self.float8_activations,
            "runtime_settings": [setting.to_dict() for setting in self.runtime_settings],
        }


PORTABLE = Profile(
    name="portable",
    summary="Brevitas's own QCDQ export layout, so exported and lowered models look the same to every runtime",
    targets=("qcdq", "qop"),
    runtime_settings=(RuntimeSetting("any", "operators", "QuantizeLinear, DequantizeLinear, integer Clip", "opset 13+"),),
)

ORT = Profile(
    name="ort",
    summary="QCDQ that ONNX Runtime's CPU provider fuses into integer Conv/MatMul/Gemm kernels",
    signed_activation_shift=UINT8_SIGNED_SHIFT,
    fold_relu_into_clip=True,
    wide_weights_as_float=True,
    runtime_settings=(
        RuntimeSetting("onnxruntime", "providers", "CPUExecutionProvider", "the fusion rules measured in SPEC 2.2 are the CPU provider's"),
        RuntimeSetting(
            "onnxruntime", "graph_optimization_level", "ORT_ENABLE_ALL",
            "the integer-kernel fusions need it; ORT_DISABLE_ALL computes the same values in float",
        ),
    ),
)

OPENVINO = Profile(
    name="openvino",
    summary="QCDQ that OpenVINO's CPU plugin runs as int8 kernels with the reference's rounding",
    weight_range_clip=False,
    average_pool_in_float=True,
    trunc_unit_ratio_as_qdq=True,
    exact_input_quantizers=True,
    float8_activations=False,
    float8_why=(
        "OpenVINO 2026.4's CPU plugin converts float32 to float8 through a 16-bit float, rounding twice: "
        "0.1% to 0.5% of values land one float8 step off (measured)"
    ),
    runtime_settings=(
        RuntimeSetting("openvino", "device", "CPU", "the int8 transformations measured here are the CPU plugin's"),
        RuntimeSetting("openvino", "INFERENCE_PRECISION_HINT", "f32", "the default bf16 on AMX/AVX512-BF16 CPUs rounds the float ops that remain"),
        RuntimeSetting(
            "openvino", "DYNAMIC_QUANTIZATION_GROUP_SIZE", "0",
            "else a MatMul/Gemm with int8 weights and a float input quantizes that input on the fly",
        ),
    ),
)

def openvino_config(profile: Profile) -> dict[str, str]:
    """The OpenVINO compile properties ``profile`` assumes (for ``Core.compile_model``)."""
    return {s.name: s.value for s in profile.runtime_settings if s.runtime == "openvino" and s.name != "device"}


PROFILES: dict[str, Profile] = {p.name: p for p in (PORTABLE, ORT, OPENVINO)}


def get_profile(name: str | Profile, target: str) -> Profile:
    """The profile called ``name``, checked against ``target``; one clear error otherwise."""
    profile = name if isinstance(name, Profile) else PROFILES.get(name)
    if profile is None:
        raise UnsupportedError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    if target not in profile.targets:
        raise UnsupportedError(
            f"profile {profile.name} is a QCDQ layout and applies to --to {', '.join(profile.targets)}, not --to {target}"
            " (qop emits QLinear integer ops itself)"
        )
    return profile


def emitted_forms(profile: Profile) -> dict[str, str]:
    """What each QONNX construct becomes under ``profile`` (rows of the support matrix)."""
    if profile.signed_activation_shift:
        shift = profile.signed_activation_shift
        signed = f"QuantizeLinear(uint8, zp+{shift}) -> [Clip({shift}+q_min, {shift}+q_max)] -> DequantizeLinear(uint8, zp+{shift})"
    else:
        signed = "QuantizeLinear(int8) -> [Clip(q_min, q_max)] -> DequantizeLinear(int8)"
    relu = (
        "folded into the quantizer's integer Clip (lo = max(q_min, zp)) when the quantizer is its only consumer"
        if profile.fold_relu_into_clip
        else "kept as a float Relu"
    )
    weight_clip = " -> Clip(q_min, q_max)" if profile.weight_range_clip else ""
    wide_weight = (
        "float32 constant (exact folded values)"
        if profile.wide_weights_as_float
        else "int32 initializer -> DequantizeLinear"
    )
    return {
        "signed activation, 2..8 bits, zero point 0": signed,
        "unsigned activation, 2..8 bits, zero point 0": "QuantizeLinear(uint8) -> [Clip(q_min, q_max)] -> DequantizeLinear(uint8)",
        "activation with a non-zero zero point": "Div -> Add(zp) -> QuantizeLinear(scale 1) -> [Clip] -> DequantizeLinear(scale, zp)",
        "activation, 9..16 bits": "int16/uint16 Q/DQ at opset 21+ (float Clip before Q), else the exact float path",
        "Relu feeding an activation quantizer": relu,
        "weight, 2..8 bits (narrower than its container)": f"int8/uint8 initializer{weight_clip} -> DequantizeLinear",
        "weight, 9..32 bits": wide_weight,
        "activation FloatQuant in an OCP float8 format (saturating, ROUND)": (
            "QuantizeLinear(float8, saturate=1) -> DequantizeLinear (opset 19+)"
            if profile.float8_activations
            else "the exact float path (float8 conversion is inexact on this runtime); on a graph input under a scale"
            " that is not a power of two, a lookup among exact thresholds"
        ),
        "bias": "int32 initializer -> DequantizeLinear(float32(s_x*s_w), 0) where exact",
        "binary activation (BipolarQuant, signed 1-bit Quant)": "GreaterOrEqual -> Where(+s, -s)",
        "AveragePool on a dequantized input": (
            "DequantizeLinear -> Max(x, x) -> AveragePool (keeps the mean in float)" if profile.average_pool_in_float else "unchanged"
        ),
        "Trunc v2 whose scale ratio snaps to 1 (per-tensor, <= 8 bits)": (
            "[Div -> Add(zp)] -> QuantizeLinear(scale) -> [Clip] -> DequantizeLinear(out_scale)"
            if profile.trunc_unit_ratio_as_qdq
            else "float ops in QONNX's order (Div, Round, Clip, rounding, Mul)"
        ),
        "Trunc, other": "float ops in QONNX's order (Div, Round, Clip, rounding, Mul)",
        "QuantizeLinear with a scale that is not a power of two": (
            "on a graph input: an estimate corrected by comparisons with exact thresholds, then QuantizeLinear(scale 1);"
            " elsewhere reported per node (a reciprocal multiply may move a value within float rounding of a tie by 1 step)"
            if profile.exact_input_quantizers
            else "emitted as is"
        ),
        "runtime settings assumed": "; ".join(f"{s.runtime} {s.name}={s.value}" for s in profile.runtime_settings),
    }
