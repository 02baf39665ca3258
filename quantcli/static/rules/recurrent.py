"""Recurrent layers: an LSTM becomes com.microsoft DynamicQuantizeLSTM.

Its weights W and R are int8 with one symmetric scale per gate row; the kernel quantizes the input
and the state on the fly, so no Q/DQ ever touches the state. It pays from hidden size
``LSTM_MIN_HIDDEN`` (benchmarks/bench_lstm.py, AVX2, 1 thread, one step: x1.06 at 128, x1.45 at
256, x2.6 at 512; 64 steps at 128: x2.1). The compute node feeding a recurrent cell stays float
(``quantcli.static.recurrent``, check ``recurrent-feed`` in ``rules.selection``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from quantcli.core.options import QuantDType
from quantcli.core.qmath import QuantizedTensor, QuantParams, quantize_weight
from quantcli.static.plan import RecurrentQuant, Rejection, SkipCode
from quantcli.static.rules._rule import Rule

if TYPE_CHECKING:
    from quantcli.static.rules._context import PlanContext

__all__ = ["LSTM", "LSTM_MIN_HIDDEN", "RECURRENT_OPS"]

#: recurrent layers with an integer kernel
RECURRENT_OPS = ("LSTM",)
#: DynamicQuantizeLSTM pays from this hidden size
LSTM_MIN_HIDDEN = 256


def check_lstm(ctx: PlanContext, node: onnx.NodeProto) -> Rejection | None:
    """None when the LSTM can run as DynamicQuantizeLSTM, else why not."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    w, r = node.input[1], node.input[2]
    if not (ctx.index.is_constant(w) and ctx.index.is_constant(r)):
        return Rejection(SkipCode.WEIGHT_NOT_CONSTANT, "W or R", w if not ctx.index.is_constant(w) else r)
    if attrs.get("layout", 0):
        return Rejection(SkipCode.UNSUPPORTED_ATTRIBUTE, "layout=1 is not supported by DynamicQuantizeLSTM")
    if ctx.config.weight_type != QuantDType.INT8:
        return Rejection(SkipCode.UNSUPPORTED_TYPE, "DynamicQuantizeLSTM takes int8 weights only")
    hidden = int(attrs.get("hidden_size", 0))
    if hidden < LSTM_MIN_HIDDEN:
        return Rejection(
            SkipCode.SLOW_INTEGER_KERNEL,
            f"float: no faster integer kernel at hidden size {hidden} (DynamicQuantizeLSTM pays from "
            f"{LSTM_MIN_HIDDEN}; measured x1.06 at 128)",
        )
    return None


def apply_lstm(ctx: PlanContext, node: onnx.NodeProto, _: None) -> None:
    """Int8 W and R in the kernel's layout."""
    w, r = node.input[1], node.input[2]
    ctx.recurrent.append(RecurrentQuant(node.name, _gate_rows(ctx, w), _gate_rows(ctx, r)))
    ctx.mark_quantized(node)


def _gate_rows(ctx: PlanContext, name: str) -> QuantizedTensor:
    """[dirs, 4H, n] float -> int8 [dirs, n, 4H] with one symmetric scale per gate row."""
    value = ctx.index.constant(name).astype(np.float32)
    dirs, rows, cols = value.shape
    q = quantize_weight(value.reshape(dirs * rows, cols), QuantDType.INT8, axis=0, reduce_range=ctx.config.reduce_range)
    params = QuantParams(
        scale=q.params.scale.reshape(dirs, rows),
        zero_point=q.params.zero_point.reshape(dirs, rows),
        dtype=QuantDType.INT8,
        axis=None,
    )
    return QuantizedTensor(q.values.reshape(dirs, rows, cols).transpose(0, 2, 1).copy(), params)


LSTM: Rule[None] = Rule("lstm", frozenset(RECURRENT_OPS), check_lstm, apply_lstm)
