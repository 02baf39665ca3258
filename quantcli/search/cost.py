"""What a candidate costs at batch 1: each compute node's MACs, weighted by how fast its form runs on this host.

A Conv/MatMul/Gemm runs in one of three forms: float, static integer (QDQ: QLinearConv,
QLinearMatMul, QGemm, MatMulIntegerToFloat) or, for a MatMul/Gemm with a constant weight, run-time
activation quantization (DynamicQuantizeMatMul). Its cost per sample is

    cost(node, form) = MACs(node) / speed(form)        speed(float) = 1

with ``speed(form) = t_float / t_form`` of the node's kernel shape measured on this host by the
``SpeedOracle`` (``quantcli.verify.kernel_speed``: static MatMul, dynamic MatMul and depthwise Conv
shapes; a Conv other than depthwise is timed as the GEMM it runs as, im2col rows x (c_in/group * kh * kw)
x c_out). ``constant_costs`` is the objective before it was measured, float MACs at ``FLOAT_MAC_COST``,
integer ones at ``INTEGER_MAC_COST`` and run-time quantized ones at ``DYNAMIC_MAC_COST``: the same
ranking on every host (the tests use it, so the search's answers and hashes do not depend on the CPU).

The cost only ranks candidates; the search confirms the ranking of the cheapest few by timing them
(``quantcli.search.confirm``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import onnx

from quantcli.core.host import ConstantSpeedOracle, KernelKind, KernelShape, SpeedOracle
from quantcli.graph.index import GraphIndex
from quantcli.static.rules.dynamic import dynamic_problem

__all__ = [
    "DYNAMIC_MAC_COST",
    "FLOAT_MAC_COST",
    "INTEGER_MAC_COST",
    "CostTable",
    "NodeCosts",
    "as_cost_table",
    "candidate_cost",
    "constant_costs",
    "cost_table",
    "host_costs",
]

#: relative cost of a multiply-accumulate in float, in a static integer kernel and with run-time activation
#: quantization, when nothing was measured (AVX2 figures of the first sessions: int8 about 4x float)
FLOAT_MAC_COST = 4.0
INTEGER_MAC_COST = 1.0
DYNAMIC_MAC_COST = 2.0
#: speeds are clamped to this range: a measurement outside it is noise or a broken kernel
_SPEED_RANGE = (0.1, 10.0)


@dataclass(frozen=True, slots=True)
class NodeCosts:
    """The per-sample cost of one compute node in each form (``dynamic`` None: the form is not possible)."""

    in_float: float
    integer: float
    dynamic: float | None = None
    #: where the figures come from, for the report (``constant``, ``on this host``)
    source: str = "constant"


CostTable = Mapping[str, NodeCosts]


def constant_costs(macs: Mapping[str, int | None]) -> dict[str, NodeCosts]:
    """The fixed 4:2:1 float:dynamic:integer objective (a node of unknown MACs counts 1)."""
    table = {}
    for name, m in macs.items():
        n = float(m if m is not None else 1)
        table[name] = NodeCosts(n * FLOAT_MAC_COST, n * INTEGER_MAC_COST, n * DYNAMIC_MAC_COST)
    return table


def as_cost_table(costs: Mapping[str, int | None] | CostTable) -> CostTable:
    """A cost table as given, or the constant one of a MAC map."""
    if all(isinstance(v, NodeCosts) for v in costs.values()):
        return costs  # type: ignore[return-value]
    return constant_costs(costs)  # type: ignore[arg-type]


def candidate_cost(float_nodes: tuple[str, ...], dynamic_nodes: tuple[str, ...], table: CostTable) -> float:
    """Per-sample cost of a model with ``float_nodes`` in float and ``dynamic_nodes`` run-time quantized."""
    floats, dynamic = set(float_nodes), set(dynamic_nodes)
    total = 0.0
    for name, c in table.items():
        if name in floats:
            total += c.in_float
        elif name in dynamic and c.dynamic is not None:
            total += c.dynamic
        else:
            total += c.integer
    return total


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name == name), default)


def _shapes(index: GraphIndex, node: onnx.NodeProto, macs: int) -> tuple[KernelShape, KernelShape | None] | None:
    """The kernel shape of ``node``'s static form, and of its dynamic form (None: not possible); None if unknown."""
    if len(node.input) < 2 or not index.is_constant(node.input[1]):
        return None
    w = index.constant(node.input[1])
    if node.op_type == "Conv" and w.ndim >= 3:
        c_out, c_in_g = int(w.shape[0]), int(w.shape[1])
        kh, kw = int(w.shape[2]), int(w.shape[-1])
        group = _attr(node, "group", 1)
        pixels = max(1, macs // max(1, c_out * c_in_g * kh * kw))
        if group > 1 and c_in_g == 1 and group == c_out:
            strides = next((list(a.ints) for a in node.attribute if a.name == "strides"), [1])
            stride = int(strides[0]) if strides else 1
            side = int(math.sqrt(pixels)) * stride
            return KernelShape(KernelKind.DEPTHWISE_CONV, (c_out, c_out, kh, kw, stride, side, side)), None
        return KernelShape(KernelKind.MATMUL, (pixels, c_in_g * kh * kw, c_out)), None
    if node.op_type in ("MatMul", "Gemm") and w.ndim == 2:
        trans_b = node.op_type == "Gemm" and _attr(node, "transB", 0)
        k, n = (int(w.shape[1]), int(w.shape[0])) if trans_b else (int(w.shape[0]), int(w.shape[1]))
        m = max(1, macs // max(1, k * n))
        dynamic = KernelShape(KernelKind.DYNAMIC_MATMUL, (m, k, n)) if dynamic_problem(index, node) is None else None
        return KernelShape(KernelKind.MATMUL, (m, k, n)), dynamic
    return None


def _speed(oracle: SpeedOracle, shape: KernelShape | None) -> float | None:
    if shape is None:
        return None
    s = oracle.speed(shape)
    return None if s is None else min(max(s.ratio, _SPEED_RANGE[0]), _SPEED_RANGE[1])


def host_costs(model: onnx.ModelProto, macs: Mapping[str, int | None], oracle: SpeedOracle) -> dict[str, NodeCosts]:
    """Each compute node's cost from its kernel shapes' speeds on this host (``oracle``, measured and cached).

    A node whose shape is unknown (activation x activation MatMul, unknown MACs) takes the median
    integer speed of the others; float costs its MACs.
    """
    index = GraphIndex.build(model.graph)
    by_name = {n.name: n for n in model.graph.node if n.name}
    speeds: dict[str, tuple[float | None, float | None]] = {}
    for name, m in macs.items():
        node = by_name.get(name)
        shapes = _shapes(index, node, m) if node is not None and m else None
        speeds[name] = (None, None) if shapes is None else (_speed(oracle, shapes[0]), _speed(oracle, shapes[1]))
    known = sorted(s for s, _ in speeds.values() if s is not None)
    typical = known[len(known) // 2] if known else INTEGER_MAC_COST
    table = {}
    for name, m in macs.items():
        n = float(m if m is not None else 1)
        static, dynamic = speeds[name]
        table[name] = NodeCosts(n, n / (static or typical), None if dynamic is None else n / dynamic, "on this host")
    return table


def cost_table(
    model: onnx.ModelProto, macs: Mapping[str, int | None], oracle: SpeedOracle | None
) -> dict[str, NodeCosts]:
    """The host's costs, or the constant ones when there is no measuring oracle (None or ``ConstantSpeedOracle``)."""
    if oracle is None or isinstance(oracle, ConstantSpeedOracle):
        return constant_costs(macs)
    return host_costs(model, macs, oracle)
