"""Everything the user reads: Rich tables for the terminal and JSON documents for machines."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from quantcli import __version__
from quantcli.compare.evaluate import Interval
from quantcli.compare.gates import GateResult
from quantcli.compare.result import CompareResult
from quantcli.core.options import WeightClipping
from quantcli.graph.model import atomic_output
from quantcli.graph.subgraphs import walk_graphs
from quantcli.pipeline.result import ConvertResult
from quantcli.search.accuracy_search import SearchResult
from quantcli.static.plan import Skip, SkipCode, render_reason
from quantcli.stats.calibration import CalibrationResult
from quantcli.verify.audit import FusionAudit, NodeAudit

__all__ = [
    "COMPARE_SCHEMA",
    "compare_to_json",
    "render_calibration",
    "render_compare",
    "render_convert",
    "render_gates",
    "render_inspect",
    "render_node_audits",
    "render_search",
    "write_json",
]

COMPARE_SCHEMA = "quantcli.compare/1"


def _size(num_bytes: int) -> str:
    if num_bytes >= 1 << 20:
        return f"{num_bytes / (1 << 20):.2f} MiB"
    return f"{num_bytes / 1024:.1f} KiB"


def _pct(iv: Interval | None) -> str:
    if iv is None:
        return "-"
    return f"{100 * iv.value:.2f}% [{100 * iv.low:.1f}, {100 * iv.high:.1f}]"


def render_calibration(console: Console, result: CalibrationResult, path: Path) -> None:
    """Summary of a calibration run."""
    params = ", ".join(f"{k}={v}" for k, v in sorted(result.params.items()))
    console.print(
        f"calibrated [bold]{len(result.ranges)}[/] activations on {result.num_samples} samples "
        f"with [bold]{result.method}[/] ({params})"
    )
    clipped = [
        (name, r)
        for name, r in result.ranges.items()
        if (r.observed_max - r.observed_min) > 0 and (r.max - r.min) < 0.999 * (r.observed_max - r.observed_min)
    ]
    if clipped:
        console.print(f"{len(clipped)} ranges clipped below the observed min/max by the {result.method} method")
    if result.unobserved:
        console.print(
            f"[yellow]{len(result.unobserved)} tensors inside If/Loop/Scan subgraphs never ran on this data[/] "
            "(a branch it never took); they stay float: "
            + ", ".join(result.unobserved[:4])
            + (" ..." if len(result.unobserved) > 4 else "")
        )
    console.print(f"wrote [bold]{path}[/]")


def _render_skipped(console: Console, title: str, skipped: Iterable[Skip]) -> None:
    """Nodes left alone, grouped by op type and reason code, most frequent first.

    A group shows its reason when its nodes share it, else the code's sentence with the tensor or
    detail that differs elided ("input '…' is not a calibrated float activation").
    """
    groups: dict[tuple[str, SkipCode], list[Skip]] = {}
    for s in skipped:
        groups.setdefault((s.op_type, s.code), []).append(s)
    if not groups:
        return
    table = Table(title=title, title_justify="left")
    table.add_column("op type")
    table.add_column("nodes", justify="right")
    table.add_column("why")
    rows = [(op, len(group), _group_reason(code, group)) for (op, code), group in groups.items()]
    for op, n, reason in sorted(rows, key=lambda row: (-row[1], row[0], row[2])):
        table.add_row(op, str(n), reason)
    console.print(table)


def _group_reason(code: SkipCode, group: list[Skip]) -> str:
    """The reason shared by ``group``, or the code's sentence with what differs elided."""
    reasons = {s.reason for s in group}
    if len(reasons) == 1:
        return reasons.pop()
    details = {s.detail for s in group}
    tensors = {s.tensor for s in group}
    return render_reason(
        code,
        details.pop() if len(details) == 1 else "…",
        tensors.pop() if len(tensors) == 1 else "…",
    )


