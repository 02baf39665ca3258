"""Per-node run-time (dynamic) activation quantization inside a static plan (``QuantConfig.dynamic_nodes``)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from quantcli.core.options import QuantConfig
from quantcli.graph.index import GraphIndex
from quantcli.modes.dynamic import lower_dynamic_nodes
from quantcli.passes.preprocess import preprocess
from quantcli.static.lowering import apply_plan
from quantcli.static.plan import SkipCode
from quantcli.static.planning import make_plan
from quantcli.static.rules._context import PlanContext
from quantcli.stats.calibration import calibrate
from quantcli.verify.audit import audit_fusion
from tests import helpers, models


def _chain_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(size=(16, 4, 32)).astype(np.float32)}


def _plan(model: onnx.ModelProto, config: QuantConfig, **kw: object):  # type: ignore[no-untyped-def]
    prepared, _ = preprocess(model)
    ranges = calibrate(prepared, helpers.dataset(model, _chain_inputs()), model_sha256="t").ranges
    return prepared, make_plan(prepared, ranges, config, **kw)  # type: ignore[arg-type]


def test_a_dynamic_matmul_reads_float_and_its_neighbours_plan_around_it() -> None:
    prepared, plan = _plan(models.matmul_chain(), QuantConfig(dynamic_nodes=("mm1",)))
    assert plan.dynamic_nodes == ("mm1",)
    skip = next(s for s in plan.skipped if s.node == "mm1")
    assert skip.code == SkipCode.RUNTIME_ACTIVATION
    assert skip.reason.startswith("run-time activation quantization")
    assert "mm1" not in {n for n, _ in plan.quantized_nodes}
    assert "mm2" in {n for n, _ in plan.quantized_nodes}  # the static MatMul after it is still integer
    assert all(w.node != "mm1" for w in plan.weights)
    with pytest.raises(ValueError, match="run-time activation"):
        apply_plan(prepared, plan)  # never silently float


def test_the_lowered_node_runs_as_an_integer_kernel_and_stays_close_to_fp32() -> None:
    model = models.matmul_chain()
    prepared, plan = _plan(model, QuantConfig(dynamic_nodes=("re:^mm1$",)))
    qmodel = apply_plan(prepared, plan, dynamic=lower_dynamic_nodes)
    ops = [n.op_type for n in qmodel.graph.node]
    assert "DynamicQuantizeLinear" in ops and "MatMulInteger" in ops
    # mm1's input is read as float: no QuantizeLinear of the graph input x
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "x" for n in qmodel.graph.node)
    fused = audit_fusion(qmodel, feed={"x": _chain_inputs()["x"][:1]})
    kernels = {k for _, k in fused.integer_nodes}
    assert kernels & {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
    assert not fused.float_compute_nodes
    assert all(n.integer and n.macs for n in fused.nodes)
    x = _chain_inputs(1)
    ref = helpers.run(model, x)[0]
    assert helpers.sqnr(ref, helpers.run(qmodel, x)[0]) > 25


def test_a_float_node_wins_over_a_dynamic_pattern_and_an_activation_weight_is_declined() -> None:
    _, plan = _plan(models.matmul_chain(), QuantConfig(dynamic_nodes=("mm*",)), float_nodes=frozenset({"mm2"}))
    assert plan.dynamic_nodes == ("mm1",)
    assert next(s for s in plan.skipped if s.node == "mm2").code == SkipCode.FLOAT_NODE
    model = models.attention_matmul()
    prepared, _ = preprocess(model)
    x = {"x": np.random.default_rng(0).normal(size=(8, 6, 16)).astype(np.float32)}
    ranges = calibrate(prepared, helpers.dataset(model, x), model_sha256="t").ranges
    plan = make_plan(prepared, ranges, QuantConfig(), dynamic_nodes=frozenset({"scores", "q"}))
    assert plan.dynamic_nodes == ("q",)
    declined = next(d for d in plan.declined if d.node == "scores")
    assert declined.rule == "dynamic" and "activation x activation" in declined.rejection.detail
    assert "scores" in {n for n, _ in plan.quantized_nodes}  # planned statically instead


def test_a_rule_can_mark_the_node_it_plans_dynamic() -> None:
    prepared, _ = preprocess(models.matmul_chain())
    ctx = PlanContext(GraphIndex.build(prepared.graph), {}, QuantConfig())
    node = next(n for n in prepared.graph.node if n.name == "mm2")
    rejection = ctx.mark_dynamic(node)
    assert rejection is not None and rejection.code == SkipCode.RUNTIME_ACTIVATION
    assert ctx.dynamic == {"mm2"} and "mm2" in ctx.float_compute
    ctx_sub = PlanContext(GraphIndex.build(prepared.graph), {}, QuantConfig(), in_subgraph=True)
    assert ctx_sub.mark_dynamic(node) is None


def test_the_flag_reaches_the_plan_and_other_modes_refuse_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from quantcli.cli.app import app

    model_path, data_path = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(models.matmul_chain(), model_path)
    np.savez(data_path, **_chain_inputs())
    runner = CliRunner()
    args = ["convert", str(model_path), "-o", str(tmp_path / "q.onnx"), "--data", str(data_path)]
    ok = runner.invoke(app, [*args, "--dynamic-nodes", "mm1", "--json", str(tmp_path / "r.json")])
    assert ok.exit_code == 0, ok.output
    assert "run-time activation quantization" in ok.output
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger", "QuantizeLinear"} <= ops
    refused = runner.invoke(app, [*args[:3], str(tmp_path / "q2.onnx"), "--mode", "dynamic", "--dynamic-nodes", "mm1"])
    assert refused.exit_code != 0 and "--dynamic-nodes" in refused.output
