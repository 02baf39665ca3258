"""Decide what to quantize: ``make_plan`` walks the graph and asks the rules; nothing here edits the graph.

A ``QuantPlan`` (``quantcli.static.plan``) says which tensors get a QuantizeLinear/DequantizeLinear
pair, which weights become integer initializers, which Relu/Clip fold into a producer, and every
node left in float with its reason code (``lowering.apply_plan`` turns it into a model). For each
node, in graph order, this module runs the selection (op types, ``exclude_nodes`` patterns, the
plan's ``float_nodes``, custom domains, recurrent feeds), then the rule table of
``quantcli.static.rules``; subgraphs of If/Loop/Scan are planned the same way.

The plan follows onnxruntime's QDQ node units, so that its CPU provider turns each unit into an
integer kernel; one rule family per unit kind, each file stating its math:

* compute units (Conv, MatMul, Gemm): ``rules/compute.py``; image stems stay float: ``rules/stem.py``;
* element-wise and pooling units (Add, Mul, Concat, AveragePool, Sigmoid, Softmax, ...):
  ``rules/elementwise.py``; Relu/Clip folded into the producer's range: ``rules/fold.py``; the
  input of a Sigmoid or SiLU starts its grid where the quantized Sigmoid reads 0: ``rules/sigmoid_floor.py``;
  a score (the input of a Sigmoid alone, and its output) keeps its observed maximum: ``rules/score_top.py``;
* data-movement units (MaxPool, Reshape, Transpose, Gather, ...): ``rules/movement.py``;
* Mul/Div by a positive scalar constant, a new scale and no kernel: ``rules/rescale.py``;
* HardSigmoid/HardSwish as QLinearAdd (+ QLinearMul): ``rules/hard.py``;
* Gather on a large constant table, int8 rows: ``rules/embedding.py``;
* LSTM as DynamicQuantizeLSTM: ``rules/recurrent.py``;
* MatMul/Gemm with run-time activation quantization (``QuantConfig.dynamic_nodes``, or a rule calling
  ``PlanContext.mark_dynamic``): ``rules/dynamic.py``; they read float tensors here and are rewritten
  by the lowering's dynamic hook (``QuantPlan.dynamic_nodes``).

The constants and types of those modules are re-exported here, where callers have always found them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import onnx

from quantcli.core.host import ConstantSpeedOracle, SpeedOracle
from quantcli.core.options import QuantConfig
from quantcli.core.qmath import QuantParams
from quantcli.core.selection import NodeSelector, first_matching_pattern
from quantcli.graph.index import GraphIndex
from quantcli.graph.pinning import pinned_shapes
from quantcli.graph.scopes import CONTROL_FLOW_OPS, node_subgraphs
from quantcli.static.plan import (
    ActivationQuant,
    QuantPlan,
    Rejection,
    SkipCode,
    SubgraphPlan,
)
from quantcli.static.recurrent import recurrent_input_producers
from quantcli.static.rules import (
    DEFAULT_OP_TYPES,
    RULE_NAMES,
    SUPPORTED_OP_TYPES,
    rules_for,
    slow_depthwise,
    slow_pooling,
)
from quantcli.static.rules._context import SENTINEL_MAGNITUDE, PlanContext
from quantcli.static.rules.compute import COMPUTE_OPS
from quantcli.static.rules.dynamic import dynamic_problem, dynamic_rejection
from quantcli.static.rules.elementwise import ELEMENTWISE_OPS
from quantcli.static.rules.embedding import EMBEDDING_MIN_BYTES
from quantcli.static.rules.fold import FOLDABLE_OPS
from quantcli.static.rules.hard import HARD_OPS
from quantcli.static.rules.movement import MOVEMENT_OPS
from quantcli.static.rules.recurrent import LSTM_MIN_HIDDEN, RECURRENT_OPS
from quantcli.static.rules.rescale import RESCALE_OPS
from quantcli.static.rules.selection import option_rejection, plan_selector, selection_rejection
from quantcli.static.rules.stem import STEM_MAX_CHANNELS, STEM_MIN_PIXELS
from quantcli.stats.ranges import TensorRange

__all__ = [
    "COMPUTE_OPS",
    "DEFAULT_OP_TYPES",
    "ELEMENTWISE_OPS",
    "EMBEDDING_MIN_BYTES",
    "FLOAT_READ_OPS",
    "FOLDABLE_OPS",
    "HARD_OPS",
    "LSTM_MIN_HIDDEN",
    "MOVEMENT_OPS",
    "RECURRENT_OPS",
    "RESCALE_OPS",
    "SENTINEL_MAGNITUDE",
    "STEM_MAX_CHANNELS",
    "STEM_MIN_PIXELS",
    "SUPPORTED_OP_TYPES",
    "make_plan",
]

#: ops that onnxruntime quantizes by itself when an input arrives from DequantizeLinear (its
#: weight/bias quantization pass turns DQ -> float-weight MatMul into an integer kernel), so a
#: node of these types that quantcli keeps in float must read the float tensor, not the DQ output
FLOAT_READ_OPS = frozenset({"Conv", "MatMul", "Gemm", "ConvTranspose"})
#: op types whose skip by the options is not worth a line in the report
#: the name run-time activation quantization's declined lines carry (``PlanContext.declined``)
DYNAMIC_RULE = "dynamic"
_QUIET_OPS = frozenset({"Constant", "Shape", "Cast", "Relu", "Clip", "Identity", *CONTROL_FLOW_OPS})


def _run_rules(ctx: PlanContext, node: onnx.NodeProto) -> Rejection | None:
    """Try the rules of ``node``'s op type in table order; the rejection that stands, or None."""
    last: Rejection | None = None
    for rule in rules_for(node.op_type):
        if not ctx.enabled(rule.name):
            last = Rejection(SkipCode.RULE_DISABLED, rule.name)
            continue
        rejection, by_check = rule.run(ctx, node)
        if rejection is None:
            return None
        if not (by_check and rule.passes_on):
            return rejection
        if rejection.code != SkipCode.NOT_APPLICABLE:  # "not my kind of node" is no news
            ctx.decline(node, rule.name, rejection)
        last = rejection
    return last if last is not None and last.code != SkipCode.NOT_APPLICABLE else None


