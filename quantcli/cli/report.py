"""Everything the user reads: Rich tables for the terminal and JSON documents for machines.

Output reads well at any width: the console is as wide as the terminal (``COLUMNS``, else the
terminal's size, else 120 columns when stdout is no terminal), and names a user copies (nodes,
tensors, files) are never wrapped or cut. A table is printed only if every word of every cell fits
whole at that width; otherwise its rows are printed as records, the name on its own line. Lines that
end in a name or a path are printed without wrapping (the terminal may fold them visually, but they
copy as one line); flags to paste are printed alone on their line.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from quantcli.api import ModelSummary
from quantcli.compare.evaluate import Interval
from quantcli.compare.gates import GateResult
from quantcli.compare.result import CompareResult
from quantcli.core.options import WeightClipping
from quantcli.graph.model_io import atomic_output
from quantcli.pipeline.result import ConvertResult
from quantcli.schemas import COMPARE_SCHEMA, compare_document
from quantcli.search.accuracy_search import SearchResult
from quantcli.static.plan import Skip, SkipCode, render_reason
from quantcli.stats.calibration import CalibrationResult
from quantcli.verify.audit import FusionAudit

__all__ = [
    "COMPARE_SCHEMA",
    "NOT_A_TERMINAL_WIDTH",
    "compare_to_json",
    "console_width",
    "emit_json",
    "fit_width",
    "hint_parts",
    "make_console",
    "print_table",
    "render_calibration",
    "render_compare",
    "render_convert",
    "render_gates",
    "render_inspect",
    "render_node_audits",
    "render_search",
    "write_json",
]

NOT_A_TERMINAL_WIDTH = 120  # CI logs and pipes: wide enough for most tables, narrow enough to read
STDOUT = Path("-")  # ``--json -``: the document goes to stdout


def console_width(stream: IO[str] | None = None) -> int:
    """Columns to render for: ``COLUMNS`` if set, else the terminal's width, else 120 (not a terminal)."""
    columns = os.environ.get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    stream = stream if stream is not None else sys.stdout
    try:
        if stream.isatty():
            return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor (tests, notebooks)
        pass
    return NOT_A_TERMINAL_WIDTH


def make_console(*, stderr: bool = False) -> Console:
    """A console for stdout (or stderr) as wide as ``console_width`` says (re-read by ``fit_width``)."""
    console = Console(highlight=False, soft_wrap=False, stderr=stderr)
    fit_width(console)
    return console


def fit_width(console: Console) -> None:
    """Set ``console``'s width from the environment now (the CLI calls it at the start of each command)."""
    console.width = console_width(console.file)


def _plain(cell: object) -> str:
    if isinstance(cell, Text):
        return cell.plain
    return Text.from_markup(cell).plain if isinstance(cell, str) else str(cell)


def _fits(console: Console, table: Table) -> bool:
    """True if every word of every cell of ``table`` shows whole when rendered at ``console``'s width."""
    probe = Console(file=io.StringIO(), width=console.width, color_system=None, highlight=False, legacy_windows=False)
    probe.print(table)
    text = probe.file.getvalue()  # type: ignore[attr-defined]
    cells = [cell for column in table.columns for cell in (column.header, *column.cells)]
    words = {w for cell in cells for w in _plain(cell).split()}
    return all(w in text for w in words)


def print_table(console: Console, table: Table) -> None:
    """``table`` if it fits whole, else its rows as records: the first cell alone on a line, then the others.

    A record reads ``name`` then ``header value; header value; ...`` indented (wrapped at spaces).
    Columns whose cells are single words (names, numbers) are marked ``no_wrap``: Rich then narrows
    the prose columns to make room instead of folding a name.
    """
    for column in table.columns:
        if all(len(_plain(cell).split()) <= 1 for cell in column.cells):
            column.no_wrap = True
    if _fits(console, table):
        console.print(table)
        return
    if table.title:
        console.print(table.title)
    headers = [_plain(c.header) for c in table.columns]
    cells = [list(c.cells) for c in table.columns]
    for row in range(table.row_count):
        first, *rest = (_plain(column[row]) for column in cells)
        console.print(Text(first, style="bold"), soft_wrap=True)
        fields = "; ".join(f"{h} {v}" for h, v in zip(headers[1:], rest, strict=True) if v)
        width = max(console.width - 2, 20)
        if any(len(word) > width for word in fields.split()):  # a name wider than the console: one long line
            console.print(Text("  " + fields), soft_wrap=True)
            continue
        for line in Text(fields).wrap(console, width):
            console.print(Text("  ") + line, soft_wrap=True)


