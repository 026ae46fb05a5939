"""Hypothesis strategies that build random, valid QONNX models for differential fuzzing.

``fuzz_cases()`` draws a :class:`FuzzCase`: a small QONNX ``ModelProto`` (a chain or a
small DAG of Conv / ConvTranspose / MatMul / Gemm / Add / Concat / Relu / MaxPool /
AveragePool / Reshape / Transpose), explicit inputs that sit on exact rounding ties of the
first quantizer, and the output opset to ask for. Quantizers (Quant, BipolarQuant, Trunc
v1/v2, FloatQuant) sit on activations, weights and biases with:

* integer bit widths 1..32, signed / unsigned, narrow or not;
* per-tensor and per-channel scales on the right axis for each op, including awkward
  values (1/3, 0.1, 17) and values near the float32 subnormal range (always positive
  normal floats);
* integer zero points, odd and negative ones included, sometimes just outside the integer
  range (valid QONNX) except on Brevitas-style units;
* FloatQuant: the OCP FP8 formats (e4m3 with NaN, e5m2 with inf and NaN, as Brevitas
  exports them) and other minifloats (1..6 exponent bits, 0..5 mantissa bits, biases and
  maxima on and off the format's own), saturating or not, on activations and weights;
* Quants with a scale computed at run time (``ReduceMax(|x|) * c + eps``), sometimes a
  run-time bit width too; BipolarQuants with a run-time scale (per tensor or per element);
  Truncs (v1/v2) with a run-time scale and sometimes a run-time zero point, output scale
  and bit widths; FloatQuants with a run-time exponent / mantissa width, bias or max_val;
* every rounding mode, in any letter case;
* every QONNX domain spelling, the ``IntQuant`` alias, opsets 11..21 (and ``opset=21`` on
  convert), IR 6..10, optional shape information, an optional symbolic batch dimension,
  the QONNX domain sometimes missing from ``opset_import``, nodes sometimes unnamed,
  sometimes a second graph output.

Structural decisions are drawn from hypothesis (so failures shrink to small graphs); bulk
arrays (weights, per-channel vectors, tie inputs) come from a numpy generator seeded by a
drawn integer. Every model is valid QONNX: qlower must lower each one, for every target,
and verification must hold. Shapes are tiny so one convert + verify takes milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

ROUNDING_MODES = ("ROUND", "HALF_EVEN", "CEIL", "FLOOR", "UP", "DOWN", "HALF_UP", "HALF_DOWN")
QONNX_DOMAINS = ("qonnx.custom_op.general", "onnx.brevitas", "finn.custom_op.general", "finn")
F32 = np.float32
F32_TINY = float(np.finfo(np.float32).tiny)  # smallest positive normal float32, ~1.18e-38

# Scales a fuzzer should lean on: non-dyadic values whose reciprocal is inexact, powers of
# two, and normal floats just above the subnormal range (all positive and normal).
AWKWARD_SCALES = (
    1 / 3, 2 / 3, 0.1, 0.05, 0.007, 0.7071, 3.0, 17.0, 250.0,
    1.0, 0.5, 0.25, 2.0**-7, 2.0**-12, 2.0**-20,
    1e-20, 1e-30, 2.0**-120, 1e-37, 4e-38, 2.0 * F32_TINY, F32_TINY,
)


@dataclass
class FuzzCase:
    """One generated model plus what the test needs to run it."""

    model: onnx.ModelProto
    inputs: list[dict[str, np.ndarray]] | None  # explicit (tie) inputs, or None for random only
    opset: int | None  # the ``opset=`` to pass to convert
    description: list[str] = field(default_factory=list)

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example
        return "FuzzCase(\n  " + "\n  ".join(self.description) + f"\n  convert opset={self.opset}\n)"


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]  # the concrete shape (batch included)
    from_quantizer: tuple[np.ndarray, np.ndarray] | None = None  # (scale, zp) when a Quant made it


def _pick(draw, weighted: list[tuple[int, object]]) -> object:
    """Draw one value with integer weights; shrinks toward the first entry."""
    total = sum(w for w, _ in weighted)
    index = draw(st.integers(0, total - 1))
    for weight, value in weighted:
        if index < weight:
            return value
        index -= weight
    raise AssertionError


def int_range(signed: bool, narrow: bool, bits: int) -> tuple[int, int]:
    if signed:
        return -(2 ** (bits - 1)) + (1 if narrow else 0), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1 - (1 if narrow else 0)


class _Builder:
    """Accumulates nodes and initializers with deterministic, unique names."""

    def __init__(self, draw, rng: np.random.Generator, domain: str) -> None:
        self.draw = draw
        self.rng = rng
        self.domain = domain
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0
        self.description: list[str] = []
        self.trunc_versions: set[int] = set()
        self.first_quantizer: dict[str, object] | None = None

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, prefix: str, value: np.ndarray) -> str:
        name = self.fresh(prefix)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], domain: str = "", **attrs: object) -> str:
        name = self.fresh(op)
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, domain=domain, **attrs))
        return out

    def note(self, text: str) -> None:
        self.description.append(text)

    # ---- quantizer parameters ----------------------------------------------------------

    def scale_values(self, shape: tuple[int, ...]) -> np.ndarray:
        """Positive normal float32 scales of ``shape`` (per-tensor when shape is ())."""
        style = _pick(self.draw, [(4, "awkward"), (4, "moderate"), (1, "mixed")])
        count = int(np.prod(shape)) if shape else 1
        if style == "awkward":
            base = self.draw(st.sampled_from(AWKWARD_SCALES))
            if count > 1:
                values = base * self.rng.choice([1.0, 0.5, 2.0, 1 / 3, 3.0, 0.75], size=count)
            else:
                values = np.array([base])
        elif style == "moderate":
            if count > 1:
                values = 10.0 ** self.rng.uniform(-3, 0.5, size=count)
            else:
                values = np.array([self.draw(st.floats(float(F32(1e-3)), 4.0, allow_nan=False, allow_infinity=False, width=32))])
        else:
            values = self.rng.choice(np.array(AWKWARD_SCALES), size=count)
        values = np.maximum(values.astype(F32), F32(F32_TINY))
        return values.reshape(shape)

    def zero_point_values(self, shape: tuple[int, ...], q_min: int, q_max: int, outside: bool = False) -> np.ndarray:
        """Integer zero points inside ``[q_min, q_max]`` (or, with ``outside``, sometimes just
        outside it: valid QONNX), exactly representable in float32."""
        lo, hi = max(q_min, -(2**24)), min(q_max, 2**24)
        style = _pick(self.draw, [(5, "zero"), (3, "small"), (2, "edge"), (2, "any"), (1 if outside else 0, "outside")])
        count = int(np.prod(shape)) if shape else 1
        if style == "outside":
            beyond = self.rng.integers(1, 4, size=count)
            values = np.where(self.rng.random(count) < 0.5, hi + beyond, lo - beyond)
        elif style == "zero":
            values = np.zeros(count)
        elif style == "small":
            if count == 1:
                values = np.array([self.draw(st.integers(max(lo, -5), min(hi, 5)))])
            else:
                values = self.rng.integers(max(lo, -5), min(hi, 5) + 1, size=count)
        elif style == "edge":
            choices = sorted({lo, hi, min(max(1, lo), hi), min(max(-1, lo), hi)})
            values = np.array([self.draw(st.sampled_from(choices))] * count)
            if count > 1:
                values = self.rng.choice(choices, size=count)
        else:
            if count == 1:
                values = np.array([self.draw(st.integers(lo, hi))])
            else:
                values = self.rng.integers(lo, hi + 1, size=count)
        return values.astype(F32).reshape(shape)

    def bits(self, typical: tuple[int, int] = (2, 8)) -> int:
        return _pick(self.draw, [(6, self.draw(st.integers(*typical))), (2, self.draw(st.integers(1, 32))), (1, 1)])

    def rounding_mode(self, prefer_round: bool) -> str:
        mode = self.draw(st.sampled_from(ROUNDING_MODES))
        if prefer_round and self.draw(st.booleans()):
            mode = "ROUND"
        if self.draw(st.integers(0, 9)) == 0:
            mode = mode.lower()
        return mode

    def param_shape(self, x_shape: tuple[int, ...], axis: int, layout: str) -> tuple[int, ...]:
        """Shape of a per-channel parameter varying along ``axis`` of ``x_shape``."""
        if layout == "tensor" or x_shape[axis] == 1 and layout != "force":
            return ()
        rank = len(x_shape)
        full = tuple(x_shape[axis] if i == axis else 1 for i in range(rank))
        # numpy broadcasting aligns from the right, so leading ones may be dropped
        trimmed = full[axis:]
        return self.draw(st.sampled_from([full, trimmed])) if trimmed != full else full

    # ---- quantizer nodes ----------------------------------------------------------------

    def quant(
        self, x: _Tensor, *, role: str, channel_axis: int | None, unit_friendly: bool = False,
        bits: int | None = None, signed: bool | None = None,
    ) -> _Tensor:
        """A Quant node on ``x`` (an activation tensor, or a constant's name with its shape)."""
        if bits is None:
            bits = self.bits((2, 8)) if role != "bias" else _pick(self.draw, [(5, 32), (3, self.draw(st.integers(8, 32))), (1, self.draw(st.integers(1, 32)))])
        if unit_friendly:
            bits = self.draw(st.integers(2, 8))
        if signed is None:
            signed = self.draw(st.booleans()) if role == "activation" else _pick(self.draw, [(4, True), (1, False)])
        narrow = _pick(self.draw, [(3, False), (1, True)])
        mode = "ROUND" if unit_friendly else self.rounding_mode(prefer_round=(role == "activation"))
        per_channel = channel_axis is not None and _pick(self.draw, [(2, False), (1, True)])
        shape = self.param_shape(x.shape, channel_axis, "channel") if per_channel else ()
        scale = self.scale_values(shape)
        q_min, q_max = int_range(signed, narrow, bits)
        if signed and bits == 1:
            zp = np.array(self.draw(st.sampled_from([0, 0, -1, 1])), F32)
        elif unit_friendly and self.draw(st.booleans()):
            zp = np.zeros((), F32)
        else:
            zp_shape = shape if (shape and self.draw(st.booleans())) else ()
            zp = self.zero_point_values(zp_shape, q_min, q_max, outside=not unit_friendly)
        op = "IntQuant" if self.draw(st.integers(0, 9)) == 0 else "Quant"
        attrs = {"signed": int(signed), "narrow": int(narrow)}
        if mode != "ROUND" or self.draw(st.booleans()):
            attrs["rounding_mode"] = mode
        inputs = [x.name, self.const("scale", scale), self.const("zero_point", zp), self.const("bit_width", np.array(bits, F32))]
        out = self.node(op, inputs, domain=self.domain, **attrs)
        self.note(
            f"{self.nodes[-1].name}: {op} on {role} {x.name}{list(x.shape)} bits={bits} signed={int(signed)} "
            f"narrow={int(narrow)} mode={mode} scale={_brief(scale)} zp={_brief(zp)}"
        )
        if role == "activation" and self.first_quantizer is None:
            self.first_quantizer = {"x": x.name, "kind": "quant", "scale": scale, "zp": zp, "range": (q_min, q_max), "bits": bits}
        return _Tensor(out, x.shape, (scale, zp) if not (signed and bits == 1) else None)

    def runtime_quant(self, x: _Tensor) -> _Tensor:
        """A Quant whose scale (and sometimes bit width) is computed in the graph, as dynamic
        quantization does: ``scale = ReduceMax(|x|) * c + eps``, ``bits = Size(x) * 0 + b``."""
        bits = self.draw(st.integers(2, 8))
        signed = self.draw(st.booleans())
        narrow = _pick(self.draw, [(3, False), (1, True)])
        mode = self.rounding_mode(prefer_round=True)
        peak = self.node("ReduceMax", [self.node("Abs", [x.name])], keepdims=0)
        factor = F32(1.0 / 2 ** (bits - 1)) * F32(self.draw(st.sampled_from([1.0, 0.7, 1.3])))
        scale = self.node("Add", [self.node("Mul", [peak, self.const("scale_factor", np.array(factor, F32))]), self.const("scale_floor", np.array(1e-3, F32))])
        q_min, q_max = int_range(signed, narrow, bits)
        zp = self.zero_point_values((), q_min, q_max, outside=True)
        runtime_bits = self.draw(st.booleans())
        if runtime_bits:
            size = self.node("Cast", [self.node("Size", [x.name])], to=TensorProto.FLOAT)
            bit_width = self.node("Add", [self.node("Mul", [size, self.const("zero", np.array(0, F32))]), self.const("bits", np.array(bits, F32))])
        else:
            bit_width = self.const("bit_width", np.array(bits, F32))
        inputs = [x.name, scale, self.const("zero_point", zp), bit_width]
        out = self.node("Quant", inputs, domain=self.domain, signed=int(signed), narrow=int(narrow), rounding_mode=mode)
        self.note(
            f"{self.nodes[-1].name}: Quant on {x.name}{list(x.shape)} with a run-time scale (ReduceMax(|x|) * {factor:g} + 1e-3)"
            f"{' and run-time bit width' if runtime_bits else ''} bits={bits} signed={int(signed)} narrow={int(narrow)} mode={mode} zp={_brief(zp)}"
        )
        return _Tensor(out, x.shape)

    def runtime_scale(self, x: _Tensor, factor: float) -> str:
        """A scale computed in the graph from ``x``: per tensor ``ReduceMax(|x|) * c + eps``, or
        one scale per element ``|x| * c + eps`` (any broadcastable shape is valid QONNX)."""
        magnitude = self.node("Abs", [x.name])
        if self.draw(st.booleans()):
            magnitude = self.node("ReduceMax", [magnitude], keepdims=0)
        return self.node("Add", [self.node("Mul", [magnitude, self.const("scale_factor", np.array(factor, F32))]), self.const("scale_floor", np.array(1e-3, F32))])

    def runtime_bipolar(self, x: _Tensor) -> _Tensor:
        """A BipolarQuant whose scale is computed at run time (XNOR-Net style magnitudes)."""
        factor = self.draw(st.sampled_from([1.0, 0.5, 1 / 3]))
        out = self.node("BipolarQuant", [x.name, self.runtime_scale(x, factor)], domain=self.domain)
        self.note(f"{self.nodes[-1].name}: BipolarQuant on {x.name}{list(x.shape)} with a run-time scale (|x| * {factor:g} + 1e-3)")
        return _Tensor(out, x.shape)

    def runtime_value(self, x: _Tensor, value: float) -> str:
        """A scalar parameter computed at run time that always equals ``value``: ``Size(x) * 0 + value``."""
        size = self.node("Cast", [self.node("Size", [x.name])], to=TensorProto.FLOAT)
        return self.node("Add", [self.node("Mul", [size, self.const("zero", np.array(0, F32))]), self.const("value", np.array(value, F32))])

    def runtime_trunc(self, x: _Tensor) -> _Tensor:
        """A Trunc whose scale is computed at run time, and sometimes its zero point, output scale
        and bit widths (k = 2^round(log2(out_scale/scale)) then snaps in the graph)."""
        version = self.draw(st.sampled_from(sorted(self.trunc_versions) or [1, 2]))
        self.trunc_versions.add(version)
        in_bits = self.draw(st.integers(4, 16))
        out_bits = self.draw(st.integers(1, in_bits))
        scale = self.runtime_scale(x, 1.0 / 2 ** (in_bits - 1))
        zp = float(self.draw(st.integers(-3, 3))) if self.draw(st.booleans()) else 0.0
        runtime = {name for name in ("zero point", "input bits", "output bits", "output scale") if self.draw(st.integers(0, 2)) == 0}

        def param(name: str, prefix: str, value: float) -> str:
            return self.runtime_value(x, value) if name in runtime else self.const(prefix, np.array(value, F32))

        inputs = [x.name, scale, param("zero point", "zero_point", zp), param("input bits", "in_bit_width", float(in_bits))]
        mode = self.rounding_mode(prefer_round=False)
        attrs: dict[str, object] = {"rounding_mode": mode}
        extra = ""
        if version == 2:
            ratio = _pick(self.draw, [(4, 2.0 ** self.draw(st.integers(-2, 6))), (1, self.draw(st.sampled_from([3.0, 0.3, 1.4142135, 1.4142137, 5.9])))])
            ratio_name = self.const("ratio", np.array(ratio, F32))
            out_scale = self.node("Mul", [scale, ratio_name]) if "output scale" in runtime else self.const("out_scale", np.array(ratio * 0.01, F32))
            inputs += [out_scale, param("output bits", "out_bit_width", float(out_bits))]
            signed, narrow = self.draw(st.booleans()), _pick(self.draw, [(3, False), (1, True)])
            attrs.update(signed=int(signed), narrow=int(narrow))
            extra = f" ratio={ratio:g} signed={int(signed)} narrow={int(narrow)}"
        else:
            inputs.append(param("output bits", "out_bit_width", float(out_bits)))
        out = self.node("Trunc", inputs, domain=self.domain, **attrs)
        self.note(
            f"{self.nodes[-1].name}: Trunc v{version} on {x.name}{list(x.shape)} with a run-time scale"
            f"{''.join(f', run-time {name}' for name in sorted(runtime))} in_bits={in_bits} out_bits={out_bits} mode={mode} zp={zp:g}{extra}"
        )
        return _Tensor(out, x.shape)

    def runtime_float_quant(self, x: _Tensor) -> _Tensor:
        """A FloatQuant whose exponent / mantissa width, bias or max_val (some of them) and
        sometimes scale are computed at run time; formats as ``float_quant`` draws them, and
        biases whose steps leave float32 (lowered exactly by clamping the step)."""
        exponent, mantissa = self.draw(st.integers(1, 8)), self.draw(st.integers(0, 10))
        bias = _pick(self.draw, [(6, self.draw(st.integers(-2, 2 ** (exponent - 1) + 2))), (1, self.draw(st.sampled_from([127, 150, -100])))])
        top_exponent = 2**exponent - 1 - bias
        top = (2.0 - 2.0**-mantissa) * 2.0 ** min(top_exponent, 127)
        max_val = float(F32(min(_pick(self.draw, [(3, top), (1, top / 3), (1, top * 2)]), 3e38)))
        attrs: dict[str, object] = {}
        if self.draw(st.integers(0, 3)) == 0:
            attrs["saturation"] = 0
            attrs[self.draw(st.sampled_from(["has_inf", "has_nan"]))] = 1
        mode = self.rounding_mode(prefer_round=True)
        if mode != "ROUND":
            attrs["rounding_mode"] = mode
        names = ("exponent_bitwidth", "mantissa_bitwidth", "exponent_bias", "max_val")
        runtime = {name for name in names if self.draw(st.booleans())} or {self.draw(st.sampled_from(names))}
        params = dict(zip(names, (exponent, mantissa, bias, max_val)))
        scale = self.runtime_scale(x, 1.0 / max(max_val, 1e-30)) if self.draw(st.booleans()) else self.const("scale", np.array(self.draw(st.sampled_from([1.0, 0.1, 0.37])), F32))
        inputs = [x.name, scale, *(self.runtime_value(x, float(value)) if name in runtime else self.const(name, np.array(value, F32)) for name, value in params.items())]
        out = self.node("FloatQuant", inputs, domain=self.domain, **attrs)
        self.note(
            f"{self.nodes[-1].name}: FloatQuant on {x.name}{list(x.shape)} e{exponent}m{mantissa} bias={bias} max={max_val:g} "
            f"run-time {', '.join(sorted(runtime))} {attrs}"
        )
        return _Tensor(out, x.shape)

    def float_quant(self, x: _Tensor, *, role: str, channel_axis: int | None) -> _Tensor:
        """A FloatQuant: OCP FP8 (e4m3 / e5m2, as Brevitas exports them) or another minifloat."""
        kind = _pick(self.draw, [(3, "e4m3"), (2, "e5m2"), (3, "other")])
        attrs: dict[str, object] = {}
        if kind == "e4m3":
            exponent, mantissa, bias, max_val = 4, 3, 7, 448.0
            attrs["has_nan"] = 1
        elif kind == "e5m2":
            exponent, mantissa, bias, max_val = 5, 2, 15, 57344.0
            attrs.update(has_inf=1, has_nan=1)
        else:
            exponent, mantissa = self.draw(st.integers(1, 6)), self.draw(st.integers(0, 5))
            bias = self.draw(st.integers(-2, 2 ** (exponent - 1) + 2))
            top = (2.0 - 2.0**-mantissa) * 2.0 ** (2**exponent - 1 - bias)
            max_val = float(F32(_pick(self.draw, [(3, top), (1, top / 3), (1, top * 2)])))
        if self.draw(st.integers(0, 4)) == 0:
            attrs["saturation"] = 0
            attrs.setdefault(self.draw(st.sampled_from(["has_inf", "has_nan"])), 1)
        mode = self.rounding_mode(prefer_round=True)
        if mode != "ROUND" or self.draw(st.booleans()):
            attrs["rounding_mode"] = mode
        per_channel = channel_axis is not None and _pick(self.draw, [(2, False), (1, True)])
        shape = self.param_shape(x.shape, channel_axis, "channel") if per_channel else ()
        count = int(np.prod(shape)) if shape else 1
        scale = (10.0 ** self.rng.uniform(-3, 0.5, size=count)).astype(F32).reshape(shape)
        params = [(name, np.array(value, F32)) for name, value in
                  (("exponent_bitwidth", exponent), ("mantissa_bitwidth", mantissa), ("exponent_bias", bias), ("max_val", max_val))]
        inputs = [x.name, self.const("scale", scale), *(self.const(name, value) for name, value in params)]
        out = self.node("FloatQuant", inputs, domain=self.domain, **attrs)
        self.note(
            f"{self.nodes[-1].name}: FloatQuant on {role} {x.name}{list(x.shape)} e{exponent}m{mantissa} bias={bias} "
            f"max={max_val:g} {attrs} scale={_brief(scale)}"
        )
        return _Tensor(out, x.shape)

    def bipolar(self, x: _Tensor, *, role: str, channel_axis: int | None) -> _Tensor:
        per_channel = channel_axis is not None and self.draw(st.booleans())
        shape = self.param_shape(x.shape, channel_axis, "channel") if per_channel else ()
        scale = self.scale_values(shape)
        out = self.node("BipolarQuant", [x.name, self.const("scale", scale)], domain=self.domain)
        self.note(f"{self.nodes[-1].name}: BipolarQuant on {role} {x.name}{list(x.shape)} scale={_brief(scale)}")
        if role == "activation" and self.first_quantizer is None:
            self.first_quantizer = {"x": x.name, "kind": "bipolar", "scale": scale}
        return _Tensor(out, x.shape)

    def trunc(self, x: _Tensor, *, version: int, channel_axis: int | None) -> _Tensor:
        per_channel = channel_axis is not None and _pick(self.draw, [(3, False), (1, True)])
        shape = self.param_shape(x.shape, channel_axis, "channel") if per_channel else ()
        scale = self.scale_values(shape)
        zp = np.array(self.draw(st.integers(-3, 3)), F32) if self.draw(st.booleans()) else np.zeros((), F32)
        in_bits = self.draw(st.integers(4, 24))
        out_bits = self.draw(st.integers(1, in_bits))
        mode = self.rounding_mode(prefer_round=False)
        if version == 2:
            signed = self.draw(st.booleans())
            narrow = _pick(self.draw, [(3, False), (1, True)])
            ratio = _pick(self.draw, [(4, 2.0 ** self.draw(st.integers(-2, 6))), (1, self.draw(st.sampled_from([3.0, 0.3, 1.4, 5.9])))])
            out_scale = (scale * F32(ratio)).astype(F32)
            if self.draw(st.integers(0, 3)) == 0:
                out_scale = np.asarray(out_scale.reshape(-1)[0], F32)  # per-tensor output scale
            inputs = [x.name, self.const("scale", scale), self.const("zero_point", zp), self.const("in_bit_width", np.array(in_bits, F32)),
                      self.const("out_scale", out_scale), self.const("out_bit_width", np.array(out_bits, F32))]
            attrs = {"rounding_mode": mode, "signed": int(signed), "narrow": int(narrow)}
            extra = f" signed={int(signed)} narrow={int(narrow)} out_scale={_brief(out_scale)}"
        else:
            inputs = [x.name, self.const("scale", scale), self.const("zero_point", zp), self.const("in_bit_width", np.array(in_bits, F32)),
                      self.const("out_bit_width", np.array(out_bits, F32))]
            attrs = {"rounding_mode": mode}  # required in version 1 too (QONNX marks it so)
            extra = ""
        self.trunc_versions.add(version)
        out = self.node("Trunc", inputs, domain=self.domain, **attrs)
        self.note(
            f"{self.nodes[-1].name}: Trunc v{version} on {x.name}{list(x.shape)} in_bits={in_bits} out_bits={out_bits} "
            f"mode={mode} scale={_brief(scale)} zp={_brief(zp)}{extra}"
        )
        if self.first_quantizer is None:
            self.first_quantizer = {"x": x.name, "kind": "trunc", "scale": scale, "zp": zp, "range": (-(2**in_bits), 2**in_bits), "bits": in_bits}
        return _Tensor(out, x.shape)

    def activation_quantizer(self, x: _Tensor, *, unit_friendly: bool = False) -> _Tensor:
        axis = 1 if len(x.shape) >= 2 else None
        if unit_friendly:
            return self.quant(x, role="activation", channel_axis=None, unit_friendly=True)
        kind = _pick(self.draw, [(7, "quant"), (1, "bipolar"), (2, "trunc"), (2, "float"), (1, "runtime")])
        if kind == "quant":
            return self.quant(x, role="activation", channel_axis=axis)
        if kind == "float":
            return self.float_quant(x, role="activation", channel_axis=axis)
        if kind == "runtime":
            runtime_kind = _pick(self.draw, [(3, "quant"), (1, "bipolar"), (2, "trunc"), (2, "float")])
            if runtime_kind == "bipolar":
                return self.runtime_bipolar(x)
            if runtime_kind == "trunc":
                return self.runtime_trunc(x)
            if runtime_kind == "float":
                return self.runtime_float_quant(x)
            return self.runtime_quant(x)
        if kind == "bipolar":
            return self.bipolar(x, role="activation", channel_axis=axis)
        version = self.draw(st.sampled_from(sorted(self.trunc_versions) or [1, 2]))
        return self.trunc(x, version=version, channel_axis=axis)

    def weight(self, shape: tuple[int, ...], channel_axis: int, unit_friendly: bool, act_scale: np.ndarray | None) -> tuple[str, np.ndarray | None]:
        """A weight initializer, usually quantized; returns (tensor name, per-tensor-or-channel scale or None)."""
        values = self.rng.normal(0, 0.5, size=shape).astype(F32)
        name = self.const("weight", values)
        kind = "quant" if unit_friendly else _pick(self.draw, [(7, "quant"), (1, "bipolar"), (1, "float"), (1, "trunc"), (1, "float_quant")])
        w = _Tensor(name, shape)
        if kind == "float_quant":
            return self.float_quant(w, role="weight", channel_axis=channel_axis).name, None
        if kind == "float":
            self.note(f"{name}: float weight {list(shape)}")
            return name, None
        if kind == "bipolar":
            return self.bipolar(w, role="weight", channel_axis=channel_axis).name, None
        if kind == "trunc":
            return self.trunc(w, version=self.draw(st.sampled_from(sorted(self.trunc_versions) or [1, 2])), channel_axis=channel_axis).name, None
        # Make some weights sit exactly on ties of their own grid.
        scale_probe = self.quant(w, role="weight", channel_axis=channel_axis, unit_friendly=unit_friendly, signed=True if unit_friendly else None)
        scale, zp = self._last_params()
        if self.draw(st.booleans()):
            k = self.rng.integers(-6, 7, size=shape)
            ties = ((k.astype(F32) + F32(0.5)) * np.broadcast_to(scale, shape)).astype(F32)
            mask = self.rng.random(shape) < 0.5
            values[mask] = ties[mask]
            self.inits[[i.name for i in self.inits].index(name)].CopyFrom(numpy_helper.from_array(values, name))
        return scale_probe.name, scale

    def bias(self, length: int, scale_hint: np.ndarray | None, unit_friendly: bool) -> str | None:
        if not self.draw(st.booleans()):
            return None
        values = self.rng.normal(0, 0.5, size=(length,)).astype(F32)
        name = self.const("bias", values)
        b = _Tensor(name, (length,))
        if _pick(self.draw, [(6, True), (1, False)]) is False:
            self.note(f"{name}: float bias [{length}]")
            return name
        if scale_hint is not None and np.any(np.asarray(scale_hint) < F32_TINY):
            scale_hint = None  # s_x * s_w underflowed: not a valid (positive normal) scale
        if unit_friendly and scale_hint is not None:
            # Brevitas-style: bias scale = s_x * s_w, 32 bits, zero point 0.
            scale = np.broadcast_to(scale_hint.reshape(-1), (length,)).astype(F32) if scale_hint.size > 1 else scale_hint.reshape(()).astype(F32)
            inputs = [name, self.const("scale", scale), self.const("zero_point", np.zeros((), F32)), self.const("bit_width", np.array(32, F32))]
            out = self.node("Quant", inputs, domain=self.domain, signed=1, narrow=0)
            self.note(f"{self.nodes[-1].name}: Quant on bias {name}[{length}] bits=32 scale=s_x*s_w {_brief(scale)}")
            return out
        return self.quant(b, role="bias", channel_axis=0).name

    def _last_params(self) -> tuple[np.ndarray, np.ndarray]:
        node = self.nodes[-1]
        lookup = {i.name: numpy_helper.to_array(i) for i in self.inits}
        return lookup[node.input[1]], lookup[node.input[2]]


def _brief(value: np.ndarray) -> str:
    flat = np.asarray(value).reshape(-1)
    text = ",".join(f"{v:.9g}" for v in flat[:4]) + (",..." if flat.size > 4 else "")
    return f"[{text}]{list(np.shape(value))}" if np.ndim(value) else text


# ---- compute ops ------------------------------------------------------------------------


def _conv(b: _Builder, x: _Tensor, unit: bool, same_shape: bool = False) -> _Tensor:
    n, c, h, w = x.shape
    groups = 1
    out_c = c if same_shape else b.draw(st.integers(1, 4))
    if not same_shape and c > 1 and b.draw(st.integers(0, 3)) == 0:
        groups = c  # depthwise
        out_c = c * b.draw(st.integers(1, 2))
    if same_shape:
        k, pad, stride = b.draw(st.sampled_from([(1, 0, 1), (3, 1, 1)])), None, 1
        k, pad = k[0], k[1]
    else:
        k = b.draw(st.integers(1, 3))
        pad = b.draw(st.integers(0, 1))
        stride = b.draw(st.integers(1, 2))
        if k > min(h, w) + 2 * pad:
            k = 1
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    act_scale = x.from_quantizer[0] if x.from_quantizer else None
    weight, w_scale = b.weight((out_c, c // groups, k, k), channel_axis=0, unit_friendly=unit, act_scale=act_scale)
    bias_hint = None
    if act_scale is not None and act_scale.size == 1 and w_scale is not None:
        bias_hint = (act_scale.reshape(()) * w_scale).astype(F32)
    bias = b.bias(out_c, bias_hint, unit)
    inputs = [x.name, weight] + ([bias] if bias else [])
    out = b.node("Conv", inputs, kernel_shape=[k, k], pads=[pad] * 4, strides=[stride] * 2, group=groups)
    b.note(f"{b.nodes[-1].name}: Conv {list(x.shape)} -> {[n, out_c, oh, ow]} k={k} pad={pad} stride={stride} group={groups}")
    return _Tensor(out, (n, out_c, oh, ow))


def _conv_transpose(b: _Builder, x: _Tensor, unit: bool) -> _Tensor:
    n, c, h, w = x.shape
    out_c = b.draw(st.integers(1, 3))
    k = b.draw(st.integers(1, 3))
    stride = b.draw(st.integers(1, 2)) if max(h, w) <= 3 else 1
    oh, ow = (h - 1) * stride + k, (w - 1) * stride + k
    weight, _ = b.weight((c, out_c, k, k), channel_axis=1, unit_friendly=unit, act_scale=None)
    bias = b.bias(out_c, None, unit)
    inputs = [x.name, weight] + ([bias] if bias else [])
    out = b.node("ConvTranspose", inputs, kernel_shape=[k, k], strides=[stride] * 2)
    b.note(f"{b.nodes[-1].name}: ConvTranspose {list(x.shape)} -> {[n, out_c, oh, ow]} k={k} stride={stride}")
    return _Tensor(out, (n, out_c, oh, ow))


def _matmul(b: _Builder, x: _Tensor, unit: bool) -> _Tensor:
    n, k = x.shape
    m = b.draw(st.integers(1, 6))
    act_scale = x.from_quantizer[0] if x.from_quantizer else None
    weight, w_scale = b.weight((k, m), channel_axis=1, unit_friendly=unit, act_scale=act_scale)
    out = b.node("MatMul", [x.name, weight])
    b.note(f"{b.nodes[-1].name}: MatMul {list(x.shape)} x [{k},{m}]")
    if b.draw(st.booleans()):
        hint = (act_scale.reshape(()) * w_scale).astype(F32) if (act_scale is not None and act_scale.size == 1 and w_scale is not None) else None
        bias = b.bias(m, hint, unit)
        if bias is not None:
            out = b.node("Add", [out, bias])
            b.note(f"{b.nodes[-1].name}: Add bias after MatMul")
    return _Tensor(out, (n, m))


def _gemm(b: _Builder, x: _Tensor, unit: bool) -> _Tensor:
    n, k = x.shape
    m = b.draw(st.integers(1, 6))
    trans_b = b.draw(st.booleans())
    shape, axis = ((m, k), 0) if trans_b else ((k, m), 1)
    act_scale = x.from_quantizer[0] if x.from_quantizer else None
    weight, w_scale = b.weight(shape, channel_axis=axis, unit_friendly=unit, act_scale=act_scale)
    hint = None
    if act_scale is not None and act_scale.size == 1 and w_scale is not None:
        hint = (act_scale.reshape(()) * w_scale).astype(F32)
    bias = b.bias(m, hint, unit)
    inputs = [x.name, weight] + ([bias] if bias else [])
    out = b.node("Gemm", inputs, transB=int(trans_b))
    b.note(f"{b.nodes[-1].name}: Gemm {list(x.shape)} transB={int(trans_b)} -> [{n},{m}]")
    return _Tensor(out, (n, m))


def _pool(b: _Builder, x: _Tensor, op: str) -> _Tensor:
    n, c, h, w = x.shape
    k = b.draw(st.integers(1, max(1, min(h, w, 3))))
    stride = b.draw(st.integers(1, 2))
    attrs: dict[str, object] = {"kernel_shape": [k, k], "strides": [stride, stride]}
    out = b.node(op, [x.name], **attrs)
    oh, ow = (h - k) // stride + 1, (w - k) // stride + 1
    b.note(f"{b.nodes[-1].name}: {op} {list(x.shape)} k={k} stride={stride}")
    return _Tensor(out, (n, c, oh, ow))


def _reshape(b: _Builder, x: _Tensor) -> _Tensor:
    if len(x.shape) == 4:
        n = x.shape[0]
        shape = b.const("shape", np.array([0, -1], np.int64))
        out = b.node("Reshape", [x.name, shape])
        b.note(f"{b.nodes[-1].name}: Reshape {list(x.shape)} -> [N,-1]")
        return _Tensor(out, (n, int(np.prod(x.shape[1:]))))
    n, k = x.shape
    options = [(k, 1, 1), (1, 1, k)]
    options += [(a, k // a, 1) for a in range(2, k) if k % a == 0]
    c, h, w = b.draw(st.sampled_from(options))
    shape = b.const("shape", np.array([0, c, h, w], np.int64))
    out = b.node("Reshape", [x.name, shape])
    b.note(f"{b.nodes[-1].name}: Reshape {list(x.shape)} -> [N,{c},{h},{w}]")
    return _Tensor(out, (n, c, h, w))


def _transpose(b: _Builder, x: _Tensor) -> _Tensor:
    perm = [0] + list(b.draw(st.permutations([1, 2, 3])))
    out = b.node("Transpose", [x.name], perm=perm)
    b.note(f"{b.nodes[-1].name}: Transpose perm={perm}")
    return _Tensor(out, tuple(x.shape[p] for p in perm))


def _branch(b: _Builder, x: _Tensor) -> _Tensor:
    """A second path from ``x`` with the same shape, for Add/Concat."""
    kind = _pick(b.draw, [(3, "quant"), (2, "relu"), (2, "conv")] if len(x.shape) == 4 else [(3, "quant"), (2, "relu"), (2, "gemm")])
    if kind == "quant":
        return b.activation_quantizer(x)
    if kind == "relu":
        out = b.node("Relu", [x.name])
        b.note(f"{b.nodes[-1].name}: Relu (branch)")
        return _Tensor(out, x.shape)
    if kind == "conv":
        return _conv(b, x, unit=False, same_shape=True)
    n, k = x.shape
    weight, _ = b.weight((k, k), channel_axis=1, unit_friendly=False, act_scale=None)
    out = b.node("Gemm", [x.name, weight])
    b.note(f"{b.nodes[-1].name}: Gemm (branch) [{k},{k}]")
    return _Tensor(out, x.shape)


def _add(b: _Builder, x: _Tensor, pool: list[_Tensor]) -> _Tensor:
    same = [t for t in pool if t.shape == x.shape and t.name != x.name]
    if same and b.draw(st.booleans()):
        other = b.draw(st.sampled_from(same))
    elif b.draw(st.integers(0, 2)) == 0:
        # Add of a (possibly quantized) constant
        values = b.rng.normal(0, 1, size=x.shape[1:]).astype(F32)
        name = b.const("addend", values)
        other = _Tensor(name, x.shape[1:])
        if b.draw(st.booleans()):
            other = b.quant(other, role="weight", channel_axis=0 if len(other.shape) >= 1 else None)
    else:
        other = _branch(b, x)
    out = b.node("Add", [x.name, other.name] if b.draw(st.booleans()) else [other.name, x.name])
    b.note(f"{b.nodes[-1].name}: Add {x.name} + {other.name}")
    return _Tensor(out, x.shape)


def _concat(b: _Builder, x: _Tensor, pool: list[_Tensor]) -> _Tensor:
    def compatible(t: _Tensor) -> bool:
        return len(t.shape) == len(x.shape) and t.shape[0] == x.shape[0] and t.shape[2:] == x.shape[2:]

    others = [t for t in pool if compatible(t)]
    other = b.draw(st.sampled_from(others)) if others and b.draw(st.booleans()) else _branch(b, x)
    out = b.node("Concat", [x.name, other.name], axis=1)
    b.note(f"{b.nodes[-1].name}: Concat axis=1 {x.name} {other.name}")
    shape = list(x.shape)
    shape[1] += other.shape[1]
    return _Tensor(out, tuple(shape))


def _affine(b: _Builder, y: _Tensor) -> _Tensor:
    """Constant per-channel (or scalar) affine ops between a unit and its quantizer, as
    Brevitas's BatchNorm after each conv: negative and zero gammas and multipliers included."""
    channels = y.shape[1]
    per_channel = (channels, 1, 1) if len(y.shape) == 4 else (channels,)
    for _ in range(b.draw(st.integers(1, 2))):
        kind = _pick(b.draw, [(3, "bn"), (2, "mul"), (2, "add")])
        if kind == "bn":
            gamma = b.rng.normal(0, 1.5, channels).astype(F32)
            gamma[b.rng.random(channels) < 0.2] = 0.0
            params = [b.const(name, value.astype(F32)) for name, value in (
                ("bn_gamma", gamma), ("bn_beta", b.rng.normal(0, 0.5, channels)), ("bn_mean", b.rng.normal(0, 0.5, channels)),
                ("bn_var", b.rng.uniform(0.05, 2.0, channels)))]
            out = b.node("BatchNormalization", [y.name, *params], epsilon=float(b.draw(st.sampled_from([1e-5, 1e-3]))))
            b.note(f"{b.nodes[-1].name}: BatchNormalization gamma={_brief(gamma)}")
        else:
            shape = per_channel if b.draw(st.booleans()) else ()
            if kind == "mul":
                value = (b.rng.uniform(0.25, 4.0, shape) * b.rng.choice([-1.0, 1.0, 1.0, 0.0], shape)).astype(F32)
            else:
                value = b.rng.normal(0, 0.5, shape).astype(F32)
            out = b.node("Mul" if kind == "mul" else "Add", [y.name, b.const(kind, np.asarray(value, F32))])
            b.note(f"{b.nodes[-1].name}: {'Mul' if kind == 'mul' else 'Add'} {_brief(value)}")
        y = _Tensor(out, y.shape)
    return y


def _step(b: _Builder, x: _Tensor, pool: list[_Tensor]) -> _Tensor:
    """One random op after ``x``."""
    four_d = len(x.shape) == 4
    small = int(np.prod(x.shape)) <= 128
    if four_d:
        choices = [(5, "unit"), (3, "conv"), (2, "convT"), (3, "quant"), (2, "relu"), (2, "maxpool"), (2, "avgpool"),
                   (2, "add"), (2, "concat"), (1, "transpose"), (2, "reshape")]
    else:
        choices = [(5, "unit"), (3, "matmul"), (2, "gemm"), (3, "quant"), (2, "relu"), (2, "add"), (2, "concat"), (1, "reshape")]
    kind = _pick(b.draw, choices)
    if not small and kind in ("concat", "convT"):
        kind = "quant"
    if kind == "unit":
        # A Brevitas-style quantized unit: act Quant -> compute(Quant W, Quant b) -> [Relu] -> act Quant
        if x.from_quantizer is None or x.from_quantizer[0].size != 1:
            x = b.activation_quantizer(x, unit_friendly=True)
        y = _conv(b, x, unit=True) if four_d else (_matmul(b, x, unit=True) if b.draw(st.booleans()) else _gemm(b, x, unit=True))
        if b.draw(st.integers(0, 2)) == 0:
            y = _affine(b, y)
        if b.draw(st.booleans()):
            y = _Tensor(b.node("Relu", [y.name]), y.shape)
            b.note(f"{b.nodes[-1].name}: Relu")
        if b.draw(st.integers(0, 3)) == 0:  # per-channel output scales (MobileNet-style), often one zero point
            return b.quant(y, role="activation", channel_axis=1, unit_friendly=True)
        return b.activation_quantizer(y, unit_friendly=b.draw(st.booleans()))
    if kind == "conv":
        return _conv(b, x, unit=False)
    if kind == "convT":
        return _conv_transpose(b, x, unit=False)
    if kind == "matmul":
        return _matmul(b, x, unit=False)
    if kind == "gemm":
        return _gemm(b, x, unit=False)
    if kind == "quant":
        return b.activation_quantizer(x)
    if kind == "relu":
        out = b.node("Relu", [x.name])
        b.note(f"{b.nodes[-1].name}: Relu")
        return _Tensor(out, x.shape, x.from_quantizer)
    if kind in ("maxpool", "avgpool"):
        return _pool(b, x, "MaxPool" if kind == "maxpool" else "AveragePool")
    if kind == "add":
        return _add(b, x, pool)
    if kind == "concat":
        return _concat(b, x, pool)
    if kind == "transpose":
        return _transpose(b, x)
    return _reshape(b, x)


# ---- inputs -----------------------------------------------------------------------------


def _tie_inputs(b: _Builder, name: str, shape: tuple[int, ...]) -> list[dict[str, np.ndarray]] | None:
    """Inputs on exact rounding ties ((k + 0.5) * s) of the quantizer reading the input."""
    fq = b.first_quantizer
    if fq is None or fq["x"] != name:
        return None
    rng = b.rng
    scale = np.broadcast_to(np.asarray(fq["scale"], F32), shape)
    if fq["kind"] == "bipolar":
        x = rng.choice(np.array([0.0, -0.0, F32_TINY, -F32_TINY, 1.0, -1.0], F32), size=shape) * scale
        return [{name: x.astype(F32)}]
    q_min, q_max = fq["range"]
    zp = np.broadcast_to(np.asarray(fq["zp"], F32), shape)
    span = min(q_max - q_min, 2**12)
    lo = max(q_min, -(2**23)) - 2
    # offsets m such that t = x/s + zp = m + zp + 0.5 lands on ties inside and just outside the range
    m = rng.integers(lo, lo + span + 4, size=shape).astype(np.float64) - zp.astype(np.float64)
    if q_max - q_min > 2**12:
        m = rng.integers(-(2**10), 2**10, size=shape).astype(np.float64)
    ties = ((m + 0.5).astype(F32) * scale).astype(F32)
    exact = (np.round(m).astype(F32) * scale).astype(F32)
    batches = [{name: ties}, {name: np.where(rng.random(shape) < 0.5, ties, exact).astype(F32)}]
    if fq["kind"] == "trunc":
        # ties of the second rounding step: x/s at half a power-of-two step
        k = 2.0 ** rng.integers(0, 4, size=shape)
        batches.append({name: ((np.round(m) * k + k / 2).astype(F32) * scale).astype(F32)})
    return batches


# ---- the strategy -----------------------------------------------------------------------


@st.composite
def fuzz_cases(draw, max_steps: int = 6) -> FuzzCase:
    """A random valid QONNX model (see the module docstring)."""
    seed = draw(st.integers(0, 2**32 - 1))
    domain = draw(st.sampled_from(QONNX_DOMAINS))
    b = _Builder(draw, np.random.default_rng(seed), domain)
    four_d = draw(st.booleans())
    batch = draw(st.integers(1, 2))
    if four_d:
        shape = (batch, draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    else:
        shape = (batch, draw(st.integers(1, 8)))
    x = _Tensor("x", shape)
    b.note(f"input x {list(shape)}, domain {domain}")
    pool: list[_Tensor] = []
    if _pick(draw, [(5, True), (1, False)]):
        x = b.activation_quantizer(x, unit_friendly=draw(st.booleans()))
        pool.append(x)
    steps = draw(st.integers(1, max_steps))
    for _ in range(steps):
        x = _step(b, x, pool)
        pool.append(x)
    outputs = [x.name]
    if len(pool) > 2 and draw(st.integers(0, 3)) == 0:
        extra = draw(st.sampled_from(pool[:-1]))
        if extra.name not in outputs and extra.name != "x":
            outputs.append(extra.name)
    if draw(st.integers(0, 5)) == 0:  # exporters often leave node names empty
        for node in b.nodes:
            if b.rng.random() < 0.4:
                node.name = ""
        b.note("some node names left empty")
    opset = _pick(draw, [(4, 13), (2, 11), (2, 17), (2, 19), (2, 21)])
    symbolic_batch = draw(st.integers(0, 5)) == 0
    in_shape = ["N", *shape[1:]] if symbolic_batch else list(shape)
    graph = helper.make_graph(
        b.nodes, "fuzz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        b.inits,
    )
    qonnx_version = max(b.trunc_versions) if b.trunc_versions else draw(st.sampled_from([1, 2]))
    imports = [helper.make_opsetid("", opset)]
    declared = draw(st.integers(0, 7)) != 0  # sometimes the quantizer domain is missing from opset_import
    if declared:
        imports.append(helper.make_opsetid(domain, qonnx_version))
    model = helper.make_model(graph, opset_imports=imports, producer_name="qlower-fuzz")
    min_ir = {11: 6, 13: 7, 17: 8, 19: 9, 21: 10}[opset]
    model.ir_version = draw(st.integers(min_ir, 10))
    if declared and draw(st.booleans()):
        model = onnx.shape_inference.infer_shapes(model)
        b.note("with inferred shapes")
    convert_opset = _pick(draw, [(4, None), (1, 21)])
    b.note(f"opset {opset}, ir {model.ir_version}, outputs {outputs}, symbolic batch={symbolic_batch}")
    return FuzzCase(model, _tie_inputs(b, "x", shape), convert_opset, b.description)
