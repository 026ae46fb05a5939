"""Last resort for quantizers on constants: evaluate them now into a float initializer.

    Q(W, ...) -> W_q = reference(Q)(W)   (an exact float32 constant)

Only reached when ``fold_constant_quantizer`` cannot store the values in an integer
container (a Trunc on a constant, scales varying along several axes, a non-integer zero
point). The values come from the reference semantics, so they are exact by construction.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..analysis import Quantizer
from ..reference import evaluate_qonnx_node
from ..ir import replace_tensor
from .base import LoweringContext, QuantizerPass


class FoldConstantToFloat(QuantizerPass):
    name = "fold_constant_float"
    matches = "any quantizer whose inputs are all constant"
    emits = "float32 initializer holding the quantized values"

    def applies_to(self, q: Quantizer) -> bool:
        return q.is_constant_input and all(isinstance(t, gs.Constant) for t in q.node.inputs)

    def rewrite(self, q: Quantizer, ctx: LoweringContext) -> str:
        inputs = [np.asarray(t.values) for t in q.node.inputs]
        value = np.asarray(evaluate_qonnx_node(q.op, inputs, dict(q.node.attrs)), dtype=np.float32)
        out = q.output
        folded = gs.Constant(out.name, value)
        replace_tensor(ctx.graph, out, folded)
        return f"float32 constant {tuple(value.shape)}"