def _say_path(console: Console, markup: str) -> None:
    """A line with a name or path in it: wrapped at spaces, unless a word is wider than the console.

    Rich breaks only words wider than the line; such a line is printed unwrapped instead, so it copies whole.
    """
    too_wide = any(len(word) > console.width for word in Text.from_markup(markup).plain.split())
    console.print(markup, soft_wrap=too_wide)


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
    if result.nans:
        console.print(nan_warning(result.nans), highlight=False, soft_wrap=True)  # one line, however long
    if result.unobserved:
        _say_path(
            console,
            f"[yellow]{len(result.unobserved)} tensors inside If/Loop/Scan subgraphs never ran on this data[/] "
            "(a branch it never took); they stay float: "
            + escape(", ".join(result.unobserved[:4]))
            + (" ..." if len(result.unobserved) > 4 else ""),
        )
    _say_path(console, f"wrote [bold]{escape(str(path))}[/]")


def nan_warning(nans: Mapping[str, int]) -> str:
    """One line naming the tensors that took NaN values (calibration leaves them out of the ranges)."""
    listed = sorted(nans.items(), key=lambda kv: (-kv[1], kv[0]))
    names = ", ".join(f"{escape(n)} ({c})" for n, c in listed[:4]) + (" ..." if len(listed) > 4 else "")
    return (
        f"[yellow]warning: {sum(nans.values())} NaN values left out of the ranges of {len(nans)} "
        f"activations[/]: {names}"
    )


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
        table.add_row(Text(op), str(n), Text(reason))
    print_table(console, table)


