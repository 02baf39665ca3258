"""``convert`` as plain lists of steps, one list per mode: read a list to know what a conversion does.

Each step is a function of the ``ConvertContext`` (``quantcli.pipeline.steps`` for the static
modes, ``quantcli.pipeline.mode_steps`` for the others). ``run_convert`` picks the list for the
request, runs it, and returns the ``ConvertResult``.

Adding to the pipeline:

* a step: write ``def my_step(ctx: ConvertContext) -> None`` and name it in the lists that need it;
* a graph-changing algorithm (like CLE): one pass module in ``quantcli/passes/`` plus its line in
  ``quantcli.passes.algorithms.transform_and_observe`` (run by ``transform_calibrate_plan`` and
  ``search_base`` through ``quantcli.pipeline.algorithms``); one that needs statistics adds its
  requests to that function's single data pass;
* a mode: a module in ``quantcli/modes/``, its branch in ``mode_steps.rewrite_mode``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from quantcli.core.progress import Progress, no_progress
from quantcli.modes.common import ConvertMode
from quantcli.pipeline import holdout as h
from quantcli.pipeline import mode_steps as m
from quantcli.pipeline import steps as s
from quantcli.pipeline import verdict as v
from quantcli.pipeline.context import ConvertContext, Step, need, no_log, remove_scratch
from quantcli.pipeline.request import ConvertRequest
from quantcli.pipeline.result import ConvertResult

__all__ = [
    "ALGORITHM_STEPS",
    "MODE_STEPS",
    "RECIPE_STEPS",
    "SEARCH_STEPS",
    "STATIC_STEPS",
    "run_convert",
    "steps_for",
]

#: validate, audit, time and write a static QDQ model (the end of every static list)
_STATIC_TAIL: tuple[Step, ...] = (
    s.validate,
    s.audit,
    s.require_fused,
    s.check_speedup,
    s.shape_facts,
    s.save,
    v.verdict,
)

#: calibrated QDQ: calibration given or measured, one plan
STATIC_STEPS: tuple[Step, ...] = (
    s.check_outputs,
    s.load_and_check,
    s.preprocess,
    v.hold_back,
    s.calibrate_or_read,
    s.rechoose_method,
    s.plan,
    s.lower,
    *_STATIC_TAIL,
)
#: CLE / SmoothQuant / bias correction: the transformed FP32 graph is calibrated and planned
ALGORITHM_STEPS: tuple[Step, ...] = (
    s.check_outputs,
    s.load_and_check,
    s.check_algorithms,
    s.preprocess,
    s.transform_calibrate_plan,
    s.lower,
    *_STATIC_TAIL,
)
#: an accuracy budget: the search chooses methods and float nodes, then writes its recipe
SEARCH_STEPS: tuple[Step, ...] = (
    s.check_outputs,
    s.load_and_check,
    s.preprocess,
    h.search_hold_back,
    s.search_base,
    s.search,
    *_STATIC_TAIL,
    s.save_recipe,
)
#: a saved recipe replayed: same choices, same bytes
RECIPE_STEPS: tuple[Step, ...] = (
    s.check_outputs,
    s.load_and_check,
    s.read_recipe,
    h.recipe_hold_back,
    s.preprocess,
    s.search_base,
    s.replay_recipe,
    *_STATIC_TAIL,
)
#: dynamic, weight-only, fp16: no calibration
MODE_STEPS: tuple[Step, ...] = (
    s.check_outputs,
    m.load_and_check_mode,
    s.preprocess,
    m.rewrite_mode,
    s.validate,
    m.mode_audit,
    m.require_fused_kernels,
    s.save,
    v.verdict,
)


def steps_for(request: ConvertRequest) -> tuple[Step, ...]:
    """The step list that carries out ``request``."""
    if request.mode != ConvertMode.STATIC:
        return MODE_STEPS
    if request.recipe is not None:
        return RECIPE_STEPS
    if request.search is not None:
        return SEARCH_STEPS
    if request.algorithms.needs_data:
        return ALGORITHM_STEPS
    return STATIC_STEPS


def run_convert(
    request: ConvertRequest, *, progress: Progress = no_progress, log: Callable[[str], None] | None = None
) -> ConvertResult:
    """Carry out ``request``: run its step list over a fresh context and report what was done."""
    ctx = ConvertContext(request, progress, log or no_log)
    try:
        run_steps(ctx, steps_for(request))
    finally:
        remove_scratch(ctx)
    return _result(ctx)


def run_steps(ctx: ConvertContext, steps: Sequence[Step]) -> None:
    """Run ``steps`` in order over ``ctx``."""
    for step in steps:
        step(ctx)


def _result(ctx: ConvertContext) -> ConvertResult:
    r = ctx.request
    return ConvertResult(
        output_path=r.output_path,
        plan=ctx.plan,
        preprocess=need(ctx.pre_report, "the pre-processing report"),
        audit=need(ctx.audit, "the audit"),
        input_bytes=r.model_path.stat().st_size,
        output_bytes=r.output_path.stat().st_size,
        calibration=ctx.calibration,
        mode=r.mode,
        mode_report=ctx.mode_report,
        search=ctx.searched,
        recipe_path=r.save_recipe if ctx.searched is not None else None,
        speed=ctx.speed,
        unknown_shapes=ctx.unknown_shapes,
        shape_inference_error=ctx.shape_error,
        algorithms=ctx.applied,
        opset_note=ctx.opset_note,
        verdict=ctx.verdict,
    )
