"""The search's dynamic move, its cost from the host's kernel speeds, and the timing that confirms its choice."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest

from quantcli import api
from quantcli.core.host import ConstantSpeedOracle, KernelKind, KernelShape, KernelSpeed, default_config
from quantcli.core.options import CalibrationMethod
from quantcli.search.accuracy_search import Budget, Candidate, SearchOptions, Trial, cheapest, model_cost, ranked
from quantcli.search.confirm import fastest
from quantcli.search.cost import NodeCosts, constant_costs, cost_table, host_costs
from quantcli.search.recipe import read_recipe
from tests import models

# the host's own choices, as convert makes them: 7-bit weights without VNNI, where u8*s8 kernels saturate
CONFIG = default_config()
pytestmark = pytest.mark.usefixtures("fixed_speedup")


@dataclass
class KindOracle:
    """Static MatMul ``static``x float, dynamic ``dynamic``x; records the shapes asked."""

    static: float = 3.0
    dynamic: float = 1.5
    asked: list[KernelShape] = field(default_factory=list)

    def speed(self, shape: KernelShape) -> KernelSpeed | None:
        self.asked.append(shape)
        return KernelSpeed(shape, self.dynamic if shape.kind == KernelKind.DYNAMIC_MATMUL else self.static, "here")


@pytest.fixture
def shifted(tmp_path: Path) -> tuple[Path, Path, Path]:
    """``models.matmul_chain`` evaluated on inputs 4x wider than it was calibrated on: static ranges clip,
    run-time ones follow the data."""
    model = tmp_path / "chain.onnx"
    model.write_bytes(models.matmul_chain().SerializeToString())
    rng = np.random.default_rng(5)
    calib, evald = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, x=rng.normal(size=(64, 4, 32)).astype(np.float32))
    np.savez(evald, x=(4.0 * rng.normal(size=(64, 4, 32))).astype(np.float32))
    return model, calib, evald


def _convert(data: tuple[Path, Path, Path], tmp_path: Path, **options: object) -> api.ConvertResult:
    model, calib, evald = data
    opts = SearchOptions(Budget(min_sqnr_db=30.0), latency_runs=1, **options)  # type: ignore[arg-type]
    return api.convert_model(
        model, tmp_path / "q.onnx", data_path=calib, config=CONFIG, search=opts, eval_data=evald,
        save_recipe=tmp_path / "r.json", verdict=False,
    )  # fmt: skip


def test_a_matmul_tries_run_time_quantization_before_float(shifted, tmp_path):
    result = _convert(shifted, tmp_path)
    search = result.search
    assert search is not None and search.chosen.meets_budget
    actions = [t.action for t in search.trials]
    for name in ("mm1", "mm2"):  # each move of a MatMul: dynamic first, then (if that is not enough) float
        if f"+ float: {name}" in actions:
            assert actions.index(f"+ dynamic: {name}") < actions.index(f"+ float: {name}")
    chosen = search.chosen.candidate
    assert chosen.dynamic_nodes == ("mm1", "mm2") and chosen.float_nodes == ()  # no float MatMul needed
    assert set(chosen.dynamic_nodes).isdisjoint(chosen.float_nodes)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    assert result.plan is not None and result.plan.dynamic_nodes == chosen.dynamic_nodes
    # the recipe keeps them (schema 3) and replays the same bytes
    recipe = read_recipe(tmp_path / "r.json")
    assert recipe.dynamic_nodes == chosen.dynamic_nodes
    assert json.loads((tmp_path / "r.json").read_text())["schema"] == "quantcli.recipe/3"
    model, calib, _ = shifted
    api.convert_model(model, tmp_path / "b.onnx", data_path=calib, recipe=tmp_path / "r.json", verdict=False)
    assert (tmp_path / "b.onnx").read_bytes() == (tmp_path / "q.onnx").read_bytes()


def test_dynamic_costs_between_integer_and_float():
    macs: dict[str, int | None] = {"mm1": 1000, "mm2": 1000}
    table = constant_costs(macs)
    static = model_cost(Candidate(CalibrationMethod.MINMAX), table)
    dynamic = model_cost(Candidate(CalibrationMethod.MINMAX, dynamic_nodes=("mm1",)), table)
    floated = model_cost(Candidate(CalibrationMethod.MINMAX, float_nodes=("mm1",)), table)
    assert static < dynamic < floated
    assert model_cost(Candidate(CalibrationMethod.MINMAX, dynamic_nodes=("mm1",)), macs) == dynamic  # MACs alone


def test_host_costs_come_from_the_kernel_shapes_measured_here():
    model = models.sensitive_mlp()
    macs: dict[str, int | None] = {"mm1": 32 * 32, "mm2": 32 * 32, "mm3": 32 * 10}
    oracle = KindOracle(static=3.0, dynamic=1.5)
    table = host_costs(model, macs, oracle)
    assert table["mm1"] == NodeCosts(1024.0, 1024.0 / 3.0, 1024.0 / 1.5, "on this host")
    assert KernelShape(KernelKind.MATMUL, (1, 32, 10)) in oracle.asked
    assert KernelShape(KernelKind.DYNAMIC_MATMUL, (1, 32, 32)) in oracle.asked
    # a host where the dynamic kernel is faster than the static one ranks a dynamic MatMul cheaper
    fast_dynamic = host_costs(model, macs, KindOracle(static=1.2, dynamic=2.4))
    assert model_cost(Candidate(CalibrationMethod.MINMAX, dynamic_nodes=("mm1",)), fast_dynamic) < model_cost(
        Candidate(CalibrationMethod.MINMAX), fast_dynamic
    )
    # no measuring oracle: the constants (tests and QUANTCLI_KERNEL_SPEED=constant give the same ranking anywhere)
    assert cost_table(model, macs, ConstantSpeedOracle()) == constant_costs(macs)
    assert cost_table(model, macs, None) == constant_costs(macs)


def _trial(step: int, float_nodes: tuple[str, ...] = (), dynamic: tuple[str, ...] = (), meets: bool = True) -> Trial:
    cand = Candidate(CalibrationMethod.MINMAX, float_nodes=float_nodes, dynamic_nodes=dynamic)
    return Trial(step, "fallback", "", cand, None, None, 30.0, 1.0, meets)


def test_the_ranking_orders_by_cost_then_float_then_dynamic_nodes():
    macs: dict[str, int | None] = {"mm1": 1000, "mm2": 100}
    f, d, both, none = _trial(1, ("mm2",)), _trial(2, (), ("mm1",)), _trial(3, ("mm2",), ("mm1",)), _trial(4)
    assert ranked([both, d, f, none, _trial(5, meets=False)], macs) == [none, f, d, both]
    assert cheapest([d, f], macs) is f  # 100 float MACs (400) beat 1000 run-time quantized ones (2000)


def test_the_fastest_of_the_cheapest_few_wins_and_a_tie_keeps_the_cost_order():
    models_ = [onnx.ModelProto(), onnx.ModelProto(), onnx.ModelProto()]
    speeds = iter([1.8, 2.4, 2.1])
    index, timed = fastest(models_, onnx.ModelProto(), {}, lambda r, c, f: next(speeds))
    assert index == 1 and [t.speedup for t in timed] == [1.8, 2.4, 2.1]
    index, _ = fastest(models_, onnx.ModelProto(), {}, lambda r, c, f: 1.5)
    assert index == 0
    # within the timer's noise of the fastest is a tie: the cheaper stands (2.05 / 2.0 < 1.03, 2.1 / 2.0 > 1.03)
    for speeds_, expected in (([2.0, 2.05, 1.9], 0), ([2.0, 2.1, 1.9], 1), ([1.0, 1.9, 1.95], 1)):
        answers = iter(speeds_)
        index, _ = fastest(models_, onnx.ModelProto(), {}, lambda r, c, f, a=answers: next(a))
        assert index == expected, speeds_


def test_the_search_times_its_cheapest_candidates_and_takes_the_fastest(shifted, tmp_path):
    """An injected timer: the choice is deterministic, and follows the timing, not the cost."""
    calls: list[int] = []

    def timer(reference: onnx.ModelProto, candidate: onnx.ModelProto, feed: object) -> float:
        calls.append(len(candidate.graph.node))
        return 1.0 + len(calls) / 10  # the later timed (the dearer), the faster

    lines: list[str] = []
    model, calib, evald = shifted
    result = api.convert_model(
        model, tmp_path / "q.onnx", data_path=calib, config=CONFIG, eval_data=evald, verdict=False,
        search=SearchOptions(Budget(min_sqnr_db=30.0), latency_runs=1, timer=timer, confirm=2), log=lines.append,
    )  # fmt: skip
    search = result.search
    assert search is not None
    met = ranked(search.trials, constant_costs(_CHAIN_MACS))
    assert len(calls) == 2 and search.chosen.step == met[1].step  # the second cheapest was timed faster
    assert any(line.startswith("timed the 2 cheapest in the budget") for line in lines)


#: MACs per sample of ``models.matmul_chain`` (4 positions)
_CHAIN_MACS: dict[str, int | None] = {"mm1": 4 * 32 * 32, "mm2": 4 * 32 * 8}


def test_without_a_timer_the_cost_decides(shifted, tmp_path):
    """Tests' convert times with the verdict's stand-in (1.5x for every model): the cost's choice stands."""
    search = _convert(shifted, tmp_path).search
    assert search is not None
    assert search.chosen.step == ranked(search.trials, constant_costs(_CHAIN_MACS))[0].step
