"""Planning rules: one node selector, reason codes as data, rules switched off by configuration, float nodes."""

from __future__ import annotations

import glob

import numpy as np
import pytest
from onnx import TensorProto, helper

from quantcli.core.options import QuantConfig, QuantDType
from quantcli.core.selection import ExclusionKind, NodeSelector, pattern_matches
from quantcli.modes.common import matching_nodes
from quantcli.passes.preprocess import preprocess
from quantcli.static.plan import SkipCode
from quantcli.static.planning import make_plan
from quantcli.static.rules import RULE_NAMES, RULES
from quantcli.stats.calibration import calibrate
from tests import helpers, models


def _chain_inputs() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).normal(size=(16, 4, 32)).astype(np.float32)}


@pytest.mark.parametrize("pattern", ["relu", "rel*", "re:^rel", "re:el"])
def test_an_excluded_relu_is_not_folded_whatever_the_pattern_syntax(pattern: str) -> None:
    _, plain, _ = helpers.quantize(models.matmul_chain(), _chain_inputs())
    assert [f.node for f in plain.folded] == ["relu"]
    qmodel, plan, _ = helpers.quantize(models.matmul_chain(), _chain_inputs(), QuantConfig(exclude_nodes=(pattern,)))
    # before the one selector, a 're:' pattern was ignored by the fold: the Relu was removed anyway
    assert plan.folded == ()
    assert "Relu" in {n.op_type for n in qmodel.graph.node}
    assert any(d.node == "bias" and d.rule == "fold" and d.rejection.code == SkipCode.NODE_EXCLUDED
               for d in plan.declined)  # fmt: skip


def test_the_selector_matches_globs_regexes_and_exact_names() -> None:
    assert pattern_matches("conv*", "conv2") and not pattern_matches("conv*", "head_conv")
    assert pattern_matches("re:conv", "head_conv") and not pattern_matches("re:^conv", "head_conv")
    selector = NodeSelector(patterns=("re:^a",), names=frozenset({"b[1]"}), exclude_op_types=frozenset({"Add"}))
    node = helper.make_node("Mul", ["x", "y"], ["z"], name="b[1]")
    assert selector.name_exclusion("b[1]").kind == ExclusionKind.NAME  # no glob escaping needed
    assert selector.name_exclusion("b1") is None
    assert selector.exclusion(node).kind == ExclusionKind.NAME
    node.op_type = "Add"
    assert selector.exclusion(node).kind == ExclusionKind.OP_TYPE_EXCLUDED
    relu = helper.make_node("Relu", ["z"], ["r"], name="relu")
    assert NodeSelector(op_types=frozenset({"Conv"})).explicit_exclusion(relu) is None  # not selected, still foldable
    assert NodeSelector(exclude_op_types=frozenset({"Relu"})).explicit_exclusion(relu).kind == (
        ExclusionKind.OP_TYPE_EXCLUDED
    )


def test_matching_nodes_uses_the_same_patterns() -> None:
    assert matching_nodes(models.matmul_chain(), ["re:^mm", "relu"]) == {"mm1", "mm2", "relu"}
    assert matching_nodes(models.matmul_chain(), ["mm?"]) == {"mm1", "mm2"}


def test_skips_carry_a_code_and_the_tensor_at_fault_and_render_the_same_sentence() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        helper.make_node("Conv", ["img", "kernel"], ["c"], name="conv"),
    ]
    model = models.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("w", TensorProto.INT64, [4, 3]),
         helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 2, 4, 4]),
         helper.make_tensor_value_info("kernel", TensorProto.FLOAT, [2, 2, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 2, 4, 4])],
        [],
    )  # fmt: skip
    ranges = {name: _range() for name in ("x", "img", "y", "c")}
    plan = make_plan(model, ranges, QuantConfig())
    skips = {s.node: s for s in plan.skipped}
    assert skips["mm"].code == SkipCode.WEIGHT_NOT_CONSTANT_OR_ACTIVATION and skips["mm"].tensor == "w"
    assert skips["mm"].reason == "input 'w' is neither a constant nor a calibrated float activation"
    assert skips["conv"].code == SkipCode.WEIGHT_NOT_CONSTANT and skips["conv"].tensor == "kernel"
    assert skips["conv"].reason == "weight is not a constant initializer"


def _range():  # a calibrated range of [-1, 1]
    from quantcli.stats.calibration import TensorRange

    return TensorRange(min=-1.0, max=1.0, observed_min=-1.0, observed_max=1.0)


def _calibrated_chain():
    prepared, _ = preprocess(models.matmul_chain())
    result = calibrate(prepared, helpers.dataset(prepared, _chain_inputs()), model_sha256="t")
    return prepared, result.ranges


def test_a_rule_is_switched_off_by_configuration() -> None:
    prepared, ranges = _calibrated_chain()
    plan = make_plan(prepared, ranges, QuantConfig(disabled_rules=frozenset({"compute"})))
    assert not any(op == "MatMul" for _, op in plan.quantized_nodes)
    assert {s.node: s.code for s in plan.skipped}["mm1"] == SkipCode.RULE_DISABLED
    with pytest.raises(ValueError, match="unknown planning rules"):
        make_plan(prepared, ranges, QuantConfig(disabled_rules=frozenset({"no-such-rule"})))
    assert {r.name for r in RULES} <= RULE_NAMES


