"""Multiply-accumulates (MACs) of the compute nodes of a model, for one sample (batch 1).

With ``Y`` the node's output and ``W`` its weight:

* Conv (and QLinearConv, ConvInteger): every output element sums over C/group input channels times
  the kernel window, so ``MACs = |Y| * prod(W.shape[1:])`` (``W`` is ``[M, C/group, k1, k2, ...]``).
* ConvTranspose: every input element is scattered through ``M/group`` kernel windows, so
  ``MACs = |X| * prod(W.shape[1:])`` (``W`` is ``[C, M/group, k1, k2, ...]``).
* MatMul (and QLinearMatMul, MatMulInteger, MatMulIntegerToFloat): ``MACs = |Y| * K`` with ``K`` the
  last axis of ``A``.
* Gemm (and QGemm): ``MACs = M * N * K = |Y| * K`` with ``K = A.shape[0]`` if transA else ``A.shape[1]``.

Shapes come from ONNX shape inference after fixing every symbolic batch axis to 1. When other
symbolic axes remain (an image model with dynamic height and width), a sample ``feed`` resolves them:
the model runs once in onnxruntime, without graph optimizations, with the needed tensors exposed as
outputs, and the observed shapes are used (for one sample of the feed).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from math import prod

import numpy as np
import onnx

from quantcli.graph.editor import ModelEditor
from quantcli.graph.model_io import infer_shapes
from quantcli.graph.session import make_session

__all__ = ["CONV_LIKE", "GEMM_LIKE", "MATMUL_LIKE", "compute_macs", "node_operands"]

log = logging.getLogger(__name__)

#: op type -> (data input index, weight input index); MACs follow the Conv formula
CONV_LIKE = {"Conv": (0, 1), "QLinearConv": (0, 3), "ConvInteger": (0, 1), "ConvTranspose": (0, 1)}
MATMUL_LIKE = {
    "MatMul": (0, 1), "QLinearMatMul": (0, 3), "MatMulInteger": (0, 1), "MatMulIntegerToFloat": (0, 1),
    "DynamicQuantizeMatMul": (0, 1), "FusedMatMul": (0, 1),
}  # fmt: skip
GEMM_LIKE = {"Gemm": (0, 1), "QGemm": (0, 3)}


def node_operands(node: onnx.NodeProto) -> tuple[str, str] | None:
    """Names of the data and weight inputs of a compute node, or None for other ops."""
    for table in (CONV_LIKE, MATMUL_LIKE, GEMM_LIKE):
        if node.op_type in table:
            a, w = table[node.op_type]
            if len(node.input) > w:
                return node.input[a], node.input[w]
    return None


def _macs(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    operands = node_operands(node)
    if operands is None or not node.output:
        return None
    a, w = (shapes.get(name) for name in operands)
    y = shapes.get(node.output[0])
    if node.op_type == "ConvTranspose":
        return prod(a) * prod(w[1:]) if a is not None and w is not None else None
    if node.op_type in CONV_LIKE:
        return prod(y) * prod(w[1:]) if y is not None and w is not None else None
    if a is None or y is None or not a:
        return None
    if node.op_type in GEMM_LIKE:
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        return prod(y) * a[0 if trans_a else -1]
    return prod(y) * a[-1]


def _concrete(vi: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    dims = vi.type.tensor_type.shape.dim
    if all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
        return tuple(d.dim_value for d in dims)
    return None


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Shapes from ONNX inference with each symbolic batch axis (axis 0 of an input) set to 1."""
    editor = ModelEditor(model)
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and not (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            editor.graph.set_input_dim(vi.name, 0, 1)
    editor.graph.clear_value_info()
    inferred, _ = infer_shapes(editor.build())
    shapes = {t.name: tuple(t.dims) for t in inferred.graph.initializer}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        shape = _concrete(vi)
        if shape is not None:
            shapes.setdefault(vi.name, shape)
    return shapes


def _observed_shapes(
    model: onnx.ModelProto, names: list[str], feed: Mapping[str, np.ndarray]
) -> dict[str, tuple[int, ...]]:
    """Shapes of ``names`` seen when the model runs once on the first sample of ``feed``."""
    fixed_batch = {
        vi.name for vi in model.graph.input
        if vi.type.tensor_type.shape.dim and vi.type.tensor_type.shape.dim[0].dim_value > 0
    }  # fmt: skip
    one = {k: np.asarray(v) if k in fixed_batch else np.asarray(v)[:1] for k, v in feed.items()}
    try:
        values = make_session(model, optimize=False, outputs=names).run(names, one)
    except Exception as exc:  # the counts are a report, never a reason to fail
        log.info("could not run the model to observe shapes: %s", exc)
        return {}
    return {name: tuple(int(d) for d in np.shape(v)) for name, v in zip(names, values, strict=True)}


def compute_macs(model: onnx.ModelProto, *, feed: Mapping[str, np.ndarray] | None = None) -> dict[int, int | None]:
    """MACs per sample of each compute node, keyed by the node's index in ``model.graph.node``.

    A node whose shapes stay unknown (symbolic axes and no ``feed``) maps to None.
    """
    compute = [(i, n) for i, n in enumerate(model.graph.node) if node_operands(n) is not None]
    if not compute:
        return {}
    shapes = _inferred_shapes(model)
    result = {i: _macs(n, shapes) for i, n in compute}
    unknown = [n for i, n in compute if result[i] is None]
    missing = sorted({name for n in unknown for name in [*(node_operands(n) or ()), n.output[0]]})
    if missing and feed:
        needed = [name for name in missing if name not in shapes]
        shapes.update(_observed_shapes(model, needed, feed))
        result = {i: _macs(n, shapes) for i, n in compute}
    return result