def _render_kernels(console: Console, audit: FusionAudit) -> None:
    """The integer kernels in onnxruntime's optimized graph, per op type."""
    console.print("after onnxruntime optimization (what actually runs):")
    table = Table()
    table.add_column("integer kernel")
    table.add_column("count", justify="right")
    for op, n in audit.integer_op_counts().items():
        table.add_row(op, str(n))
    console.print(table)


def render_search(console: Console, result: SearchResult) -> None:
    """The trials of an accuracy-driven search: what each step changed, and what it cost."""
    shown = [t for t in result.trials if t.kept or t.step == result.chosen.step]
    title = (
        f"accuracy search ({result.budget.describe()}): {len(result.trials)} trials on "
        f"{result.num_samples} samples, the {len(shown)} steps kept shown"
    )
    table = Table(title=title, title_justify="left")
    for col in ("step", "stage", "change", "top-1", "drop", "SQNR dB", "vs FP32 b1", "float", "budget"):
        table.add_column(col, justify="left" if col in ("stage", "change") else "right")
    for t in shown:
        mark = "[green]met[/]" if t.meets_budget else "[red]missed[/]"
        style = "bold" if t.step == result.chosen.step else ""
        table.add_row(
            str(t.step),
            t.stage,
            escape(t.action if len(t.action) <= 60 else t.action[:57] + "..."),
            "-" if t.accuracy is None else f"{t.accuracy:.2f}%",
            "-" if t.accuracy_drop is None else f"{t.accuracy_drop:.2f}",
            f"{t.sqnr_db:.1f}",
            f"{t.speedup_b1:.2f}x",
            str(len(t.candidate.float_nodes)),
            mark,
            style=style,
        )
    console.print(table)
    c = result.chosen
    fp32 = "" if result.fp32_accuracy is None else f" (FP32 {result.fp32_accuracy:.2f}%)"
    console.print(
        f"chosen: step {c.step}: method {c.candidate.method}{f' with {c.candidate.base}' if c.candidate.base else ''}, "
        f"{len(c.candidate.tensor_methods)} per-tensor "
        f"method(s), {len(c.candidate.float_nodes)} node(s) in float{fp32}; {c.speedup_b1:.2f}x FP32 at batch 1"
    )
    if c.speedup_b1 < 1.0:
        console.print("[yellow]the chosen model is not faster than FP32 at batch 1 on this host[/]")


def _render_mode(console: Console, result: ConvertResult) -> None:
    """render_convert for --mode dynamic / weight-only / fp16."""
    report = result.mode_report
    assert report is not None
    for line in result.preprocess.lines():
        console.print(f"pre-processing: {line}")
    console.print(f"mode: [bold]{report.mode}[/]")
    for note in report.notes:
        console.print(note)
    table = Table(title="rewritten nodes", title_justify="left")
    table.add_column("op type")
    table.add_column("count", justify="right")
    for what, n in report.summary().items():
        table.add_row(what, str(n))
    console.print(table if report.converted else "rewritten nodes: none")
    audit = result.audit
    if audit.integer_kernel_count:
        _render_kernels(console, audit)
    console.print(
        f"[bold]{audit.integer_kernel_count}[/] integer kernels; "
        f"{len(audit.float_compute_nodes)} Conv/MatMul/Gemm run in float"
    )
    _render_skipped(console, "left unchanged", report.skipped)
    ratio = result.output_bytes / result.input_bytes if result.input_bytes else float("nan")
    console.print(
        f"size: {_size(result.input_bytes)} -> {_size(result.output_bytes)} ({100 * ratio:.1f}%); "
        f"wrote [bold]{result.output_path}[/]"
    )
    render_verdict(console, result)