def _plan_node(ctx: PlanContext, node: onnx.NodeProto) -> None:
    """Selection, then the rules; a Conv/MatMul/Gemm left float (or run-time quantized) locks its outputs float."""
    selected_out = selection_rejection(ctx, SUPPORTED_OP_TYPES, node)
    if selected_out is None and node.name in ctx.dynamic:
        selected_out = dynamic_rejection()
    if selected_out is not None:
        if node.op_type in COMPUTE_OPS:
            ctx.float_locked.update(o for o in node.output if o)
        if node.op_type not in _QUIET_OPS:
            ctx.reject(node, selected_out)
        return
    rejection = _run_rules(ctx, node)
    if rejection is None:
        return
    ctx.reject(node, rejection)
    if node.op_type in COMPUTE_OPS:
        ctx.float_locked.update(o for o in node.output if o)


def _drop_unread_float_outputs(ctx: PlanContext) -> None:
    """MatMul/Gemm outputs nobody reads as integers stay float (no Q/DQ overhead)."""
    quantized_nodes = {name for name, _ in ctx.quantized}
    folded_inputs = {f.input for f in ctx.folded}
    for tensor in sorted(ctx.float_out):
        if tensor not in ctx.act or tensor in folded_inputs:
            continue
        readers = ctx.index.consumers_of(tensor)
        if not any(r.name in quantized_nodes for r in readers):
            del ctx.act[tensor]


def _mark_dynamic(ctx: PlanContext, graph: onnx.GraphProto, names: frozenset[str]) -> None:
    """Mark the MatMul/Gemm asked for by name or ``config.dynamic_nodes`` pattern (and not excluded) dynamic."""
    patterns = ctx.config.dynamic_nodes
    for n in graph.node:
        asked = n.name in names or first_matching_pattern(patterns, n.name) is not None
        if not asked or option_rejection(ctx.selector, SUPPORTED_OP_TYPES, n) is not None:
            continue
        if ctx.mark_dynamic(n) is None:
            problem = "inside a subgraph" if ctx.in_subgraph else dynamic_problem(ctx.index, n) or ""
            ctx.decline(n, DYNAMIC_RULE, Rejection(SkipCode.MODE_UNSUPPORTED, problem))


def _plan_nodes(ctx: PlanContext, graph: onnx.GraphProto, dynamic_names: frozenset[str]) -> None:
    ctx.float_compute = {
        n.name
        for n in graph.node
        if n.op_type in FLOAT_READ_OPS and option_rejection(ctx.selector, SUPPORTED_OP_TYPES, n) is not None
    }
    ctx.float_compute |= slow_depthwise(ctx, graph)  # measured on this host (``rules.depthwise``)
    ctx.float_compute |= slow_pooling(ctx, graph)  # measured on this host (``rules.pooling``)
    _mark_dynamic(ctx, graph, dynamic_names)
    for node in graph.node:
        if node.name not in ctx.folded_names:
            _plan_node(ctx, node)
    _drop_unread_float_outputs(ctx)


@dataclass(frozen=True, slots=True)
class _PlanInputs:
    """What every graph of a model is planned from; ``act`` is shared, so a tensor is quantized once."""

    ranges: Mapping[str, TensorRange]
    config: QuantConfig
    selector: NodeSelector
    keep_float: Mapping[str, str]
    speed: SpeedOracle
    act: dict[str, QuantParams] = field(default_factory=dict)
    #: exact names of MatMul/Gemm run with run-time activation quantization (besides the config's patterns)
    dynamic_names: frozenset[str] = frozenset()
    #: main-graph shapes with the dynamic input dims at the data's sample sizes (``graph.pinning``)
    shapes: Mapping[str, tuple[int | str | None, ...]] = field(default_factory=dict)


