"""Transformer encoders: the attention MatMuls (q.kT and softmax.v) stay float.

Both operands are activations, so neither is quantized offline; static int8 needs a calibrated
range for the scores and puts the Softmax's probabilities on a [0, 1] uint8 grid (step 1/255:
every weight below 0.002 becomes 0, and a sharp attention row over a few keys is rounded). Run-time
quantization of an activation x activation MatMul has no fused kernel in onnxruntime
(DynamicQuantizeMatMul needs a constant B), so the choice is static or float.

Measured (held-out samples, min-max calibration, linear layers dynamic and residual Adds float by
``rules.encoder`` and ``rules.residual``): g2p-id's character BERT, whole-sequence agreement with
FP32 0.707 with the 4 attention MatMuls static, 0.871 with the 2 score MatMuls float, 0.918 with
all 4 float; all-MiniLM-L6-v2, embedding cosine 0.993 either way, at 2.24x vs 2.30x FP32 (batch 1,
1 thread, loaded host: within the noise). The attention MatMuls hold about 5% of an encoder's MACs
at these sequence lengths (MiniLM, 128 tokens: 2 x 12.6 M of 226 M per layer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx

from quantcli.static.plan import Rejection, SkipCode
from quantcli.static.rules._rule import Rule
from quantcli.static.rules.encoder import attention_context_matmuls, attention_score_matmuls

if TYPE_CHECKING:
    from quantcli.static.rules._context import PlanContext

__all__ = ["ATTENTION"]


def check_attention(ctx: PlanContext, node: onnx.NodeProto) -> Rejection | str:
    """Which attention product ``node`` is, or why it is none (passed on)."""
    if ctx.in_subgraph or any(ctx.index.is_constant(i) for i in node.input):
        return Rejection(SkipCode.NOT_APPLICABLE, "not an activation x activation MatMul at the top level")
    if node.name in attention_score_matmuls(ctx.index):
        return "attention scores (q.kT) before a Softmax"
    if node.name in attention_context_matmuls(ctx.index):
        return "attention context (softmax.v): probabilities on a uint8 grid lose every weight below 1/255"
    return Rejection(SkipCode.NOT_APPLICABLE, "no Softmax before or after it")


def apply_attention(ctx: PlanContext, node: onnx.NodeProto, detail: str) -> Rejection:
    """Keep the MatMul float; its readers read the float tensor."""
    ctx.float_compute.add(node.name)
    return Rejection(SkipCode.ATTENTION_FLOAT, detail)


ATTENTION: Rule[str] = Rule("attention", frozenset({"MatMul"}), check_attention, apply_attention, passes_on=True)
