"""The float-island scan shared by the host-measured rules (``depthwise``, ``pooling``).

Such a rule decides before any node is planned: every node of its op types whose float island (the
unit with its Q/DQ transitions, timed on this host) is measured faster than its integer form by more
than the rule's margin goes into ``PlanContext.float_compute``, so that its producer leaves its
output float. Each rule gives how to measure one node (``island_speed``: its ``KernelSpeed``, or a
``Rejection`` saying why it is no candidate).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import onnx

from quantcli.core.host import KernelSpeed
from quantcli.static.plan import Rejection

if TYPE_CHECKING:
    from quantcli.static.rules._context import PlanContext

__all__ = ["measured_slow"]


def measured_slow(
    ctx: PlanContext,
    graph: onnx.GraphProto,
    rule: str,
    op_types: frozenset[str],
    island_speed: Callable[[PlanContext, onnx.NodeProto], Rejection | KernelSpeed],
    margin: float,
) -> set[str]:
    """Names of the nodes of ``op_types`` whose measured island is slower in integer form than ``margin``
    allows (none when ``rule`` is switched off)."""
    if not ctx.enabled(rule):
        return set()
    found = set()
    for node in graph.node:
        speed = island_speed(ctx, node) if node.op_type in op_types else None
        if isinstance(speed, KernelSpeed) and speed.slower(margin):
            found.add(node.name)
    return found
