"""Tensors summarized inside the graph: each becomes a 4-value output, not its values (min-max calibration).

For a float tensor ``t`` the copy gains the output ``[min(t), max(t), nans(t), size(t)]`` (float64,
shape [4]; min and max of the values that are not NaN, ``nans`` the count of NaN values) computed by
onnxruntime in the same run::

    flat = Reshape(t, [-1]);  isnan = IsNaN(flat)
    lo = ReduceMin(Where(isnan, +inf, flat));  hi = ReduceMax(Where(isnan, -inf, flat))   (shape [1] each)
    nans = Cast<double>(ReduceSum(Cast<int64>(isnan)))
    summary = Concat(Cast<double>(Concat(lo, hi)), nans, Cast<double>(Shape(flat)))

so a batch returns 32 bytes a tensor instead of the tensor, and onnxruntime frees each activation as
soon as its last reader ran (an exposed output lives until the run returns). float32 -> float64 is
exact, and so is the element count below 2**53.

Why ``Where``: calibration leaves NaN values out one by one (``quantcli.stats.observers``), and
onnxruntime's ReduceMin/ReduceMax return NaN or not depending on where in the tensor the NaN is, so
NaN values are replaced by the reduction's identity first; the count lets the observer count them
as it counts them from the values (``MinMaxObserver.fold``). An empty or all-NaN tensor reduces to
``[+inf, -inf]`` with no value left, which the observer drops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from quantcli.graph.editor import GraphEditor, ModelEditor, make_node
from quantcli.graph.model_io import above_protobuf_limit

__all__ = ["MIN_SUMMARY_OPSET", "SummarizedModel", "summarize_min_max"]

#: the default-domain opset from which every op used is available (IsNaN: 9)
MIN_SUMMARY_OPSET = 9


@dataclass(frozen=True, slots=True)
class SummarizedModel:
    """A copy of a model with one summary output per tensor asked for.

    Attributes:
        model: the copy.
        outputs: tensor name -> name of its ``[min, max, nans, size]`` output (float64, shape [4]).
    """

    model: onnx.ModelProto
    outputs: dict[str, str]


def _default_opset(model: onnx.ModelProto) -> int:
    return max((imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx")), default=0)


def summarize_min_max(model: onnx.ModelProto, tensors: Sequence[str]) -> SummarizedModel | None:
    """A copy of ``model`` (not modified) returning a min/max summary of each main-graph tensor of ``tensors``.

    None when the graph cannot carry the reduction: a default-domain opset below 9, or a model above
    protobuf's 2 GB (its copy is a skeleton made elsewhere); the caller then exposes the values.
    """
    if _default_opset(model) < MIN_SUMMARY_OPSET or above_protobuf_limit(model):
        return None
    editor = ModelEditor(model)
    graph = editor.graph
    producers = {o: node for node in graph.nodes for o in node.output if o}
    flat_shape = graph.add_initializer("summary_flat_shape", np.array([-1], dtype=np.int64))
    plus_inf = graph.add_initializer("summary_plus_inf", np.array(np.inf, dtype=np.float32))
    minus_inf = graph.add_initializer("summary_minus_inf", np.array(-np.inf, dtype=np.float32))
    outputs: dict[str, str] = {}
    for tensor in tensors:
        outputs[tensor], nodes = _summary(graph, tensor, flat_shape, (plus_inf, minus_inf))
        # right after the producer: onnxruntime runs nodes in this order, and a summary placed at the
        # end of the graph would keep every activation alive until then (measured: digits CNN, batch
        # 32, 41 MB above the plain model's run at the end, 3 MB after each producer)
        if tensor in producers:
            graph.insert_after(producers[tensor], nodes)
        else:
            graph.prepend(nodes)
        graph.add_output(outputs[tensor], onnx.TensorProto.DOUBLE)
    return SummarizedModel(editor.build(), outputs)


def _summary(
    graph: GraphEditor, tensor: str, flat_shape: str, infinities: tuple[str, str]
) -> tuple[str, list[onnx.NodeProto]]:
    """The nodes summarizing ``tensor``, and the summary's name."""
    new = graph.names.new
    plus_inf, minus_inf = infinities
    flat, isnan = new(f"{tensor}_flat"), new(f"{tensor}_isnan")
    for_min, for_max = new(f"{tensor}_nan_as_plus_inf"), new(f"{tensor}_nan_as_minus_inf")
    lo, hi = new(f"{tensor}_min"), new(f"{tensor}_max")
    nan_int, nans, nans64 = new(f"{tensor}_isnan_i64"), new(f"{tensor}_nans"), new(f"{tensor}_nans_f64")
    stats, stats64 = new(f"{tensor}_min_max"), new(f"{tensor}_min_max_f64")
    shape, size = new(f"{tensor}_size"), new(f"{tensor}_size_f64")
    out = new(f"{tensor}_summary")
    double, int64 = onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64
    nodes = [
        make_node("Reshape", [tensor, flat_shape], [flat], name=new(f"{flat}_Reshape")),
        make_node("IsNaN", [flat], [isnan], name=new(f"{isnan}_IsNaN")),
        make_node("Where", [isnan, plus_inf, flat], [for_min], name=new(f"{for_min}_Where")),
        make_node("ReduceMin", [for_min], [lo], name=new(f"{lo}_ReduceMin"), attrs={"keepdims": 1}),
        make_node("Where", [isnan, minus_inf, flat], [for_max], name=new(f"{for_max}_Where")),
        make_node("ReduceMax", [for_max], [hi], name=new(f"{hi}_ReduceMax"), attrs={"keepdims": 1}),
        make_node("Cast", [isnan], [nan_int], name=new(f"{nan_int}_Cast"), attrs={"to": int64}),
        make_node("ReduceSum", [nan_int], [nans], name=new(f"{nans}_ReduceSum"), attrs={"keepdims": 1}),
        make_node("Cast", [nans], [nans64], name=new(f"{nans64}_Cast"), attrs={"to": double}),
        make_node("Concat", [lo, hi], [stats], name=new(f"{stats}_Concat"), attrs={"axis": 0}),
        make_node("Cast", [stats], [stats64], name=new(f"{stats64}_Cast"), attrs={"to": double}),
        make_node("Shape", [flat], [shape], name=new(f"{shape}_Shape")),
        make_node("Cast", [shape], [size], name=new(f"{size}_Cast"), attrs={"to": double}),
        make_node("Concat", [stats64, nans64, size], [out], name=new(f"{out}_Concat"), attrs={"axis": 0}),
    ]
    return out, nodes
