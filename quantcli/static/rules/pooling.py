"""Pooling (MaxPool, AveragePool, GlobalAveragePool): float only when its float island is measured faster here.

onnxruntime runs a pool between quantized tensors on uint8 (``MaxPool``), or as
``QLinearAveragePool`` / ``QLinearGlobalAveragePool``. Some of these kernels lose badly to float:
profiled on the PP-OCR direction classifier (AMD EPYC, AVX512-VNNI, onnxruntime 1.32, 1 thread),
its head MaxPool took 118 us on uint8 against 14 us in the float model; a 3x3 AveragePool at
128x128 measured 0.12x float. A pool is only float, though, when its neighbours are: onnxruntime
moves a DequantizeLinear before a MaxPool past it and a QuantizeLinear after it before it, and runs
the "float" MaxPool on uint8 anyway. The float island is therefore the pool with its producer
(which leaves its output float: ``reads_float_compute``) and, for a MaxPool, float readers.

The rule asks the plan's ``SpeedOracle`` about ``KernelKind.MAX_POOL_ISLAND``,
``AVERAGE_POOL_ISLAND`` or ``GLOBAL_POOL_ISLAND`` (``quantcli.verify.kernel_speed``, cached per
host): the integer pool against ``DQ -> Relu -> Pool [-> Relu] -> Q``. Candidates, decided before
any node is planned (``slow_pooling``, called by ``quantcli.static.planning``), are pools

* whose input is written by a node that is no Conv/MatMul/Gemm (those quantize their output
  whatever reads it) and read by the pool alone (a float tensor read elsewhere would cost its
  other readers a QuantizeLinear);
* for a MaxPool, whose every reader is an AveragePool or GlobalAveragePool (a pool's float output
  then runs float too: the head ``MaxPool -> GlobalAveragePool -> Reshape -> MatMul``);

and measured ``ratio < 1 - POOL_MARGIN``. At its turn the pool stays float
(``SkipCode.SLOW_POOLING``, the ratio in the detail) if its input did arrive float; a producer that
quantized its output anyway hands the pool on to the next rule (integer). ``ConstantSpeedOracle``
answers 1.0: integer, so the tests' plans and golden hashes do not depend on this host.
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

__all__ = ["POOLING", "POOLING_OPS", "POOL_MARGIN", "pool_shape", "slow_pooling"]

#: the pool stays float only when the integer form runs below ``1 - POOL_MARGIN`` times its float island
POOL_MARGIN = 0.1
_KINDS = {
    "MaxPool": KernelKind.MAX_POOL_ISLAND,
    "AveragePool": KernelKind.AVERAGE_POOL_ISLAND,
    "GlobalAveragePool": KernelKind.GLOBAL_POOL_ISLAND,
}
POOLING_OPS = tuple(_KINDS)
_QUANTIZING_PRODUCERS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
_FLOAT_MAXPOOL_READERS = frozenset({"AveragePool", "GlobalAveragePool"})


def _dim(value: object) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def pool_shape(ctx: PlanContext, node: onnx.NodeProto) -> KernelShape | None:
    """The island shape of a 2-D pool at batch 1 (None: no pool, or its channels are unknown)."""
    kind = _KINDS.get(node.op_type)
    shape = ctx.index.shapes.get(node.input[0], ()) if node.input else ()
    if kind is None or len(shape) != 4 or _dim(shape[1]) == 0:
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    kernel = list(attrs.get("kernel_shape", [0, 0]))
    if len(kernel) != 2:
        return None
    strides = [int(s) for s in attrs.get("strides", [1, 1])] or [1]
    c, sides = _dim(shape[1]), (_dim(shape[2]), _dim(shape[3]))
    return KernelShape(kind, (c, c, int(kernel[0]), int(kernel[1]), strides[0], *sides), strides[-1])


def _structure(ctx: PlanContext, node: onnx.NodeProto) -> Rejection | KernelShape:
    """The pool's island shape, or why it cannot become a float island."""
    shape = pool_shape(ctx, node)
    if shape is None or ctx.in_subgraph or len([o for o in node.output if o]) != 1:
        return Rejection(SkipCode.NOT_APPLICABLE, "not a 2-D pool of known channels with one output", node.input[0])
    x = node.input[0]
    producer = ctx.index.producers.get(x)
    if producer is None or producer.op_type in _QUANTIZING_PRODUCERS:
        what = f"the {producer.op_type} '{producer.name}'" if producer is not None else "a graph input"
        return Rejection(SkipCode.NOT_APPLICABLE, f"reads {what}, whose output is quantized anyway", x)
    if len(ctx.index.consumers_of(x)) != 1:
        return Rejection(SkipCode.NOT_APPLICABLE, "its input has other readers", x)
    readers = ctx.index.consumers_of(node.output[0])
    if node.op_type == "MaxPool" and any(r.op_type not in _FLOAT_MAXPOOL_READERS for r in readers):
        return Rejection(SkipCode.NOT_APPLICABLE, "a float MaxPool needs pooling readers", node.output[0])
    return shape


def _island_speed(ctx: PlanContext, node: onnx.NodeProto) -> Rejection | KernelSpeed:
    """The measured island speed of ``node``, or why it is no candidate."""
    shape = _structure(ctx, node)
    if isinstance(shape, Rejection):
        return shape
    speed = ctx.speed.speed(shape)
    if speed is None:
        return Rejection(SkipCode.NOT_APPLICABLE, "pool speed unknown on this host: kept integer", node.input[0])
    return speed


def slow_pooling(ctx: PlanContext, graph: onnx.GraphProto) -> set[str]:
    """Pools whose float island is measured faster than their integer form (kept float)."""
    return measured_slow(ctx, graph, POOLING.name, frozenset(_KINDS), _island_speed, POOL_MARGIN)


def check_pooling(ctx: PlanContext, node: onnx.NodeProto) -> Rejection | str:
    """The slow pool's description with its measured island speed, or why it stays integer."""
    speed = _island_speed(ctx, node)
    if isinstance(speed, Rejection):
        return speed
    measured = speed.describe(f"integer {node.op_type}")
    if node.name not in ctx.float_compute or not speed.slower(POOL_MARGIN):
        return Rejection(SkipCode.MEASURED_NOT_SLOWER, f"{measured} (float island, transitions included): kept integer")
    if ctx.is_quantized(node.input[0]):
        return Rejection(SkipCode.NOT_APPLICABLE, f"{measured}, but its input arrives quantized", node.input[0])
    return f"{measured} (its float island, transitions included)"


def apply_pooling(ctx: PlanContext, node: onnx.NodeProto, description: str) -> Rejection:
    """Keep the pool float (its producer and readers were planned around it)."""
    return Rejection(SkipCode.SLOW_POOLING, description)


POOLING: Rule[str] = Rule("pooling", frozenset(POOLING_OPS), check_pooling, apply_pooling, passes_on=True)