def render_convert(console: Console, result: ConvertResult) -> None:
    """What convert quantized, what onnxruntime fused, and what stayed float."""
    if result.opset_note is not None:
        console.print(f"input: {result.opset_note}")
    if result.plan is None:
        _render_mode(console, result)
        return
    if result.search is not None:
        render_search(console, result.search)
    for line in result.preprocess.lines():
        console.print(f"pre-processing: {line}")
    for algorithm in result.algorithms:
        for line in algorithm.lines():
            console.print(line)
    cfg = result.plan.config
    if cfg.weight_clipping == WeightClipping.MSE:
        console.print("weight clipping: each channel's clip ratio (0.5-1.0) chosen for least weight MSE")
    console.print(
        f"types: {cfg.activation_type} activations, {cfg.weight_type} weights"
        f"{' (7-bit: --reduce-range)' if cfg.reduce_range else ''}, "
        f"{'per-channel' if cfg.per_channel else 'per-tensor'} Conv/Gemm weights"
    )
    quantized = ", ".join(f"{op} {n}" for op, n in result.plan.summary().items()) or "nothing"
    console.print(f"quantized nodes: {quantized}")
    if result.plan.folded:
        console.print(f"folded {len(result.plan.folded)} Relu/Clip into their producers' quantization ranges")
    if result.plan.rescaled:
        console.print(
            f"{len(result.plan.rescaled)} Mul/Div by a positive scalar folded into a DequantizeLinear scale (no kernel)"
        )
    if result.plan.hard:
        console.print(
            f"{len(result.plan.hard)} HardSigmoid/HardSwish run on integers (QLinearAdd re-quantized to the hard "
            "sigmoid's grid, plus a QLinearMul for HardSwish)"
        )
    if result.plan.embeddings:
        console.print(
            f"{len(result.plan.embeddings)} embedding tables stored as int8 (weight-only): rows are gathered "
            "as int8 and scaled after the Gather"
        )
    if result.plan.recurrent:
        console.print(f"{len(result.plan.recurrent)} LSTM run as DynamicQuantizeLSTM (int8 weights, float state)")
    _render_subgraphs(console, result)
    audit = result.audit
    _render_kernels(console, audit)
    console.print(
        f"[bold]{audit.integer_kernel_count}[/] integer kernels; "
        f"{len(audit.float_compute_nodes)} Conv/MatMul/Gemm left in float; "
        f"{audit.quantize_nodes} QuantizeLinear and {audit.dequantize_nodes} DequantizeLinear remain"
    )
    console.print(_mac_line(audit))
    render_node_audits(console, audit, verbose=False)
    for d in result.plan.range_decisions:
        console.print(
            f"[yellow]range:[/] '{d.tensor}' observed [{d.observed_min:.3g}, {d.observed_max:.3g}]: {d.decision}"
        )
    _render_skipped(console, "left in float", result.plan.skipped)
    if result.unknown_shapes:
        why = f" ({result.shape_inference_error})" if result.shape_inference_error else ""
        console.print(
            f"shapes: onnx shape inference could not tell the shape of {len(result.unknown_shapes)} quantized "
            f"tensors{why}; calibration ran them, so they are quantized anyway: "
            + ", ".join(result.unknown_shapes[:5])
            + (" ..." if len(result.unknown_shapes) > 5 else "")
        )
    if result.speed is not None:
        console.print(result.speed.line())
    ratio = result.output_bytes / result.input_bytes if result.input_bytes else float("nan")
    console.print(
        f"size: {_size(result.input_bytes)} -> {_size(result.output_bytes)} ({100 * ratio:.1f}%); "
        f"wrote [bold]{result.output_path}[/]"
    )
    if result.recipe_path is not None:
        console.print(f"wrote recipe [bold]{result.recipe_path}[/] (replay with --recipe)")
    render_verdict(console, result)


def render_verdict(console: Console, result: ConvertResult) -> None:
    """The verdict's line, then its warnings (yellow) and what it could not check."""
    from quantcli.cli.flags import flag

    if result.verdict is None:
        return
    first, *rest = result.verdict.render(flag)
    console.print(escape(first), style=None if result.verdict.passed else "yellow")
    for line in rest:
        console.print(f"[yellow]{escape(line)}[/]" if line.startswith("verdict:") else escape(line))


