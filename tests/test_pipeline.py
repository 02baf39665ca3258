"""convert as lists of steps: which list a request runs, and a step added to a list runs in its place."""

from __future__ import annotations

import dataclasses

import pytest

from quantcli.core.options import AlgorithmOptions
from quantcli.modes.common import ConvertMode
from quantcli.pipeline import (
    ALGORITHM_STEPS,
    MODE_STEPS,
    RECIPE_STEPS,
    SEARCH_STEPS,
    STATIC_STEPS,
    ConvertContext,
    ConvertRequest,
    steps_for,
)
from quantcli.pipeline import steps as s
from quantcli.pipeline import verdict as v
from quantcli.pipeline.convert import run_steps
from quantcli.search.accuracy_search import Budget, SearchOptions


def test_each_request_runs_its_list(tmp_path):
    m, o, d = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "d.npz"
    assert steps_for(ConvertRequest(m, o, data_path=d)) is STATIC_STEPS
    assert steps_for(ConvertRequest(m, o, data_path=d, algorithms=AlgorithmOptions(cle=True))) is ALGORITHM_STEPS
    search = SearchOptions(Budget(min_sqnr_db=20.0))
    assert steps_for(ConvertRequest(m, o, data_path=d, search=search, eval_data=d)) is SEARCH_STEPS
    assert steps_for(ConvertRequest(m, o, data_path=d, recipe=tmp_path / "r.json")) is RECIPE_STEPS
    for mode in (ConvertMode.DYNAMIC, ConvertMode.WEIGHT_ONLY, ConvertMode.FP16):
        assert steps_for(ConvertRequest(m, o, mode=mode)) is MODE_STEPS
    # every list checks its outputs first, writes, then gives its verdict (the search then writes its recipe)
    for steps in (STATIC_STEPS, ALGORITHM_STEPS, RECIPE_STEPS, MODE_STEPS):
        assert steps[0] is s.check_outputs and steps[-2:] == (s.save, v.verdict)
    assert SEARCH_STEPS[-3:] == (s.save, v.verdict, s.save_recipe)
    # only the plain static list holds calibration samples back for the verdict (a search or a recipe
    # calibrates on all of --data, so that a recipe replays to the same bytes)
    assert [steps for steps in (STATIC_STEPS, ALGORITHM_STEPS, SEARCH_STEPS, RECIPE_STEPS) if v.hold_back in steps] == [
        STATIC_STEPS
    ]


def test_the_request_is_frozen_and_paths_are_paths(tmp_path):
    request = ConvertRequest(str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), data_path=str(tmp_path / "d"))
    assert request.model_path == tmp_path / "m.onnx" and request.data_path == tmp_path / "d"
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.force = True  # type: ignore[misc]


def test_a_step_added_to_a_list_sees_the_context(tmp_path, cnn_path, cnn_data):
    """A new step is a function of the context plus its place in a list: here one that records the plan."""
    seen = {}

    def record_plan(ctx: ConvertContext) -> None:
        seen["quantized"] = {name for name, _ in ctx.plan.quantized_nodes}

    steps = list(STATIC_STEPS)
    steps.insert(steps.index(s.plan) + 1, record_plan)
    ctx = ConvertContext(ConvertRequest(cnn_path, tmp_path / "q.onnx", data_path=cnn_data))
    run_steps(ctx, steps)
    assert seen["quantized"] and (tmp_path / "q.onnx").is_file()
    assert ctx.audit is not None and ctx.calibration is not None and ctx.sha256


def test_a_step_out_of_order_is_a_bug_report(tmp_path, cnn_path, cnn_data):
    ctx = ConvertContext(ConvertRequest(cnn_path, tmp_path / "q.onnx", data_path=cnn_data))
    with pytest.raises(RuntimeError, match="step order: the model is not set yet"):
        run_steps(ctx, (s.lower,))