def _render_plan_skips(console: Console, skipped: Sequence[Skip]) -> None:
    """What stayed float, and apart from it the MatMuls whose activations are quantized at run time."""
    runtime = [s for s in skipped if s.code == SkipCode.RUNTIME_ACTIVATION]
    _render_skipped(console, "left in float", [s for s in skipped if s.code != SkipCode.RUNTIME_ACTIVATION])
    _render_skipped(console, "integer weights, activations quantized at run time", runtime)


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
    print_table(console, table)


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
            Text(t.action),
            "-" if t.accuracy is None else f"{t.accuracy:.2f}%",
            "-" if t.accuracy_drop is None else f"{t.accuracy_drop:.2f}",
            f"{t.sqnr_db:.1f}",
            f"{t.speedup_b1:.2f}x",
            str(len(t.candidate.float_nodes)),
            mark,
            style=style,
        )
    print_table(console, table)
    c = result.chosen
    fp32 = "" if result.fp32_accuracy is None else f" (FP32 {result.fp32_accuracy:.2f}%)"
    dynamic = len(c.candidate.dynamic_nodes)
    console.print(
        f"chosen: step {c.step}: method {c.candidate.method}{f' with {c.candidate.base}' if c.candidate.base else ''}, "
        f"{len(c.candidate.tensor_methods)} per-tensor "
        f"method(s), {len(c.candidate.float_nodes)} node(s) in float"
        f"{f', {dynamic} MatMul/Gemm quantized at run time' if dynamic else ''}"
        f"{fp32}; {c.speedup_b1:.2f}x FP32 at batch 1"
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
    if report.converted:
        print_table(console, table)
    else:
        console.print("rewritten nodes: none")
    audit = result.audit
    if audit.integer_kernel_count:
        _render_kernels(console, audit)
    console.print(
        f"[bold]{audit.integer_kernel_count}[/] integer kernels; "
        f"{len(audit.float_compute_nodes)} Conv/MatMul/Gemm run in float"
    )
    _render_skipped(console, "left unchanged", report.skipped)
    ratio = result.output_bytes / result.input_bytes if result.input_bytes else float("nan")
    _say_path(
        console,
        f"size: {_size(result.input_bytes)} -> {_size(result.output_bytes)} ({100 * ratio:.1f}%); "
        f"wrote [bold]{escape(str(result.output_path))}[/]",
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
        _say_path(
            console,
            f"[yellow]range:[/] '{escape(d.tensor)}' observed \\[{d.observed_min:.3g}, {d.observed_max:.3g}]: "
            f"{escape(d.decision)}",
        )
    _render_plan_skips(console, result.plan.skipped)
    if result.unknown_shapes:
        why = f" ({result.shape_inference_error})" if result.shape_inference_error else ""
        _say_path(
            console,
            f"shapes: onnx shape inference could not tell the shape of {len(result.unknown_shapes)} quantized "
            f"tensors{escape(why)}; calibration ran them, so they are quantized anyway: "
            + escape(", ".join(result.unknown_shapes[:5]))
            + (" ..." if len(result.unknown_shapes) > 5 else ""),
        )
    if result.speed is not None:
        console.print(result.speed.line())
    ratio = result.output_bytes / result.input_bytes if result.input_bytes else float("nan")
    _say_path(
        console,
        f"size: {_size(result.input_bytes)} -> {_size(result.output_bytes)} ({100 * ratio:.1f}%); "
        f"wrote [bold]{escape(str(result.output_path))}[/]",
    )
    if result.recipe_path is not None:
        _say_path(console, f"wrote recipe [bold]{escape(str(result.recipe_path))}[/] (replay with --recipe)")
    render_verdict(console, result)


def render_verdict(console: Console, result: ConvertResult) -> None:
    """The verdict's line, the confirmation's, then its warnings (yellow) and what it could not check."""
    from quantcli.cli.flags import flag

    verdict = result.verdict
    if verdict is None:
        return
    first, *rest = verdict.render(flag)
    console.print(escape(first), style=None if verdict.passed else "yellow")
    warnings = {verdict.substitute(text, flag) for text in verdict.warnings}
    for line in rest:
        console.print(f"[yellow]{escape(line)}[/]" if line in warnings else escape(line))


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
            Text(sub.path),
            ", ".join(f"{op} {n}" for op, n in sorted(ops.items())) or "-",
            str(len(sub.skipped)),
        )
    print_table(console, table)
    unobserved = result.calibration.unobserved if result.calibration is not None else []
    if unobserved:
        _say_path(
            console,
            f"[yellow]never ran during calibration:[/] {len(unobserved)} subgraph tensors (a branch or loop the "
            "data never took) stay float: "
            + escape(", ".join(unobserved[:4]))
            + (" ..." if len(unobserved) > 4 else ""),
        )


def render_compare(console: Console, result: CompareResult) -> None:
    """Accuracy, agreement, error and latency of quantized vs FP32."""
    table = Table(title=Text(f"accuracy on {result.num_samples} samples of {result.data_path}"), title_justify="left")
    for col in ("output", "FP32 acc", "quant acc", "top-1 agreement", "SQNR dB", "cosine", "max abs err"):
        table.add_column(col, justify="right" if col != "output" else "left")
    for m in result.outputs:
        table.add_row(
            Text(m.name),
            _pct(m.accuracy_fp32),
            _pct(m.accuracy_quant),
            _pct(m.top1_agreement),
            f"{m.sqnr_db:.1f}",
            f"{m.cosine.value:.5f}",
            f"{m.max_abs_error:.4g}",
        )
    print_table(console, table)
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
                f"{lat.speedup:.2f}x \\[{lat.speedup_p25:.2f}, {lat.speedup_p75:.2f}]",
            )
        print_table(console, table)
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


def hint_parts(hint: str) -> tuple[str, list[str]]:
    """A per-layer hint split into its prose and the flags it suggests, each exactly as typed.

    ``"this layer loses precision itself; try --exclude-nodes /a/b"`` gives
    ``("this layer loses precision itself", ["--exclude-nodes /a/b"])``.
    """
    prose, sep, suggestion = hint.partition("; try ")
    if not sep:
        return hint, []
    return prose, [part.strip() for part in suggestion.split(" or ") if part.strip().startswith("--")]