def _short_path(path: str, width: int = 60) -> str:
    return path if len(path) <= width else f"{path[: width // 3]}...{path[-(2 * width) // 3 :]}"


def _render_subgraphs(console: Console, result: ConvertResult) -> None:
    """Per If/Loop/Scan subgraph: what was quantized, and what calibration never saw."""
    if result.plan is None:
        return
    subgraphs = [s for s in result.plan.subgraphs if s.quantized_nodes or s.skipped]
    if not subgraphs:
        return
    table = Table(title="inside If/Loop/Scan subgraphs", title_justify="left")
    table.add_column("subgraph")
    table.add_column("quantized")
    table.add_column("left float", justify="right")
    for sub in subgraphs:
        ops = Counter(op for _, op in sub.quantized_nodes)
        table.add_row(
            _short_path(sub.path),
            ", ".join(f"{op} {n}" for op, n in sorted(ops.items())) or "-",
            str(len(sub.skipped)),
        )
    console.print(table)
    unobserved = result.calibration.unobserved if result.calibration is not None else []
    if unobserved:
        console.print(
            f"[yellow]never ran during calibration:[/] {len(unobserved)} subgraph tensors (a branch or loop the "
            "data never took) stay float: " + ", ".join(unobserved[:4]) + (" ..." if len(unobserved) > 4 else "")
        )


def render_compare(console: Console, result: CompareResult) -> None:
    """Accuracy, agreement, error and latency of quantized vs FP32."""
    table = Table(title=f"accuracy on {result.num_samples} samples of {result.data_path}", title_justify="left")
    for col in ("output", "FP32 acc", "quant acc", "top-1 agreement", "SQNR dB", "cosine", "max abs err"):
        table.add_column(col, justify="right" if col != "output" else "left")
    for m in result.outputs:
        table.add_row(
            m.name,
            _pct(m.accuracy_fp32),
            _pct(m.accuracy_quant),
            _pct(m.top1_agreement),
            f"{m.sqnr_db:.1f}",
            f"{m.cosine.value:.5f}",
            f"{m.max_abs_error:.4g}",
        )
    console.print(table)
    for k in result.kinds:
        console.print(f"output {escape(k.summary())}")
    if result.latency:
        threads = result.latency[0].threads
        table = Table(
            title=f"latency (ms, {threads} thread{'s' if threads != 1 else ''}, runs alternate)",
            title_justify="left",
        )
        for col in ("batch", "FP32 median", "FP32 p90", "quant median", "quant p90", "speed-up [IQR]"):
            table.add_column(col, justify="right")
        for lat in result.latency:
            table.add_row(
                str(lat.batch_size),
                f"{lat.reference.median_ms:.3f}",
                f"{lat.reference.p90_ms:.3f}",
                f"{lat.candidate.median_ms:.3f}",
                f"{lat.candidate.p90_ms:.3f}",
                f"{lat.speedup:.2f}x [{lat.speedup_p25:.2f}, {lat.speedup_p75:.2f}]",
            )
        console.print(table)
    if result.task_metric is not None:
        tm = result.task_metric
        console.print(f"task metric {tm.name}: FP32 {tm.reference:.5g}, quantized {tm.candidate:.5g}")
    if result.reference_peak_mb is not None and result.candidate_peak_mb is not None:
        console.print(
            f"peak memory of a session (load + run, child process): FP32 {result.reference_peak_mb:.1f} MiB, "
            f"quantized {result.candidate_peak_mb:.1f} MiB"
        )
    kernels = ", ".join(f"{op} {n}" for op, n in result.integer_kernels.items()) or "none"
    console.print(
        f"size: {_size(result.reference_bytes)} -> {_size(result.candidate_bytes)} "
        f"({100 * result.size_ratio:.1f}%); integer kernels: {kernels}"
    )


