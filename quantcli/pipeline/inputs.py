"""The input model's preconditions: not already quantized, finite weights, an opset quantcli can use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from quantcli.core.errors import UnsupportedModelError
from quantcli.graph.model_io import model_opset, tensor_array
from quantcli.graph.model_io import upgrade_opset as upgrade_opset_to

__all__ = ["MIN_OPSET", "opset_note", "prepare_input"]

_QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "DynamicQuantizeLinear",
    "QGemm",
    "QLinearAdd",
    "MatMulNBits",
}
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: per-channel QuantizeLinear/DequantizeLinear
MIN_OPSET = 13


def prepare_input(
    model: onnx.ModelProto, path: Path, *, upgrade_opset: bool, min_opset: int = MIN_OPSET
) -> onnx.ModelProto:
    """Refuse models quantcli must not quantize; upgrade an opset older than ``min_opset`` in memory
    (the default), or refuse it when ``upgrade_opset`` is False. ``opset_note`` says what was done."""
    _refuse_quantized(model, path)
    _refuse_damaged_weights(model, path)
    opset = model_opset(model)
    if opset >= min_opset:
        return model
    if not upgrade_opset:
        what = {MIN_OPSET: "per-channel QuantizeLinear/DequantizeLinear", 21: "16-bit and 4-bit Q/DQ"}.get(
            min_opset, "this mode"
        )
        raise UnsupportedModelError(
            f"{path}: opset {opset} is too old for {what} (needs >= {min_opset}); onnx's version converter "
            "upgrades it in memory unless $upgrade_opset is off",
            options=("upgrade_opset",),
        )
    try:
        return upgrade_opset_to(model, max(min_opset, MIN_OPSET))
    except Exception as exc:
        first = " ".join(str(exc).split())[:200]
        raise UnsupportedModelError(f"{path}: onnx's version converter cannot upgrade opset {opset}: {first}") from exc


def opset_note(original: onnx.ModelProto, prepared: onnx.ModelProto) -> str | None:
    """One line saying the opset was upgraded in memory (None when it was not)."""
    before, after = model_opset(original), model_opset(prepared)
    if before == after:
        return None
    return f"opset {before} upgraded to {after} in memory by onnx's version converter (the input file is unchanged)"


def _refuse_quantized(model: onnx.ModelProto, path: Path) -> None:
    found = sorted({n.op_type for n in model.graph.node if n.op_type in _QUANTIZED_OPS})
    if found:
        raise UnsupportedModelError(
            f"{path}: model is already quantized (contains {', '.join(found)}); give quantcli the FP32 model"
        )


def _refuse_damaged_weights(model: onnx.ModelProto, path: Path) -> None:
    weights = {name for node in model.graph.node if node.op_type in _WEIGHTED_OPS for name in node.input[1:3]}
    for init in model.graph.initializer:
        try:
            values = tensor_array(init)  # one weight at a time, read from its file if it was left there
        except Exception as exc:
            raise UnsupportedModelError(
                f"{path}: initializer '{init.name}' is malformed (its data does not fit its shape {list(init.dims)})"
            ) from exc
        # +-inf constants are legitimate elsewhere (masks, Clip bounds); in a weight they are damage
        if init.name in weights and values.dtype.kind == "f" and not np.all(np.isfinite(values)):
            raise UnsupportedModelError(
                f"{path}: weight '{init.name}' holds NaN or infinite values; the model is damaged"
            )
