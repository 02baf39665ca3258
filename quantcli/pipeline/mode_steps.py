"""The steps of the modes that need no calibration: dynamic, weight-only, fp16 (``quantcli.modes``)."""

from __future__ import annotations

from dataclasses import replace

from quantcli.core.errors import QuantCliError
from quantcli.graph.model_io import load_model
from quantcli.modes.common import ConvertMode, matching_nodes
from quantcli.pipeline.context import ConvertContext, need
from quantcli.pipeline.inputs import opset_note, prepare_input

__all__ = ["load_and_check_mode", "mode_audit", "require_fused_kernels", "rewrite_mode"]

#: the oldest opset each mode can write
_MODE_MIN_OPSET = {ConvertMode.DYNAMIC: 11, ConvertMode.WEIGHT_ONLY: 7, ConvertMode.FP16: 7}
#: what each rewritten op must become in the optimized graph for ``require_fused``
_FUSED_KERNELS: dict[ConvertMode, dict[str, tuple[str, ...]]] = {
    ConvertMode.DYNAMIC: {
        "MatMulInteger": ("MatMulIntegerToFloat", "DynamicQuantizeMatMul"),
        "ConvInteger": ("ConvInteger",),
    },
    ConvertMode.WEIGHT_ONLY: {"MatMulNBits": ("MatMulNBits",)},
}


def load_and_check_mode(ctx: ConvertContext) -> None:
    """Load the model and check it against the mode's oldest opset (external weights stay in their
    files until read, as in ``steps.load_and_check``)."""
    r = ctx.request
    loaded = load_model(r.model_path, weights=False)
    ctx.model = prepare_input(loaded, r.model_path, upgrade_opset=r.upgrade_opset, min_opset=_MODE_MIN_OPSET[r.mode])
    ctx.opset_note = opset_note(loaded, ctx.model)


def rewrite_mode(ctx: ConvertContext) -> None:
    """Rewrite the pre-processed model in the request's mode (``exclude_nodes`` applies to every mode)."""
    from quantcli.modes.dynamic import DynamicOptions, quantize_dynamic
    from quantcli.modes.dynamic import default_options as default_dynamic_options
    from quantcli.modes.fp16 import convert_fp16
    from quantcli.modes.weight_only import WeightOnlyOptions, quantize_weight_only

    r, prepared = ctx.request, need(ctx.prepared, "the model")
    excluded = matching_nodes(prepared, ctx.config.exclude_nodes)
    if r.mode == ConvertMode.DYNAMIC:
        opts = r.mode_options if isinstance(r.mode_options, DynamicOptions) else default_dynamic_options()
        ctx.quantized, ctx.mode_report = quantize_dynamic(
            prepared, replace(opts, exclude_nodes=opts.exclude_nodes | excluded)
        )
    elif r.mode == ConvertMode.WEIGHT_ONLY:
        wopts = r.mode_options if isinstance(r.mode_options, WeightOnlyOptions) else WeightOnlyOptions()
        ctx.quantized, ctx.mode_report = quantize_weight_only(
            prepared, replace(wopts, exclude_nodes=wopts.exclude_nodes | excluded)
        )
    else:
        ctx.quantized, ctx.mode_report = convert_fp16(
            prepared, exclude_nodes=excluded, exclude_op_types=ctx.config.exclude_op_types
        )


def mode_audit(ctx: ConvertContext) -> None:
    """What onnxruntime runs for the converted model."""
    from quantcli.verify.audit import audit_fusion

    ctx.audit = audit_fusion(need(ctx.quantized, "the converted model"))


def require_fused_kernels(ctx: ConvertContext) -> None:
    """With ``require_fused``: every rewritten op became its fused kernel."""
    r = ctx.request
    if not r.require_fused or r.mode not in _FUSED_KERNELS:
        return
    counts = need(ctx.audit, "the audit").integer_op_counts()
    report = need(ctx.mode_report, "the mode report")
    for new_op, kernels in _FUSED_KERNELS[r.mode].items():
        wanted = sum(1 for _, _, new in report.converted if new == new_op)
        got = sum(counts.get(k, 0) for k in kernels)
        if got < wanted:
            raise QuantCliError(
                f"{r.model_path}: {wanted - got} of {wanted} {new_op} did not fuse into {'/'.join(kernels)}; "
                "see 'quantcli inspect' on the output"
            )