def _db(x: float | None) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) and x > 0 else f"{x:.1f}"


def render_layers(console: Console, result: CompareResult, top: int) -> None:
    """The ``top`` layers with the worst accumulated SQNR, with local SQNR and a hint."""
    if not result.layers:
        return
    table = Table(
        title=f"per-layer error, worst {min(top, len(result.layers))} of {len(result.layers)} quantized tensors "
        "(accumulated = all upstream quantized; local = this layer alone on FP32 inputs)",
        title_justify="left",
    )
    for col in ("node", "op", "SQNR dB", "local dB", "clip range", "observed", "hint"):
        table.add_column(col, justify="right" if "dB" in col else "left", overflow="fold")
    for e in result.layers[:top]:
        table.add_row(
            e.node,
            e.op_type,
            _db(e.sqnr_db),
            _db(e.local_sqnr_db),
            f"[{e.clip_low:.3g}, {e.clip_high:.3g}]",
            f"[{e.observed_min:.3g}, {e.observed_max:.3g}]",
            e.hint,
        )
    console.print(table)


def render_gates(console: Console, gates: list[GateResult]) -> None:
    """One line per gate; failed gates in red with value and bound."""
    for g in gates:
        mark = "[green]pass[/]" if g.passed else "[red]FAIL[/]"
        console.print(f"gate {g.name}: {mark} ({g.describe()})")


