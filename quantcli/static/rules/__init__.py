"""Planning rules: one family per file, dispatched from one table (``RULES``).

A rule (``_rule.Rule``) matches op types, ``check``s a node and returns either a ``Rejection``
(reason code, detail, tensor at fault: data, not text) or its match, and ``apply``s the match by
recording decisions in the ``PlanContext``. ``quantcli.static.planning`` runs, for each node in
graph order, the selection (``selection.py``: options, float nodes, recurrent feeds), then the
rules of ``RULES`` whose op types hold the node's, in table order: the first that fires wins; a
rejection by a rule with ``passes_on`` hands the node to the next one; any other rejection becomes
the node's ``Skip``. ``QuantConfig.disabled_rules`` switches rules and named checks off
(``RULE_NAMES``); a disabled rule passes every node on.

Adding a rule is one file plus one line in ``RULES``. The stem rule is a real example
(``stem.py``, abridged)::

    def check_stem(ctx, node) -> Rejection | str:
        ...
        if len(shape) != 4 or shape[1] > STEM_MAX_CHANNELS or shape[2] * shape[3] == 1:
            return Rejection(SkipCode.NOT_APPLICABLE, f"weight of shape {tuple(shape)} is no small-channel stem", w)
        return f"a {shape[2]}x{shape[3]} Conv over {shape[1]} input channel(s)"

    def apply_stem(ctx, node, description: str) -> Rejection:
        ctx.float_compute.add(node.name)
        return Rejection(SkipCode.SLOW_STEM, description)

    STEM = Rule("stem", frozenset({"Conv"}), check_stem, apply_stem, passes_on=True)

and its line below, before ``COMPUTE`` so that a stem Conv never reaches the compute rule. A new
reason gets a ``SkipCode`` and its sentence in ``quantcli.static.plan``.
"""

from __future__ import annotations

from typing import Any

from quantcli.static.rules._context import SENTINEL_CHECK, PlanContext
from quantcli.static.rules._rule import Rule
from quantcli.static.rules.attention import ATTENTION
from quantcli.static.rules.compute import COMPUTE, COMPUTE_OPS
from quantcli.static.rules.depthwise import DEPTHWISE, slow_depthwise
from quantcli.static.rules.elementwise import ELEMENTWISE, ELEMENTWISE_OPS, OUTPUTS_ONLY_CHECK
from quantcli.static.rules.embedding import EMBEDDING
from quantcli.static.rules.encoder import ENCODER_LINEAR
from quantcli.static.rules.fold import FOLD_RULE
from quantcli.static.rules.gelu_tanh import GELU_TANH
from quantcli.static.rules.hard import HARD, HARD_OPS
from quantcli.static.rules.log_magnitude import LOG_MAGNITUDE
from quantcli.static.rules.movement import MOVEMENT, MOVEMENT_OPS
from quantcli.static.rules.pooling import POOLING, slow_pooling
from quantcli.static.rules.recurrent import LSTM, RECURRENT_OPS
from quantcli.static.rules.rescale import DIV, RESCALE, RESCALE_OPS
from quantcli.static.rules.residual import RESIDUAL
from quantcli.static.rules.score_top import SCORE_TOP_RULE
from quantcli.static.rules.selection import RECURRENT_FEED_RULE
from quantcli.static.rules.sigmoid_floor import SIGMOID_FLOOR_RULE
from quantcli.static.rules.stem import STEM
from quantcli.static.rules.variance_square import VARIANCE_SQUARE

__all__ = [
    "DEFAULT_OP_TYPES",
    "RULES",
    "RULE_NAMES",
    "SUPPORTED_OP_TYPES",
    "PlanContext",
    "Rule",
    "rules_for",
    "slow_depthwise",
    "slow_pooling",
]

#: the rules, in the order they are tried on a node
RULES: tuple[Rule[Any], ...] = (
    LSTM,
    LOG_MAGNITUDE,
    STEM,
    DEPTHWISE,
    POOLING,
    ENCODER_LINEAR,
    ATTENTION,
    COMPUTE,
    VARIANCE_SQUARE,
    GELU_TANH,
    RESIDUAL,
    RESCALE,
    DIV,
    HARD,
    ELEMENTWISE,
    EMBEDDING,
    MOVEMENT,
)
#: every name ``QuantConfig.disabled_rules`` accepts: the rules, and the checks inside them
RULE_NAMES = frozenset(r.name for r in RULES) | {
    SENTINEL_CHECK,
    OUTPUTS_ONLY_CHECK,
    FOLD_RULE,
    RECURRENT_FEED_RULE,
    SIGMOID_FLOOR_RULE,
    SCORE_TOP_RULE,
}

#: op types quantized unless the user chooses otherwise; Softmax is opt-in (it costs accuracy in attention)
SUPPORTED_OP_TYPES = frozenset(COMPUTE_OPS + ELEMENTWISE_OPS + MOVEMENT_OPS + RECURRENT_OPS + RESCALE_OPS + HARD_OPS)
DEFAULT_OP_TYPES = SUPPORTED_OP_TYPES - {"Softmax"}

_BY_OP: dict[str, tuple[Rule[Any], ...]] = {
    op: tuple(r for r in RULES if op in r.op_types) for op in frozenset().union(*(r.op_types for r in RULES))
}


def rules_for(op_type: str) -> tuple[Rule[Any], ...]:
    """The rules matching ``op_type``, in table order."""
    return _BY_OP.get(op_type, ())