def test_float_nodes_are_handed_over_by_name_and_match_the_old_escaped_patterns() -> None:
    prepared, ranges = _calibrated_chain()
    by_name = make_plan(prepared, ranges, QuantConfig(), float_nodes=frozenset({"mm2"}))
    by_pattern = make_plan(prepared, ranges, QuantConfig(exclude_nodes=(glob.escape("mm2"),)))

    def acts(plan):
        return [(a.tensor, a.params.scale.tolist(), a.params.zero_point.tolist()) for a in plan.activations]

    assert acts(by_name) == acts(by_pattern)
    assert [(w.node, w.tensor) for w in by_name.weights] == [(w.node, w.tensor) for w in by_pattern.weights]
    assert by_name.quantized_nodes == by_pattern.quantized_nodes
    assert ("mm2", "MatMul") not in by_name.quantized_nodes
    assert {s.node: s.code for s in by_name.skipped}["mm2"] == SkipCode.FLOAT_NODE
    assert by_name.float_nodes == {"mm2"}


def test_the_report_groups_skips_by_code_and_elides_what_differs() -> None:
    from rich.console import Console

    from quantcli.cli.report import _render_skipped
    from quantcli.static.plan import Skip

    skipped = [
        Skip("a", "Conv", SkipCode.INPUT_NOT_CALIBRATED, tensor="x1"),
        Skip("b", "Conv", SkipCode.INPUT_NOT_CALIBRATED, tensor="x2"),
        Skip("c", "Add", SkipCode.OUTPUTS_ONLY, tensor="y"),
    ]
    console = Console(record=True, width=200)
    _render_skipped(console, "left in float", skipped)
    text = console.export_text()
    assert "input '…' is not a calibrated float activation" in text
    rows = [line for line in text.splitlines() if "Conv" in line or "Add" in line]
    assert len(rows) == 2 and "2" in rows[0] and "its output only reaches graph outputs" in rows[1]


def test_a_rescale_that_does_not_fire_says_why_and_passes_the_mul_on() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Mul", ["h", "h"], ["sq"], name="square"),
        helper.make_node("MatMul", ["sq", "w"], ["y"], name="mm2"),
    ]
    w = np.eye(4, dtype=np.float32)
    model = models.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [models._init("w", w)],
    )
    plan = make_plan(model, {name: _range() for name in ("x", "h", "sq", "y")}, QuantConfig())
    declined = [d for d in plan.declined if d.node == "square"]
    assert [(d.rule, d.rejection.code, d.rejection.tensor) for d in declined] == [
        ("rescale", SkipCode.UNSUPPORTED_PARAMETER, "h")
    ]
    assert ("square", "Mul") in plan.quantized_nodes  # the element-wise rule took it


def test_an_excluded_op_type_is_not_folded() -> None:
    config = QuantConfig(exclude_op_types=frozenset({"Relu"}))
    qmodel, plan, _ = helpers.quantize(models.matmul_chain(), _chain_inputs(), config)
    # before the fold asked the selector's excluded op types, the Relu was folded (removed) anyway
    assert plan.folded == ()
    relu = [n for n in qmodel.graph.node if n.op_type == "Relu"]
    assert len(relu) == 1
    producers = {o: n for n in qmodel.graph.node for o in n.output}
    assert producers[relu[0].input[0]].op_type == "DequantizeLinear"  # the Relu computes in float
    readers = [n for n in qmodel.graph.node if relu[0].output[0] in n.input]
    assert [n.op_type for n in readers] == ["QuantizeLinear"]  # requantized for mm2
    assert any(d.node == "bias" and d.rule == "fold" and d.rejection.code == SkipCode.OP_TYPE_EXCLUDED
               for d in plan.declined)  # fmt: skip


@pytest.mark.parametrize("dtype", [QuantDType.UINT8, QuantDType.INT8])
def test_a_relu_is_not_folded_into_a_symmetric_grid_that_cannot_clip_at_zero(dtype: QuantDType) -> None:
    """Symmetric activations centre the grid on 0: a folded Relu would let negative values through.

    Before the fix the Relu was removed anyway and the bundled digits CNN fell to 8.4% top-1."""
    inputs = _chain_inputs()
    config = QuantConfig(symmetric_activations=True, activation_type=dtype)
    qmodel, plan, _ = helpers.quantize(models.matmul_chain(), inputs, config)
    assert plan.folded == ()
    assert "Relu" in {n.op_type for n in qmodel.graph.node}
    assert any(d.node == "bias" and d.rule == "fold" for d in plan.declined)
    (ref,) = helpers.run(models.matmul_chain(), inputs)
    (out,) = helpers.run(qmodel, inputs)
    assert helpers.sqnr(ref, out) > 25.0
    # asymmetric grids still fold (they start at the clip minimum)
    _, plain, _ = helpers.quantize(models.matmul_chain(), inputs, QuantConfig(activation_type=dtype))
    assert [f.node for f in plain.folded] == ["relu"]