def _interval(iv: Interval | None) -> dict[str, float] | None:
    if iv is None:
        return None
    return {"value": iv.value, "ci95_low": iv.low, "ci95_high": iv.high}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def compare_to_json(result: CompareResult, gates: list[GateResult] | None = None) -> dict[str, Any]:
    """The ``quantcli.compare/1`` JSON document (documented in README.md)."""
    return {
        "schema": COMPARE_SCHEMA,
        "quantcli_version": __version__,
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
        "latency": [
            {
                "batch_size": lat.batch_size,
                "threads": lat.threads,
                "reference_ms": {
                    "median": lat.reference.median_ms,
                    "p90": lat.reference.p90_ms,
                    "p99": lat.reference.p99_ms,
                    "mean": lat.reference.mean_ms,
                    "runs": lat.reference.runs,
                    "throughput": lat.reference.throughput,
                },
                "candidate_ms": {
                    "median": lat.candidate.median_ms,
                    "p90": lat.candidate.p90_ms,
                    "p99": lat.candidate.p99_ms,
                    "mean": lat.candidate.mean_ms,
                    "runs": lat.candidate.runs,
                    "throughput": lat.candidate.throughput,
                },
                "speedup": {"median": lat.speedup, "p25": lat.speedup_p25, "p75": lat.speedup_p75},
            }
            for lat in result.latency
        ],
        "integer_kernels": result.integer_kernels,
        "task_metric": None
        if result.task_metric is None
        else {
            "name": result.task_metric.name,
            "reference": result.task_metric.reference,
            "candidate": result.task_metric.candidate,
        },
        "memory": {"reference_peak_mb": result.reference_peak_mb, "candidate_peak_mb": result.candidate_peak_mb},
        "layers": [
            {
                "tensor": e.tensor,
                "node": e.node,
                "op_type": e.op_type,
                "sqnr_db": _finite(e.sqnr_db),
                "local_sqnr_db": None if e.local_sqnr_db is None else _finite(e.local_sqnr_db),
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


def write_json(doc: dict[str, Any], path: Path, *, force: bool = True) -> None:
    """Write a JSON document atomically."""
    with atomic_output(Path(path), force=force) as tmp:
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n", encoding="utf-8")


def _macs(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def _mac_line(audit: FusionAudit) -> str:
    """Share of Conv/MatMul/Gemm MACs in integer kernels, one line."""
    if not audit.nodes:
        return "no Conv/ConvTranspose/MatMul/Gemm nodes"
    share = audit.integer_mac_share()
    unknown = audit.unknown_mac_nodes
    hint = (
        f"; MACs unknown for {unknown} of {len(audit.nodes)} nodes (dynamic shapes: give a sample with --data)"
        if unknown
        else ""
    )
    if share is None:
        return f"integer share of MACs: unknown{hint}"
    eligible = audit.integer_mac_share(eligible=True)
    extra = (
        f" ({100 * eligible:.1f}% of the MACs whose op has an integer kernel)"
        if eligible is not None and abs(eligible - share) > 5e-4
        else ""
    )
    integer = sum(1 for n in audit.nodes if n.integer)
    return (
        f"integer kernels run [bold]{100 * share:.1f}%[/] of Conv/MatMul/Gemm MACs"
        f"{' with known shapes' if unknown else ''}{extra}: "
        f"{_macs(audit.macs(integer=True))} of {_macs(audit.macs())} MACs per sample, "
        f"{integer} of {len(audit.nodes)} nodes{hint}"
    )


def render_node_audits(console: Console, audit: FusionAudit, *, verbose: bool) -> None:
    """Why compute nodes stayed float, grouped by reason; with ``verbose`` one row per compute node."""
    total = audit.macs()
    if verbose and audit.nodes:
        table = Table(title="compute nodes (model order)", title_justify="left")
        for col in ("node", "op", "runs as", "MACs", "status"):
            table.add_column(col, justify="right" if col == "MACs" else "left", overflow="fold")
        for n in audit.nodes:
            table.add_row(n.name, n.op_type, n.kernel, "?" if n.macs is None else _macs(n.macs), n.status)
        console.print(table)
        return
    groups: dict[str, list[NodeAudit]] = {}
    for n in audit.float_nodes():
        groups.setdefault(n.reason_kind, []).append(n)
    if not groups:
        return
    table = Table(title="Conv/MatMul/Gemm left in float, by reason", title_justify="left")
    for col in ("float, because", "nodes", "MACs", "largest node"):
        table.add_column(col, justify="right" if col in ("nodes", "MACs") else "left", overflow="fold")
    ordered = sorted(groups.items(), key=lambda kv: -sum(n.macs or 0 for n in kv[1]))
    for reason, nodes in ordered:
        macs = sum(n.macs or 0 for n in nodes)
        largest = max(nodes, key=lambda n: n.macs or 0)
        share = f"{100 * macs / total:.1f}%" if total else "?"
        if total and any(n.macs is None for n in nodes):
            share += " + ?"
        table.add_row(reason, str(len(nodes)), share, largest.name)
    console.print(table)


def render_inspect(console: Console, path: Path, model: Any, audit: FusionAudit, *, verbose: bool = False) -> None:
    """Op histogram, parameters and size of a model, and what onnxruntime runs for it."""
    import numpy as np

    graphs = [g for _, g in walk_graphs(model.graph)]
    params = sum(int(np.prod(t.dims)) for g in graphs for t in g.initializer)
    constants = [
        a.t for g in graphs for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
    ]
    params += sum(int(np.prod(t.dims)) for t in constants)
    ops = Counter(n.op_type for g in graphs for n in g.node)
    nested = f" ({len(graphs) - 1} If/Loop/Scan subgraphs included)" if len(graphs) > 1 else ""
    console.print(
        f"[bold]{path}[/]: {_size(path.stat().st_size)}, {params:,} parameters, {sum(ops.values())} nodes{nested}"
    )
    console.print("ops: " + ", ".join(f"{op} {n}" for op, n in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))))
    kernels = ", ".join(f"{op} {n}" for op, n in audit.integer_op_counts().items()) or "none"
    console.print(f"after onnxruntime optimization: integer kernels: {kernels}")
    console.print(
        f"{len(audit.float_compute_nodes)} Conv/MatMul/Gemm in float; "
        f"{audit.quantize_nodes} QuantizeLinear, {audit.dequantize_nodes} DequantizeLinear"
    )
    console.print(_mac_line(audit))
    render_node_audits(console, audit, verbose=verbose)


def compare_to_markdown(result: CompareResult, gates: list[GateResult], *, top: int = 10) -> str:
    """A pull-request comment: verdict first, then accuracy, latency, size and the worst layers."""
    failed = [g for g in gates if not g.passed]
    verdict = "❌ **quantized model fails its gates**" if failed else "✅ **quantized model passes its gates**"
    if not gates:
        verdict = "ℹ️ no gates were set"
    lines = [f"### quantcli compare: `{result.candidate_path.name}` vs `{result.reference_path.name}`", "", verdict, ""]
    for g in gates:
        lines.append(f"- {'✅' if g.passed else '❌'} `{g.name}`: {g.describe()}")
    lines += ["", f"Accuracy on {result.num_samples} samples of `{result.data_path.name}` (95% CI):", ""]
    lines += [
        "| output | FP32 acc | quant acc | top-1 agreement | SQNR dB | cosine | max abs err |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in result.outputs:
        lines.append(
            f"| {m.name} | {_pct(m.accuracy_fp32)} | {_pct(m.accuracy_quant)} | {_pct(m.top1_agreement)} | "
            f"{_db(m.sqnr_db)} | {m.cosine.value:.5f} | {m.max_abs_error:.4g} |"
        )
    if result.latency:
        lines += ["", f"Latency (ms, {result.latency[0].threads} thread(s), runs alternate):", ""]
        lines += ["| batch | FP32 median | quant median | speed-up [IQR] |", "|---|---|---|---|"]
        for lat in result.latency:
            lines.append(
                f"| {lat.batch_size} | {lat.reference.median_ms:.3f} | {lat.candidate.median_ms:.3f} | "
                f"{lat.speedup:.2f}x [{lat.speedup_p25:.2f}, {lat.speedup_p75:.2f}] |"
            )
    lines += [
        "",
        f"Size: {_size(result.reference_bytes)} → {_size(result.candidate_bytes)} "
        f"({100 * result.size_ratio:.1f}%). Integer kernels: "
        + (", ".join(f"{op} {n}" for op, n in result.integer_kernels.items()) or "none"),
    ]
    if result.layers:
        lines += ["", f"Worst layers (of {len(result.layers)}):", ""]
        lines += ["| node | op | SQNR dB | local dB | hint |", "|---|---|---|---|---|"]
        for e in result.layers[:top]:
            lines.append(f"| `{e.node}` | {e.op_type} | {_db(e.sqnr_db)} | {_db(e.local_sqnr_db)} | {e.hint} |")
    return "\n".join(lines) + "\n"


def write_text(text: str, path: Path) -> None:
    """Write a text report atomically."""
    with atomic_output(Path(path), force=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


def render_comparison(console: Console, result: CompareResult, gates: list[GateResult], *, top: int) -> None:
    """The comparison, its worst layers and the gates' verdicts, as ``compare`` prints them."""
    render_compare(console, result)
    render_layers(console, result, top)
    render_gates(console, gates)


def write_comparison(
    console: Console,
    result: CompareResult,
    gates: list[GateResult],
    *,
    top: int,
    json_path: Path | None,
    markdown_path: Path | None,
    html_path: Path | None,
) -> None:
    """Write the comparison as JSON, a pull-request comment and an HTML page, where asked."""
    from quantcli.cli import html_report

    if json_path is not None:
        write_json(compare_to_json(result, gates), json_path)
        console.print(f"wrote [bold]{json_path}[/]")
    if markdown_path is not None:
        write_text(compare_to_markdown(result, gates, top=top), markdown_path)
        console.print(f"wrote [bold]{markdown_path}[/]")
    if html_path is not None:
        write_text(html_report.render_html(result, gates), html_path)
        console.print(f"wrote [bold]{html_path}[/]")
