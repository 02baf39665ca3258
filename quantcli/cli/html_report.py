"""A self-contained HTML report of a comparison: verdict, tables, and plots drawn as inline SVG.

No JavaScript, no external files, no plotting library: the page opens anywhere, including as a
CI artifact. Plots: per-layer SQNR bars (accumulated and local), FP32 activation histograms of the
worst layers with the quantization clip range drawn over them, and latency distributions.
"""

from __future__ import annotations

import html
import math

from quantcli.compare.gates import GateResult
from quantcli.compare.layers import LayerError
from quantcli.compare.result import CompareResult

__all__ = ["render_html"]

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#1d2430}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde3ea;padding-bottom:4px}
table{border-collapse:collapse;margin:6px 0} td,th{padding:4px 10px;border-bottom:1px solid #e8edf2;text-align:right}
td:first-child,th:first-child{text-align:left} th{background:#f5f7fa}
.pass{color:#1a7f37;font-weight:600} .fail{color:#cf222e;font-weight:600} .muted{color:#6b7785}
.verdict{font-size:18px;padding:10px 14px;border-radius:6px;margin:12px 0}
.ok{background:#e6f4ea} .bad{background:#fdecea} .info{background:#eef3f8}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:12px}
.card{border:1px solid #e1e6ec;border-radius:6px;padding:8px}
code{background:#f2f4f7;padding:1px 4px;border-radius:3px}
"""


def _e(text: object) -> str:
    return html.escape(str(text))


def _db(x: float | None) -> str:
    if x is None:
        return "-"
    return "∞" if math.isinf(x) else f"{x:.1f}"


def _sqnr_bars(layers: list[LayerError], limit: int = 40) -> str:
    shown = layers[:limit]
    if not shown:
        return ""
    finite = [v for e in shown for v in (e.sqnr_db, e.local_sqnr_db) if v is not None and math.isfinite(v)]
    top = max(max(finite, default=40.0), 10.0)
    row, left, width = 18, 360, 520
    height = row * len(shown) + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 60}" height="{height}" role="img">']
    for tick in range(0, int(top) + 1, 10):
        x = left + width * tick / top
        parts.append(f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{height - 20}" stroke="#e5e9ee"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{height - 6}" font-size="11" text-anchor="middle" fill="#6b7785">{tick} dB</text>'
        )
    for i, e in enumerate(shown):
        y = i * row + 4
        label = e.node if len(e.node) <= 48 else "…" + e.node[-47:]
        parts.append(
            f'<text x="{left - 6}" y="{y + 11}" font-size="11" text-anchor="end">{_e(label)} ({_e(e.op_type)})</text>'
        )
        for value, color, dy, h in (
            (e.sqnr_db, "#cf222e" if e.sqnr_db < 20 else "#d29922" if e.sqnr_db < 30 else "#2da44e", 0, 9),
            (e.local_sqnr_db, "#8c959f", 10, 4),
        ):
            if value is None:
                continue
            w = width * min(max(value, 0.0), top) / top if math.isfinite(value) else width
            parts.append(
                f'<rect x="{left}" y="{y + dy}" width="{w:.1f}" height="{h}" fill="{color}"><title>{_e(e.node)}: {_db(value)} dB</title></rect>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _histogram(e: LayerError) -> str:
    if not e.hist_counts:
        return ""
    w, h, pad = 320, 120, 18
    lo, hi = e.hist_edges[0], e.hist_edges[-1]
    span = hi - lo or 1.0
    peak = max(e.hist_counts) or 1
    bar = w / len(e.hist_counts)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + pad}" role="img">']
    for i, c in enumerate(e.hist_counts):
        bh = (h - 10) * math.sqrt(c / peak)  # square-root scale so tails stay visible
        parts.append(
            f'<rect x="{i * bar:.1f}" y="{h - bh:.1f}" width="{max(bar - 1, 1):.1f}" height="{bh:.1f}" fill="#54aeff"/>'
        )
    for value, label in ((e.clip_low, "clip"), (e.clip_high, "clip")):
        x = (value - lo) / span * w
        parts.append(f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{h}" stroke="#cf222e" stroke-width="2"/>')
        parts.append(
            f'<text x="{min(max(x, 12), w - 12):.1f}" y="10" font-size="10" text-anchor="middle" fill="#cf222e">{label}</text>'
        )
    parts.append(f'<text x="0" y="{h + 13}" font-size="10" fill="#6b7785">{lo:.3g}</text>')
    parts.append(f'<text x="{w}" y="{h + 13}" font-size="10" text-anchor="end" fill="#6b7785">{hi:.3g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _latency(times_ref: tuple[float, ...], times_q: tuple[float, ...]) -> str:
    if not times_ref or not times_q:
        return ""
    w, h = 320, 110
    lo = min(min(times_ref), min(times_q))
    hi = max(sorted(times_ref)[int(0.99 * (len(times_ref) - 1))], sorted(times_q)[int(0.99 * (len(times_q) - 1))])
    span = (hi - lo) or 1.0
    bins = 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 30}" role="img">']
    for times, color, name, y0 in ((times_ref, "#8c959f", "FP32", 0), (times_q, "#2da44e", "quantized", 0)):
        counts = [0] * bins
        for t in times:
            counts[min(bins - 1, max(0, int((t - lo) / span * bins)))] += 1
        peak = max(counts) or 1
        for i, c in enumerate(counts):
            bh = (h - 20) * c / peak
            parts.append(
                f'<rect x="{i * w / bins:.1f}" y="{h - bh + y0:.1f}" width="{w / bins - 1:.1f}" height="{bh:.1f}" fill="{color}" fill-opacity="0.55"/>'
            )
        del name
    parts.append(f'<text x="0" y="{h + 14}" font-size="10" fill="#6b7785">{lo:.3f} ms</text>')
    parts.append(f'<text x="{w}" y="{h + 14}" font-size="10" text-anchor="end" fill="#6b7785">{hi:.3f} ms (p99)</text>')
    parts.append(
        f'<text x="{w / 2}" y="{h + 27}" font-size="11" text-anchor="middle"><tspan fill="#6b7785">■ FP32</tspan>  <tspan fill="#2da44e">■ quantized</tspan></text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _pct(iv) -> str:
    return (
        "-"
        if iv is None
        else f"{100 * iv.value:.2f}% <span class=muted>[{100 * iv.low:.1f}, {100 * iv.high:.1f}]</span>"
    )


def render_html(result: CompareResult, gates: list[GateResult], *, top_histograms: int = 6) -> str:
    """The whole report as one HTML document."""
    out = [
        *_head_and_gates(result, gates),
        *_accuracy_and_size(result),
        *_latency_section(result),
        *_layers_section(result, top_histograms),
        "<p class=muted>Generated by quantcli.</p></body></html>",
    ]
    return "\n".join(out) + "\n"


def _head_and_gates(result: CompareResult, gates: list[GateResult]) -> list[str]:
    failed = [g for g in gates if not g.passed]
    if not gates:
        verdict = '<div class="verdict info">No gates were set.</div>'
    elif failed:
        verdict = f'<div class="verdict bad">✗ Fails {len(failed)} of {len(gates)} gates.</div>'
    else:
        verdict = f'<div class="verdict ok">✓ Passes all {len(gates)} gates.</div>'
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>quantcli: {_e(result.candidate_path.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(result.candidate_path.name)} vs {_e(result.reference_path.name)}</h1>",
        f"<div class=muted>{result.num_samples} samples of {_e(result.data_path)}</div>",
        verdict,
    ]
    if gates:
        out.append("<table><tr><th>gate</th><th>value</th><th>bound</th><th></th></tr>")
        for g in gates:
            cls, word = ("pass", "pass") if g.passed else ("fail", "FAIL")
            out.append(
                f"<tr><td>{_e(g.name)}</td><td>{g.value:.4g}</td><td>{g.comparison} {g.bound:g}</td><td class={cls}>{word}</td></tr>"
            )
        out.append("</table>")
    return out


def _accuracy_and_size(result: CompareResult) -> list[str]:
    out = [
        "<h2>Accuracy</h2><table><tr><th>output</th><th>FP32 acc</th><th>quant acc</th><th>top-1 agreement</th>"
        "<th>SQNR dB</th><th>cosine</th><th>max abs err</th></tr>"
    ]
    for m in result.outputs:
        out.append(
            f"<tr><td>{_e(m.name)}</td><td>{_pct(m.accuracy_fp32)}</td><td>{_pct(m.accuracy_quant)}</td>"
            f"<td>{_pct(m.top1_agreement)}</td><td>{_db(m.sqnr_db)}</td><td>{m.cosine.value:.5f}</td>"
            f"<td>{m.max_abs_error:.4g}</td></tr>"
        )
    out.append("</table>")
    ratio = 100 * result.size_ratio
    kernels = ", ".join(f"{op} {n}" for op, n in result.integer_kernels.items()) or "none"
    out.append(
        f"<p>Size {result.reference_bytes / 1024:.1f} KiB → {result.candidate_bytes / 1024:.1f} KiB "
        f"({ratio:.1f}%). Integer kernels after onnxruntime's optimization: {_e(kernels)}.</p>"
    )
    return out


def _latency_section(result: CompareResult) -> list[str]:
    if not result.latency:
        return []
    out = [
        f"<h2>Latency</h2><p class=muted>{result.latency[0].threads} thread(s); FP32 and quantized runs alternate.</p>",
        "<table><tr><th>batch</th><th>FP32 median ms</th><th>p90</th><th>quant median ms</th><th>p90</th><th>speed-up [IQR]</th></tr>",
    ]
    for lat in result.latency:
        out.append(
            f"<tr><td>{lat.batch_size}</td><td>{lat.reference.median_ms:.3f}</td><td>{lat.reference.p90_ms:.3f}</td>"
            f"<td>{lat.candidate.median_ms:.3f}</td><td>{lat.candidate.p90_ms:.3f}</td>"
            f"<td>{lat.speedup:.2f}x [{lat.speedup_p25:.2f}, {lat.speedup_p75:.2f}]</td></tr>"
        )
    out.append("</table><div class=grid>")
    for lat in result.latency:
        out.append(
            f"<div class=card><b>batch {lat.batch_size}</b><br>{_latency(lat.reference_times_ms, lat.candidate_times_ms)}</div>"
        )
    out.append("</div>")
    return out


def _layers_section(result: CompareResult, top_histograms: int) -> list[str]:
    if not result.layers:
        return []
    out = [
        f"<h2>Per-layer error</h2><p class=muted>Worst first, {len(result.layers)} quantized tensors. "
        "Thick bar: SQNR with everything upstream quantized; thin grey bar: this layer alone on FP32 inputs.</p>",
        _sqnr_bars(result.layers),
        "<table><tr><th>node</th><th>op</th><th>SQNR dB</th><th>local dB</th><th>hint</th></tr>",
    ]
    for e in result.layers[:15]:
        out.append(
            f"<tr><td><code>{_e(e.node)}</code></td><td>{_e(e.op_type)}</td><td>{_db(e.sqnr_db)}</td>"
            f"<td>{_db(e.local_sqnr_db)}</td><td style='text-align:left'>{_e(e.hint)}</td></tr>"
        )
    out.append(
        "</table><h2>Activations of the worst layers</h2>"
        "<p class=muted>FP32 values (square-root scale) with the quantization clip range in red.</p><div class=grid>"
    )
    for e in result.layers[:top_histograms]:
        out.append(
            f"<div class=card><code>{_e(e.node)}</code> <span class=muted>{_db(e.sqnr_db)} dB</span><br>{_histogram(e)}</div>"
        )
    out.append("</div>")
    return out
