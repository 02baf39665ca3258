"""Which nodes the rules may see: op types, node-name exclusions, float nodes, custom domains, recurrent feeds.

Runs before the rule table for every node. A node rejected here stays float whatever its rule
would say; a Conv/MatMul/Gemm rejected here makes its readers treat its output as float
(``PlanContext.float_locked``). The names and op types come from the one ``NodeSelector``
(``quantcli.core.selection``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx

from quantcli.core.options import QuantConfig
from quantcli.core.selection import ExclusionKind, NodeSelector
from quantcli.static.plan import Rejection, SkipCode

if TYPE_CHECKING:
    from quantcli.static.rules._context import PlanContext

__all__ = ["FLOAT_ONLY", "RECURRENT_FEED_RULE", "plan_selector", "selection_rejection"]

#: ops known to have no integer kernel in onnxruntime's CPU provider
FLOAT_ONLY = {
    "LayerNormalization": "no integer LayerNormalization kernel in onnxruntime",
    "Erf": "no integer Erf kernel in onnxruntime",
    "Gelu": "no integer Gelu kernel in onnxruntime",
    "ReduceMean": "no integer ReduceMean kernel in onnxruntime",
    "Div": "no integer Div kernel in onnxruntime",
    "Sub": "no integer Sub kernel in onnxruntime",
    "Sqrt": "no integer Sqrt kernel in onnxruntime",
    "Pow": "no integer Pow kernel in onnxruntime",
    "Tanh": "no integer Tanh kernel in onnxruntime",
    "BatchNormalization": "BatchNormalization not after a Conv could not be folded",
}
#: name of the recurrent-feed check (``quantcli.static.recurrent``) in ``QuantConfig.disabled_rules``
RECURRENT_FEED_RULE = "recurrent-feed"


def plan_selector(config: QuantConfig, default_op_types: frozenset[str], float_nodes: frozenset[str]) -> NodeSelector:
    """The selector of a plan: the config's patterns and op types (default ones when empty), and float nodes."""
    return NodeSelector(
        patterns=tuple(config.exclude_nodes),
        names=float_nodes,
        op_types=config.op_types or default_op_types,
        exclude_op_types=config.exclude_op_types,
    )


def option_rejection(selector: NodeSelector, supported: frozenset[str], node: onnx.NodeProto) -> Rejection | None:
    """Why the options (op types, names, domain) keep ``node`` float, or None."""
    excluded = selector.exclusion(node)
    if excluded is None:
        if node.domain not in ("", "ai.onnx"):
            return Rejection(SkipCode.CUSTOM_DOMAIN, node.domain)
        return None
    if excluded.kind == ExclusionKind.OP_TYPE_EXCLUDED:
        return Rejection(SkipCode.OP_TYPE_EXCLUDED, node.op_type)
    if excluded.kind == ExclusionKind.OP_TYPE_NOT_SELECTED:
        if node.op_type in supported:
            return Rejection(SkipCode.OP_TYPE_NOT_SELECTED, node.op_type)
        return Rejection(SkipCode.NO_INTEGER_KERNEL, FLOAT_ONLY.get(node.op_type, "no integer kernel for this op type"))
    if excluded.kind == ExclusionKind.NAME_PATTERN:
        return Rejection(SkipCode.NODE_EXCLUDED, excluded.matched)
    return Rejection(SkipCode.FLOAT_NODE)


def selection_rejection(ctx: PlanContext, supported: frozenset[str], node: onnx.NodeProto) -> Rejection | None:
    """Why ``node`` stays float before any rule sees it (options, then recurrent feeds), or None."""
    rejection = option_rejection(ctx.selector, supported, node)
    if rejection is not None:
        return rejection
    reason = ctx.keep_float.get(node.name)
    if reason is not None and ctx.enabled(RECURRENT_FEED_RULE):
        return Rejection(SkipCode.RECURRENT_FEED, reason)
    return None