def render_layers(console: Console, result: CompareResult, top: int) -> None:
    """The ``top`` layers with the worst accumulated SQNR, with local SQNR and a hint.

    The flags a hint suggests follow the table, each alone on its line, so they paste as they are.
    """
    if not result.layers:
        return
    table = Table(
        title=f"per-layer error, worst {min(top, len(result.layers))} of {len(result.layers)} quantized tensors "
        "(accumulated = all upstream quantized; local = this layer alone on FP32 inputs)",
        title_justify="left",
    )
    for col in ("node", "op", "SQNR dB", "local dB", "clip range", "observed", "hint"):
        table.add_column(col, justify="right" if "dB" in col else "left")
    flags: list[str] = []
    for e in result.layers[:top]:
        prose, suggested = hint_parts(e.hint)
        flags += [f for f in suggested if f not in flags]
        table.add_row(
            Text(e.node),
            e.op_type,
            _db(e.sqnr_db),
            _db(e.local_sqnr_db),
            f"[{e.clip_low:.3g}, {e.clip_high:.3g}]",
            f"[{e.observed_min:.3g}, {e.observed_max:.3g}]",
            Text(prose + (" (flags below)" if suggested else "")),
        )
    print_table(console, table)
    if flags:
        console.print("flags the hints suggest for 'quantcli convert' (one per line, as typed):")
        for flag in flags:
            console.print(Text(f"  {flag}"), soft_wrap=True)


def render_gates(console: Console, gates: list[GateResult]) -> None:
    """One line per gate; failed gates in red with value and bound."""
    for g in gates:
        mark = "[green]pass[/]" if g.passed else "[red]FAIL[/]"
        console.print(f"gate {g.name}: {mark} ({g.describe()})")


compare_to_json = compare_document  # the ``quantcli.compare/1`` document (``quantcli.schemas``)


def write_json(doc: dict[str, Any], path: Path, *, force: bool = True) -> None:
    """Write a JSON document atomically; ``-`` writes it to stdout."""
    text = json.dumps(doc, indent=1, sort_keys=False) + "\n"
    if Path(path) == STDOUT:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with atomic_output(Path(path), force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")


def emit_json(console: Console, doc: dict[str, Any], path: Path | None) -> None:
    """Write ``doc`` to ``path`` (``-``: stdout) and say so on ``console``; nothing when ``path`` is None."""
    if path is None:
        return
    write_json(doc, path)
    if Path(path) != STDOUT:
        _say_path(console, f"wrote [bold]{escape(str(path))}[/]")


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
            table.add_column(col, justify="right" if col == "MACs" else "left")
        for n in audit.nodes:
            table.add_row(Text(n.name), n.op_type, n.kernel, "?" if n.macs is None else _macs(n.macs), Text(n.status))
        print_table(console, table)
        return
    groups = audit.float_groups()  # by the plan's reason code where the plan left the node float
    if not groups:
        return
    table = Table(title="Conv/MatMul/Gemm left in float, by reason", title_justify="left")
    for col in ("float, because", "nodes", "MACs", "largest node"):
        table.add_column(col, justify="right" if col in ("nodes", "MACs") else "left")
    ordered = sorted(groups.values(), key=lambda group: -sum(n.macs or 0 for n in group[1]))
    for reason, nodes in ordered:
        macs = sum(n.macs or 0 for n in nodes)
        largest = max(nodes, key=lambda n: n.macs or 0)
        share = f"{100 * macs / total:.1f}%" if total else "?"
        if total and any(n.macs is None for n in nodes):
            share += " + ?"
        table.add_row(Text(reason), str(len(nodes)), share, Text(largest.name))
    print_table(console, table)


def render_inspect(console: Console, summary: ModelSummary, *, verbose: bool = False) -> None:
    """Op histogram, parameters and size of a model, and what onnxruntime runs for it."""
    audit = summary.audit
    nested = f" ({summary.subgraphs} If/Loop/Scan subgraphs included)" if summary.subgraphs else ""
    _say_path(
        console,
        f"[bold]{escape(str(summary.path))}[/]: {_size(summary.num_bytes)}, {summary.parameters:,} parameters, "
        f"{summary.num_nodes} nodes{nested}",
    )
    console.print("ops: " + ", ".join(f"{op} {n}" for op, n in summary.op_counts.items()))
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

    emit_json(console, compare_document(result, gates), json_path)
    if markdown_path is not None:
        write_text(compare_to_markdown(result, gates, top=top), markdown_path)
        _say_path(console, f"wrote [bold]{escape(str(markdown_path))}[/]")
    if html_path is not None:
        write_text(html_report.render_html(result, gates), html_path)
        _say_path(console, f"wrote [bold]{escape(str(html_path))}[/]")
