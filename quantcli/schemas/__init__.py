"""The JSON documents quantcli writes (``--json``, ``quantcli.to_json``), and their JSON Schemas.

One document per command, each with a ``schema`` key naming its type and major version:
``quantcli.calibrate/1``, ``quantcli.convert/1``, ``quantcli.compare/1``, ``quantcli.inspect/1``. The
schema of ``quantcli.X/1`` is ``quantcli/schemas/X.schema.json`` (draft 2020-12). A new key is a minor
change (documents stay valid); renaming or removing one bumps the version.

Non-finite floats are written as null (JSON has no inf/NaN). Imports here stay light: the results are
only read, never built.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantcli import __version__

if TYPE_CHECKING:
    from quantcli.api import ModelSummary
    from quantcli.compare.evaluate import Interval, LatencyComparison
    from quantcli.compare.gates import GateResult
    from quantcli.compare.metrics import TaskMetric
    from quantcli.compare.output_kinds import KindMetrics
    from quantcli.compare.result import CompareResult
    from quantcli.pipeline.result import ConvertResult
    from quantcli.pipeline.verdict import Verdict
    from quantcli.static.plan import Skip
    from quantcli.stats.ranges import CalibrationResult
    from quantcli.verify.audit import FusionAudit

__all__ = [
    "CALIBRATE_SCHEMA",
    "COMPARE_SCHEMA",
    "CONVERT_SCHEMA",
    "INSPECT_SCHEMA",
    "SCHEMA_DIR",
    "audit_document",
    "calibrate_document",
    "compare_document",
    "convert_document",
    "inspect_document",
    "load_schema",
]

SCHEMA_DIR = Path(__file__).resolve().parent
CALIBRATE_SCHEMA = "quantcli.calibrate/1"
CONVERT_SCHEMA = "quantcli.convert/1"
COMPARE_SCHEMA = "quantcli.compare/1"
INSPECT_SCHEMA = "quantcli.inspect/1"


def load_schema(schema: str) -> dict[str, Any]:
    """The JSON Schema of a document type, e.g. ``load_schema("quantcli.convert/1")``."""
    name = schema.removeprefix("quantcli.").split("/")[0]
    return dict(json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text(encoding="utf-8")))


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _header(schema: str) -> dict[str, Any]:
    return {"schema": schema, "quantcli_version": __version__}


def calibrate_document(
    result: CalibrationResult, *, model_path: Path | None = None, output_path: Path | None = None
) -> dict[str, Any]:
    """The ``quantcli.calibrate/1`` document: what was calibrated, how, and what the ranges cut off.

    The ranges themselves are in the calibration file (``quantcli.calibration/1``), not repeated here.
    """
    clipped = sorted(
        name
        for name, r in result.ranges.items()
        if (r.observed_max - r.observed_min) > 0 and (r.max - r.min) < 0.999 * (r.observed_max - r.observed_min)
    )
    return {
        **_header(CALIBRATE_SCHEMA),
        "model": {"path": None if model_path is None else str(model_path), "sha256": result.model_sha256},
        "output": None if output_path is None else str(output_path),
        "method": {"kind": str(result.method), "params": dict(sorted(result.params.items()))},
        "num_samples": result.num_samples,
        "num_tensors": len(result.ranges),
        "clipped": clipped,
        "unobserved": list(result.unobserved),
        "nans": dict(sorted(result.nans.items())),
    }


def _skips(skipped: tuple[Skip, ...]) -> list[dict[str, Any]]:
    return [
        {"node": s.node, "op_type": s.op_type, "code": str(s.code), "reason": s.reason, "tensor": s.tensor}
        for s in skipped
    ]


def audit_document(audit: FusionAudit) -> dict[str, Any]:
    """What onnxruntime runs for a model: integer kernels, Q/DQ left, MACs, and every compute node."""
    return {
        "integer_kernels": audit.integer_op_counts(),
        "quantize_nodes": audit.quantize_nodes,
        "dequantize_nodes": audit.dequantize_nodes,
        "macs": {
            "total": audit.macs(),
            "integer": audit.macs(integer=True),
            "integer_share": audit.integer_mac_share(),
            "unknown_nodes": audit.unknown_mac_nodes,
        },
        "compute_nodes": [
            {
                "name": n.name,
                "op_type": n.op_type,
                "integer": n.integer,
                "kernel": n.kernel,
                "reason": n.reason,
                "macs": n.macs,
            }
            for n in audit.nodes
        ],
    }


def convert_document(
    result: ConvertResult, *, model_path: Path | None = None, name: Callable[[str], str] = str
) -> dict[str, Any]:
    """The ``quantcli.convert/1`` document: what was quantized, what stayed float and why, what runs, and
    the verdict (its texts name options by ``name``: the field by default, the CLI passes its flags)."""
    plan, mode_report = result.plan, result.mode_report
    cfg = plan.config if plan is not None else None
    search = result.search
    return {
        **_header(CONVERT_SCHEMA),
        "model": {"path": None if model_path is None else str(model_path), "bytes": result.input_bytes},
        "output": {"path": str(result.output_path), "bytes": result.output_bytes},
        "size_ratio": _finite(result.output_bytes / result.input_bytes if result.input_bytes else None),
        "mode": str(result.mode),
        "types": None
        if cfg is None
        else {
            "activation": str(cfg.activation_type),
            "weight": str(cfg.weight_type),
            "per_channel": cfg.per_channel,
            "reduce_range": cfg.reduce_range,
        },
        "quantized": plan.summary() if plan is not None else (mode_report.summary() if mode_report else {}),
        "skipped": _skips(plan.skipped if plan is not None else (mode_report.skipped if mode_report else ())),
        "calibration": None
        if result.calibration is None
        else {"method": str(result.calibration.method), "num_samples": result.calibration.num_samples},
        "audit": audit_document(result.audit),
        "search": None
        if search is None
        else {
            "trials": len(search.trials),
            "chosen_step": search.chosen.step,
            "float_nodes": sorted(search.chosen.candidate.float_nodes),
            "dynamic_nodes": sorted(search.chosen.candidate.dynamic_nodes),
            "accuracy": search.chosen.accuracy,
            "fp32_accuracy": search.fp32_accuracy,
        },
        "speed": None
        if result.speed is None
        else {
            "fp32_ms": result.speed.fp32_ms,
            "quantized_ms": result.speed.quantized_ms,
            "speedup": result.speed.speedup,
        },
        "recipe": None if result.recipe_path is None else str(result.recipe_path),
        "verdict": _verdict(result.verdict, name),
    }


def _verdict(verdict: Verdict | None, name: Callable[[str], str]) -> dict[str, Any] | None:
    if verdict is None:
        return None
    line, *rest = verdict.render(name)
    check = verdict.confirmation
    rest = rest[check is not None :]  # the confirmation's line has fields of its own
    speed = verdict.speed
    return {
        "passed": verdict.passed,
        "line": line,
        "warnings": rest[: len(verdict.warnings)],
        "unchecked": rest[len(verdict.warnings) :],
        "source": verdict.substitute(verdict.source, name),
        "num_samples": verdict.num_samples,
        "outputs": _kind_outputs(verdict.kinds),
        "metric": _task_metric(verdict.metric),
        "confirmation": None
        if check is None
        else {
            "line": verdict.substitute(check.line(), name),
            "source": verdict.substitute(check.source, name),
            "num_samples": check.num_samples,
            "outputs": _kind_outputs(check.kinds),
            "metric": _task_metric(check.metric),
        },
        "speed": None
        if speed is None
        else {"fp32_ms": speed.fp32_ms, "quantized_ms": speed.quantized_ms, "speedup": speed.speedup},
    }


def _task_metric(metric: TaskMetric | None) -> dict[str, Any] | None:
    if metric is None:
        return None
    return {"name": metric.name, "fp32": _finite(metric.reference), "quantized": _finite(metric.candidate)}


def _kind_outputs(kinds: tuple[KindMetrics, ...]) -> list[dict[str, Any]]:
    return [
        {
            "name": k.name,
            "kind": str(k.kind),
            "agreement": _finite(k.agreement),
            "cosine": _finite(k.cosine),
            "iou": _finite(k.iou),
            "sqnr_db": _finite(k.sqnr_db),
        }
        for k in kinds
    ]


def _interval(iv: Interval | None) -> dict[str, float] | None:
    if iv is None:
        return None
    return {"value": iv.value, "ci95_low": iv.low, "ci95_high": iv.high}


def _latency(lat: LatencyComparison) -> dict[str, Any]:
    def timing(t: Any) -> dict[str, Any]:
        return {
            "median": t.median_ms,
            "p90": t.p90_ms,
            "p99": t.p99_ms,
            "mean": t.mean_ms,
            "runs": t.runs,
            "throughput": t.throughput,
        }

    return {
        "batch_size": lat.batch_size,
        "threads": lat.threads,
        "reference_ms": timing(lat.reference),
        "candidate_ms": timing(lat.candidate),
        "speedup": {"median": lat.speedup, "p25": lat.speedup_p25, "p75": lat.speedup_p75},
    }


def compare_document(result: CompareResult, gates: list[GateResult] | None = None) -> dict[str, Any]:
    """The ``quantcli.compare/1`` document (documented in README.md)."""
    tm = result.task_metric
    return {
        **_header(COMPARE_SCHEMA),
        "reference": {"path": str(result.reference_path), "bytes": result.reference_bytes},
        "candidate": {"path": str(result.candidate_path), "bytes": result.candidate_bytes},
        "size_ratio": result.size_ratio,
        "data": {"path": str(result.data_path), "num_samples": result.num_samples},
        "outputs": [
            {
                "name": m.name,
                "num_samples": m.num_samples,
                "sqnr_db": _finite(m.sqnr_db),
                "cosine": _interval(m.cosine),
                "mse": m.mse,
                "max_abs_error": m.max_abs_error,
                "top1_agreement": _interval(m.top1_agreement),
                "accuracy_fp32": _interval(m.accuracy_fp32),
                "accuracy_quant": _interval(m.accuracy_quant),
            }
            for m in result.outputs
        ],
        "latency": [_latency(lat) for lat in result.latency],
        "integer_kernels": result.integer_kernels,
        "task_metric": None if tm is None else {"name": tm.name, "reference": tm.reference, "candidate": tm.candidate},
        "memory": {"reference_peak_mb": result.reference_peak_mb, "candidate_peak_mb": result.candidate_peak_mb},
        "layers": [
            {
                "tensor": e.tensor,
                "node": e.node,
                "op_type": e.op_type,
                "sqnr_db": _finite(e.sqnr_db),
                "local_sqnr_db": _finite(e.local_sqnr_db),
                "clip_range": [e.clip_low, e.clip_high],
                "observed_range": [e.observed_min, e.observed_max],
                "p999_abs": e.p999_abs,
                "hint": e.hint,
            }
            for e in result.layers
        ],
        "gates": [
            {"name": g.name, "passed": g.passed, "value": _finite(g.value), "bound": g.bound}
            | ({"output": g.output, "kind": g.kind} if g.kind is not None else {})
            for g in (gates or [])
        ],
        "output_kinds": [
            {
                "name": k.name,
                "kind": str(k.kind),
                "reason": k.reason,
                "num_samples": k.num_samples,
                "sqnr_db": _finite(k.sqnr_db),
                "agreement": k.agreement,
                "cosine": k.cosine,
                "iou": k.iou,
            }
            for k in result.kinds
        ],
    }


def inspect_document(result: ModelSummary) -> dict[str, Any]:
    """The ``quantcli.inspect/1`` document: size, parameters, op histogram, and what onnxruntime runs."""
    return {
        **_header(INSPECT_SCHEMA),
        "model": {"path": str(result.path), "bytes": result.num_bytes},
        "parameters": result.parameters,
        "nodes": result.num_nodes,
        "subgraphs": result.subgraphs,
        "ops": dict(result.op_counts),
        **audit_document(result.audit),
    }
