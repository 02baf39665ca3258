"""Score top: a score's logit, read only by a Sigmoid, and that Sigmoid's output keep their observed maximum.

A clipping calibration method (percentile, entropy, MSE) trades the rare large values of a tensor for
finer steps below them. For a detector's or a gate's score that trade is wrong: the rare large logits
are the confident positives the model exists to report, and the clipped top is where every one of them
lands. NudeNet (YOLOv8n, 18 class scores read by one Sigmoid), calibrated by percentile 99.99 on its 32
images: the class logits observed in [-26.6, 1.68] were clipped to [-16.1, -2.08], so the Sigmoid's
output could not exceed sigmoid(-2.08) = 0.111, below the 0.25 at which NudeNet keeps a box. The
quantized model found none of FP32's boxes (F1 0.000), while its pooled output SQNR, dominated by the
box coordinates, read 35.5 dB against min-max's 30.8 dB: a search on SQNR chose it.

So a tensor read only by Sigmoids of itself, the tensors its values come from through ops that only move
them (``CARRIERS``: YOLOv8's class logits are Conv outputs concatenated, reshaped and split before their
Sigmoid), and the output of such a Sigmoid keep the observed maximum as their grid's top, whatever the
method; the bottom stays the method's (and the ``sigmoid-floor`` rule may raise it). A SiLU's input (also
read by its Mul) is a feature, not a score: its top is left to the method. Min-max ranges already end at
the observed maximum, so the default plan does not change. Each tensor moved leaves a ``RangeDecision``
(rule ``score-top``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quantcli.static.plan import RangeDecision

if TYPE_CHECKING:
    from quantcli.static.rules._context import PlanContext

__all__ = ["CARRIERS", "SCORE_TOP_RULE", "score_tensors", "score_top"]

#: name of the rule in ``QuantConfig.disabled_rules``
SCORE_TOP_RULE = "score-top"


#: ops that move a score's values without computing new ones: the walk back from a Sigmoid crosses them
CARRIERS = frozenset(
    {"Reshape", "Transpose", "Concat", "Split", "Slice", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
)


def _read_by_sigmoids_alone(ctx: PlanContext, tensor: str) -> bool:
    """Sigmoids of ``tensor`` (one or more) are all that read it."""
    readers = ctx.index.consumers_of(tensor)
    return bool(readers) and all(n.op_type == "Sigmoid" and list(n.input) == [tensor] for n in readers)


def score_tensors(ctx: PlanContext) -> dict[str, str]:
    """Every score tensor of the graph and the Sigmoid it is a score of: each Sigmoid's output and input
    when only Sigmoids read that input, and the tensors the input's values come from through ``CARRIERS``
    (YOLOv8's class logits pass Conv -> Concat -> Reshape -> Concat -> Split before their Sigmoid)."""
    scores: dict[str, str] = {}
    for node in ctx.index.graph.node:
        if node.op_type != "Sigmoid" or not _read_by_sigmoids_alone(ctx, node.input[0]):
            continue
        scores.setdefault(node.output[0], node.name)
        todo = [node.input[0]]
        while todo:
            tensor = todo.pop()
            if tensor in scores or ctx.index.is_constant(tensor):
                continue
            scores[tensor] = node.name
            producer = ctx.index.producers.get(tensor)
            if producer is not None and producer.op_type in CARRIERS:
                todo.extend(i for i in producer.input[: 1 if producer.op_type != "Concat" else None] if i)
    return scores


def score_top(ctx: PlanContext, tensor: str) -> float | None:
    """The top of ``tensor``'s grid when the rule raises it (its observed maximum), else None.

    Records the decision once per tensor.
    """
    r = ctx.ranges.get(tensor)
    if r is None or r.max >= r.observed_max or not ctx.enabled(SCORE_TOP_RULE):
        return None
    if ctx.scores is None:
        ctx.scores = score_tensors(ctx)
    sigmoid = ctx.scores.get(tensor)
    if sigmoid is None:
        return None
    if not any(d.tensor == tensor and d.rule == SCORE_TOP_RULE for d in ctx.range_decisions):
        ctx.range_decisions.append(
            RangeDecision(
                tensor,
                r.observed_min,
                r.observed_max,
                f"grid ends at the observed maximum {r.observed_max:.3g}, not at the method's {r.max:.3g}: it carries "
                f"the scores of Sigmoid '{sigmoid}', whose rare large values are its confident positives",
                SCORE_TOP_RULE,
            )
        )
    return r.observed_max