def _plan_graph(
    graph: onnx.GraphProto,
    path: str,
    outer: dict[str, onnx.TensorProto],
    inputs: _PlanInputs,
    done: list[tuple[str, PlanContext]],
) -> None:
    """Plan ``graph``, then each subgraph of its nodes."""
    index = GraphIndex.build(graph, outer=outer, shapes=None if path else inputs.shapes)
    ctx = PlanContext(
        index,
        inputs.ranges,
        inputs.config,
        inputs.selector,
        act=inputs.act,
        in_subgraph=bool(path),
        keep_float=inputs.keep_float,
        speed=inputs.speed,
    )
    _plan_nodes(ctx, graph, inputs.dynamic_names)
    done.append((path, ctx))
    graph_inputs = {i.name for i in graph.input}
    visible = {**outer, **{t.name: t for t in graph.initializer if t.name not in graph_inputs}}
    for node in graph.node:
        for attr, sub in node_subgraphs(node):
            sub_path = f"{path}/{node.name}/{attr}" if path else f"{node.name}/{attr}"
            _plan_graph(sub, sub_path, visible, inputs, done)


def _assemble(done: list[tuple[str, PlanContext]], inputs: _PlanInputs) -> QuantPlan:
    """The plan of every planned graph, in planning order."""
    ctxs = [c for _, c in done]
    return QuantPlan(
        activations=tuple(ActivationQuant(t, p) for t, p in inputs.act.items()),
        weights=tuple(w for c in ctxs for w in c.weights),
        folded=tuple(f for c in ctxs for f in c.folded),
        quantized_nodes=tuple(q for c in ctxs for q in c.quantized),
        skipped=tuple(s for c in ctxs for s in c.skipped),
        config=inputs.config,
        range_decisions=tuple(d for c in ctxs for d in c.range_decisions),
        subgraphs=tuple(SubgraphPlan(path, tuple(c.quantized), tuple(c.skipped)) for path, c in done if path),
        recurrent=tuple(r for c in ctxs for r in c.recurrent),
        embeddings=tuple(e for c in ctxs for e in c.embeddings),
        rescaled=tuple(r for c in ctxs for r in c.rescaled),
        hard=tuple(h for c in ctxs for h in c.hard),
        float_nodes=inputs.selector.names,
        declined=tuple(d for c in ctxs for d in c.declined),
        dynamic_nodes=tuple(sorted(n for c in ctxs for n in c.dynamic)),
    )


def make_plan(
    model: onnx.ModelProto,
    ranges: Mapping[str, TensorRange],
    config: QuantConfig,
    *,
    float_nodes: frozenset[str] = frozenset(),
    speed: SpeedOracle | None = None,
    dynamic_nodes: frozenset[str] = frozenset(),
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> QuantPlan:
    """Plan the quantization of ``model`` (already pre-processed) from calibrated ``ranges``.

    Subgraphs of If/Loop/Scan nodes are planned like the main graph, each with the constants of
    its enclosing graphs in view; tensors of a branch calibration never ran have no range and stay float.
    A Conv/MatMul/Gemm feeding a recurrent cell's input stays float (``quantcli.static.recurrent``).

    Args:
        model: the pre-processed FP32 model.
        ranges: calibrated range per tensor (per-tensor method overrides already applied).
        config: types and options; ``config.disabled_rules`` names rules or checks switched off.
        float_nodes: node names kept in float exactly by name (an accuracy search's or a recipe's choice).
        dynamic_nodes: MatMul/Gemm names run with run-time activation quantization (``rules.dynamic``),
            besides ``config.dynamic_nodes`` patterns; a name that is also a float node stays float.
        speed: how fast integer kernels run (``quantcli.core.host.SpeedOracle``; pipeline/ and search/ pass
            ``quantcli.verify.kernel_speed.host_oracle()``, measured and cached per host); None: the constants
            of ``ConstantSpeedOracle`` (static/ sits above verify/ and never measures).
        input_shapes: one sample's shape per graph input (the data convert was given). Input dims that
            are dynamic in ``model`` are planned at these sizes (main graph; ``quantcli.graph.pinning``),
            so the host-measured rules time the maps the model really computes; ``model`` and the
            written model keep their dynamic dims. None: plan on the shapes ``model`` records.

    Raises:
        ValueError: ``config.disabled_rules`` names no rule or check (``quantcli.static.rules.RULE_NAMES``).
    """
    unknown = sorted(set(config.disabled_rules) - RULE_NAMES)
    if unknown:
        raise ValueError(f"unknown planning rules {unknown}; known: {sorted(RULE_NAMES)}")
    selector = plan_selector(config, DEFAULT_OP_TYPES, frozenset(float_nodes))
    if speed is None:
        speed = ConstantSpeedOracle()
    inputs = _PlanInputs(
        ranges,
        config,
        selector,
        recurrent_input_producers(model),
        speed,
        dynamic_names=frozenset(dynamic_nodes),
        shapes=pinned_shapes(model, input_shapes) if input_shapes else {},
    )
    done: list[tuple[str, PlanContext]] = []
    _plan_graph(model.graph, "", {}, inputs, done)
    return _assemble(done, inputs)
