"""An export pipeline: Brevitas model -> export_qonnx -> qlower.convert -> ONNX Runtime.

    pip install torch brevitas      # qlower itself needs neither
    python examples/brevitas_export_pipeline.py [--to qcdq|qop] [--out DIR]

Builds a small quantized CNN (4-bit weights and activations, 8-bit input and output),
calibrates it on random data, exports it with Brevitas's ``export_qonnx``, lowers it with
``qlower.convert`` (which verifies the result against the QONNX reference and writes it
only if it holds) and runs the lowered model in ONNX Runtime next to the Brevitas model
itself: with ``--to qcdq`` the two agree to float rounding; with ``--to qop`` within one
output step (see the README's verification contract).
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import brevitas.nn as qnn
import numpy as np
import onnxruntime as ort
import torch
from brevitas.export import export_qonnx
from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerTensorFloat, Int32Bias, Uint8ActPerTensorFloat
from torch import nn

import qlower


class SmallQuantCNN(nn.Module):
    """Conv(4w4a) -> ReLU -> Conv(4w4a) -> ReLU -> pool -> Linear(8-bit out)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=True)
        self.conv1 = qnn.QuantConv2d(3, 8, 3, padding=1, weight_quant=Int8WeightPerTensorFloat, weight_bit_width=4,
                                     bias=True, bias_quant=Int32Bias, return_quant_tensor=True)
        self.relu1 = qnn.QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=4, return_quant_tensor=True)
        self.conv2 = qnn.QuantConv2d(8, 8, 3, padding=1, weight_quant=Int8WeightPerTensorFloat, weight_bit_width=4,
                                     bias=True, bias_quant=Int32Bias, return_quant_tensor=True)
        self.relu2 = qnn.QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=4, return_quant_tensor=True)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = qnn.QuantLinear(8, 10, bias=True, weight_quant=Int8WeightPerTensorFloat, bias_quant=Int32Bias,
                                  return_quant_tensor=False)
        self.out = qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(self.inp(x)))
        x = self.relu2(self.conv2(x))
        return self.out(self.fc(torch.flatten(self.pool(x), 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--to", default="qop", choices=["qcdq", "qop"])
    parser.add_argument("--out", type=Path, default=None, help="Keep the exported and lowered models here.")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = SmallQuantCNN()
    model.train()
    with torch.no_grad():  # calibrate the activation scales
        for _ in range(8):
            model(torch.rand(4, 3, 16, 16))
    model.eval()
    example = torch.rand(2, 3, 16, 16)

    with tempfile.TemporaryDirectory(prefix="qlower-brevitas-") as scratch:
        out_dir = args.out or Path(scratch)
        out_dir.mkdir(parents=True, exist_ok=True)
        export_and_run(model, example, out_dir, args.to)


def export_and_run(model: SmallQuantCNN, example: torch.Tensor, out_dir: Path, to: str) -> None:
    qonnx_path = out_dir / "small_cnn.qonnx.onnx"
    lowered_path = out_dir / f"small_cnn.{to}.onnx"
    export_qonnx(model, args=example, export_path=str(qonnx_path), dynamo=False)

    result = qlower.convert(qonnx_path, to=to, output_path=lowered_path)
    report = result.report
    integer_ops = Counter(n.op_type for n in result.model.graph.node if n.op_type in ("QLinearConv", "QLinearMatMul", "MatMulInteger"))
    print(f"exported {qonnx_path.name}: {len(report.quantizers)} quantizers; lowered to {lowered_path.name} "
          f"(--to {to}, integer operators: {dict(integer_ops) or 'none'}) and verified")

    session = ort.InferenceSession(str(lowered_path), providers=["CPUExecutionProvider"])
    (ort_out,) = session.run(None, {session.get_inputs()[0].name: example.numpy()})
    with torch.no_grad():
        torch_out = model(example).numpy()
    step = float(model.out.act_quant.scale())
    difference = float(np.max(np.abs(ort_out - torch_out)))
    print(f"ONNX Runtime vs Brevitas: max |diff| {difference:.3g} = {difference / step:.3g} output steps")
    # qcdq reproduces Brevitas up to float rounding; qop's integer requantization may move
    # a value that lies at a rounding tie by one step.
    assert difference <= step * (1.0 if to == "qop" else 1e-3), difference


if __name__ == "__main__":
    main()
