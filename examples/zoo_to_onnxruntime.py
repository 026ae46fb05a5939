"""A QONNX model -> qlower -> ONNX Runtime, in a dozen lines of API.

    python examples/zoo_to_onnxruntime.py [MODEL.onnx] [--to qcdq|qop]

Lowers the model (examples/tfc_2w2a.onnx, a FINN zoo TFC-2W2A MLP, by default), which
also verifies it against the QONNX reference, saves it, runs it in ONNX Runtime with
all optimizations on, and prints the predicted class of a random input. Needs only qlower.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

import qlower

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, default=HERE / "tfc_2w2a.onnx")
    parser.add_argument("--to", default="qop", choices=["qcdq", "qop"])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        lowered_path = Path(scratch) / f"{args.model.stem}.{args.to}.onnx"
        result = qlower.convert(args.model, to=args.to, output_path=lowered_path, batches=8)
        verification = result.report.verification
        assert verification is not None and verification.passed  # convert raises otherwise
        print(f"{args.model.name}: {len(result.report.quantizers)} quantizers lowered to --to {args.to}, verified on "
              f"{verification.batches} batches")

        session = ort.InferenceSession(str(lowered_path), providers=["CPUExecutionProvider"])
        (model_input,) = session.get_inputs()
        shape = [d if isinstance(d, int) else 1 for d in model_input.shape]
        # The zoo TFC models take an MNIST image with values in [-1, 1].
        image = np.random.default_rng(0).uniform(-1.0, 1.0, size=shape).astype(np.float32)
        (scores,) = session.run(None, {model_input.name: image})
        scores = scores.reshape(scores.shape[0], -1)
        print(f"ONNX Runtime: predicted class {np.argmax(scores, axis=1).tolist()}, scores {np.array2string(scores[0], precision=3)}")


if __name__ == "__main__":
    main()
