"""``--to qop``: a Relu before a QuantizeLinear whose zero point is its container's minimum is
the QuantizeLinear's own saturation, so units left float (a conv on the float image) drop it."""

from __future__ import annotations

import numpy as np
import pytest

import test_qop as qop


def float_input_unit(y_signed: int, y_zero_point: float) -> qop.onnx.ModelProto:
    """Float image -> Conv(quantized W) -> Relu -> Quant(y): the unit stays float (its input is not quantized)."""
    rng = np.random.default_rng(2)
    b = qop.UnitBuilder()
    w = b.quant("qw", b.const("W", (rng.integers(-7, 8, (4, 3, 3, 3)) * 0.05).astype(np.float32)), 0.05, 0.0, 4, narrow=1)
    y = b.node("Relu", [b.node("Conv", ["x", w], "compute")], "relu")
    return b.model((2, 3, 6, 6), b.quant("qy", y, np.float32(0.03), y_zero_point, 8, signed=y_signed))


@pytest.mark.parametrize("y_signed, y_zero_point, dropped", [(0, 0.0, True), (0, 3.0, False), (1, 0.0, False)],
                         ids=["uint8_zp0", "uint8_zp3", "int8_zp0"])
def test_relu_before_a_saturating_quantizer_is_dropped(y_signed: int, y_zero_point: float, dropped: bool) -> None:
    result = qop.convert_qop(float_input_unit(y_signed, y_zero_point))
    assert bool(qop.nodes_of(result.model, "Relu")) is not dropped
    records = [u for u in result.report.unit_records if u["pass"] == "saturated_relu"]
    assert len(records) == int(dropped)
    assert all(row.max_lsb_diff == 0 for row in result.report.verification.outputs)
