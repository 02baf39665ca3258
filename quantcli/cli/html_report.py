"""A self-contained HTML report of a comparison: verdict, tables, and plots drawn as inline SVG.

No JavaScript, no external files, no plotting library: the page opens anywhere, including as a
CI artifact. Plots: per-layer SQNR bars (accumulated and local), FP32 activation histograms of the
worst layers with the quantization clip range drawn over them, and latency distributions.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from pathlib import Path

import onnx

from quantcli.compare.evaluate import LatencyComparison
from quantcli.compare.gates import GateResult
from quantcli.compare.layers import LayerError
from quantcli.compare.result import CompareResult
from quantcli.graph.scopes import walk_graphs

__all__ = ["render_html"]

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#1d2430}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde3ea;padding-bottom:4px}
table{border-collapse:collapse;margin:6px 0} td,th{padding:4px 10px;border-bottom:1px solid #e8edf2;text-align:right}
td:first-child,th:first-child{text-align:left} th{background:#f5f7fa}
.pass{color:#1a7f37;font-weight:600} .fail{color:#cf222e;font-weight:600} .muted{color:#6b7785}
.verdict{font-size:18px;padding:10px 14px;border-radius:6px;margin:12px 0}
.ok{background:#e6f4ea} .bad{background:#fdecea} .info{background:#eef3f8}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:12px} .wide{grid-template-columns:repeat(auto-fill,minmax(500px,1fr))}
h3{font-size:15px;margin:18px 0 4px} table.layers th:nth-child(2),table.layers td:nth-child(2){text-align:left}
table.layers td:nth-child(2){overflow-wrap:break-word;min-width:16em} table.layers td:last-child,table.layers th:last-child{text-align:left} .card code{overflow-wrap:anywhere}
svg text{font-family:inherit}
.card{border:1px solid #e1e6ec;border-radius:6px;padding:8px}
code{background:#f2f4f7;padding:1px 4px;border-radius:3px}
"""


def _e(text: object) -> str:
    return html.escape(str(text))


def _breakable(name: str) -> str:
    """A node name that a narrow cell may wrap after its slashes (``<wbr>``: copying it adds nothing)."""
    return _e(name).replace("/", "/<wbr>")


def _db(x: float | None) -> str:
    if x is None:
        return "-"
    return "∞" if math.isinf(x) else f"{x:.1f}"


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten."""
    span = hi - lo if hi > lo else abs(hi) or 1.0
    raw = span / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt_tick(value: float) -> str:
    return f"{value:g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


def _model_order(path: Path) -> dict[str, int]:
    """Tensor name -> position of the node that produces it (graph inputs first); {} when unreadable."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # a report is still worth writing without the order: the plot says so
        return {}
    order: dict[str, int] = {i.name: -1 for i in model.graph.input}
    position = 0
    for _, graph in walk_graphs(model.graph):
        for node in graph.node:
            for name in node.output:
                order.setdefault(name, position)
            position += 1
    return order


def _in_model_order(layers: list[LayerError], order: dict[str, int]) -> list[LayerError]:
    """The layers as the data flows (unknown tensors last, by name); as given when no order is known."""
    if not order:
        return list(layers)
    return sorted(layers, key=lambda e: (order.get(e.tensor, len(order)), e.tensor))


def _sqnr_color(value: float) -> str:
    return "#cf222e" if value < 20 else "#d29922" if value < 30 else "#2da44e"


_XOf = Callable[[int], float]
_YOf = Callable[[float], float]
_ERR = {"w": 1000, "left": 64, "right": 16, "plot": 240, "bottom": 46, "line": 16}


def _error_plot(ordered: list[LayerError], worst: list[LayerError]) -> str:
    """SQNR along the network: accumulated (coloured dots on a line) and local (grey rings) per tensor.

    The worst layers are numbered on the plot and named in full above it; every point has a tooltip.
    """
    if not ordered:
        return ""
    g = _ERR
    finite = [v for e in ordered for v in (e.sqnr_db, e.local_sqnr_db) if v is not None and math.isfinite(v)]
    y_lo = math.floor(min(finite, default=10.0) / 10) * 10 - 10.0  # a margin under the worst value
    y_hi = max(math.ceil(max(finite, default=40.0) / 10) * 10, y_lo + 10)
    top = g["line"] * len(worst) + 12  # the band that names the worst layers
    width, x0, x1 = g["w"], g["left"], g["w"] - g["right"]
    height = top + g["plot"] + g["bottom"]
    step = (x1 - x0) / len(ordered)

    def x_of(i: int) -> float:
        return x0 + step * (i + 0.5)

    def y_of(v: float) -> float:
        v = min(max(v, y_lo), y_hi) if math.isfinite(v) else y_hi
        return top + g["plot"] * (1 - (v - y_lo) / (y_hi - y_lo))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11" role="img" aria-label="SQNR per quantized tensor in model order">'
    ]
    for tick in _nice_ticks(y_lo, y_hi, 6):
        y = y_of(tick)
        parts.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#e5e9ee"/>')
        parts.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#6b7785">{_fmt_tick(tick)}</text>')
    for tick in range(1, len(ordered) + 1) if len(ordered) <= 30 else _nice_ticks(1, len(ordered), 10):
        if 1 <= tick <= len(ordered) and tick == int(tick):
            x = x_of(int(tick) - 1)
            parts.append(
                f'<text x="{x:.1f}" y="{top + g["plot"] + 15}" text-anchor="middle" fill="#6b7785">{int(tick)}</text>'
            )
    mid_y = top + g["plot"] / 2
    parts.append(
        f'<text x="14" y="{mid_y:.1f}" text-anchor="middle" transform="rotate(-90 14 {mid_y:.1f})">SQNR (dB), higher is better</text>'
    )
    parts.append(
        f'<text x="{x0}" y="{height - 8}">quantized tensor, in model order from input to output (1 to {len(ordered)})</text>'
        f'<text x="{x1}" y="{height - 8}" text-anchor="end"><tspan fill="#2da44e">●</tspan> accumulated (all upstream quantized)'
        ' <tspan fill="#8c959f">○</tspan> local (this layer alone)</text>'
    )
    parts.extend(_error_points(ordered, x_of, y_of))
    parts.extend(_worst_labels(ordered, worst, x_of, y_of, (x0, x1, g["line"])))
    parts.append("</svg>")
    return "".join(parts)


def _error_points(ordered: list[LayerError], x_of: _XOf, y_of: _YOf) -> list[str]:
    """The accumulated line, a grey link to each local value (the gap is error inherited from upstream), dots."""
    line = " ".join(f"{x_of(i):.1f},{y_of(e.sqnr_db):.1f}" for i, e in enumerate(ordered))
    dot, ring = (4.0, 3.5) if len(ordered) <= 60 else (2.5, 2.0)  # many tensors: smaller marks overlap less
    parts = [f'<polyline points="{line}" fill="none" stroke="#57606a" stroke-width="1.2"/>']
    for i, e in enumerate(ordered):
        x, y = x_of(i), y_of(e.sqnr_db)
        tip = f"<title>{i + 1}. {_e(e.node)} ({_e(e.op_type)}): accumulated {_db(e.sqnr_db)} dB, local {_db(e.local_sqnr_db)} dB</title>"
        if e.local_sqnr_db is not None:
            yl = y_of(e.local_sqnr_db)
            parts.append(f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x:.1f}" y2="{yl:.1f}" stroke="#c7ccd1"/>')
            parts.append(
                f'<circle cx="{x:.1f}" cy="{yl:.1f}" r="{ring}" fill="#fff" stroke="#8c959f" stroke-width="1.5">{tip}</circle>'
            )
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{dot}" fill="{_sqnr_color(e.sqnr_db)}">{tip}</circle>')
    return parts


def _worst_labels(
    ordered: list[LayerError], worst: list[LayerError], x_of: _XOf, y_of: _YOf, box: tuple[float, float, int]
) -> list[str]:
    """Number each worst layer's dot and write its full name in the band above the plot, with a leader line."""
    x0, x1, line = box
    index = {id(e): i for i, e in enumerate(ordered)}
    parts = []
    for rank, e in enumerate(worst, start=1):
        i = index[id(e)]
        x, y = x_of(i), y_of(e.sqnr_db)
        text = f"{rank}: {e.node} ({e.op_type}), {_db(e.sqnr_db)} dB at tensor {i + 1}"
        est = 6.3 * len(text)  # rough width of 11 px text: keep the name inside the plot
        tx = min(max(x - 4, x0), max(x1 - est, x0))
        ty = line * rank
        parts.append(
            f'<line x1="{x:.1f}" y1="{line * len(worst) + 4}" x2="{x:.1f}" y2="{y - 7:.1f}" stroke="#cf222e" stroke-dasharray="2,2"/>'
        )
        parts.append(f'<text x="{tx:.1f}" y="{ty}" fill="#cf222e"><title>{_e(e.node)}</title>{_e(text)}</text>')
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="7" fill="none" stroke="#cf222e" stroke-width="1.5"/>')
        parts.append(f'<text x="{x + 9:.1f}" y="{y + 13:.1f}" fill="#cf222e" font-weight="600">{rank}</text>')
    return parts


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


_LAT = {"w": 500, "left": 84, "right": 14, "row": 60, "band": 28}


def _latency(lat: LatencyComparison) -> str:
    """Run-time histograms of both models at one batch size on one ms axis, median and p90 marked."""
    rows = (("FP32", lat.reference_times_ms, lat.reference, "#8c959f"),
            ("quantized", lat.candidate_times_ms, lat.candidate, "#2da44e"))  # fmt: skip
    if not lat.reference_times_ms or not lat.candidate_times_ms:
        return ""
    g = _LAT
    lo = min(min(lat.reference_times_ms), min(lat.candidate_times_ms))
    p90 = max(lat.reference.p90_ms, lat.candidate.p90_ms)
    hi = max(min(max(lat.reference.p99_ms, lat.candidate.p99_ms), 1.5 * p90), 1.05 * p90)  # outliers off the axis
    ticks = _nice_ticks(lo, hi, 6)
    lo, hi = min(lo, ticks[0]), max(hi, ticks[-1])
    span = (hi - lo) or 1.0
    x0, x1 = g["left"], g["w"] - g["right"]
    row_h = g["band"] + g["row"]
    height = row_h * 2 + 44

    def x_of(ms: float) -> float:
        return x0 + (x1 - x0) * (min(max(ms, lo), hi) - lo) / span

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{g["w"]}" height="{height}" font-size="11" role="img" aria-label="latency distribution, batch {lat.batch_size}">'
    ]
    for tick in ticks:
        x = x_of(tick)
        parts.append(f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{row_h * 2}" stroke="#eef1f4"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{row_h * 2 + 14}" text-anchor="middle" fill="#6b7785">{_fmt_tick(tick)}</text>'
        )
    parts.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{height - 6}" text-anchor="middle">time per run (ms)</text>')
    for k, (name, times, stats, color) in enumerate(rows):
        parts.extend(_latency_row(name, times, (stats.median_ms, stats.p90_ms), color, (k * row_h, x_of, lo, hi)))
    parts.append("</svg>")
    return "".join(parts)


def _latency_row(
    name: str,
    times: tuple[float, ...],
    marks: tuple[float, float],
    color: str,
    frame: tuple[float, Callable[[float], float], float, float],
) -> list[str]:
    """One model's histogram (40 bins, runs per bin on the y axis) with its median and p90 lines."""
    y0, x_of, lo, hi = frame
    g, bins = _LAT, 40
    base = y0 + g["band"] + g["row"]
    counts = [0] * bins
    for t in times:
        if t <= hi:
            counts[min(bins - 1, max(0, int((t - lo) / ((hi - lo) or 1.0) * bins)))] += 1
    peak = max(counts) or 1
    bar = (x_of(hi) - x_of(lo)) / bins
    parts = [
        f'<text x="4" y="{base - g["row"] / 2:.1f}" font-weight="600">{name}</text>',
        f'<text x="4" y="{base - g["row"] / 2 + 13:.1f}" fill="#6b7785">runs</text>',
        f'<text x="{g["left"] - 4}" y="{base - g["row"] + 12:.1f}" text-anchor="end" fill="#6b7785">{peak}</text>',
        f'<text x="{g["left"] - 4}" y="{base:.1f}" text-anchor="end" fill="#6b7785">0</text>',
        f'<line x1="{g["left"]}" y1="{base - g["row"] + 4}" x2="{g["left"]}" y2="{base}" stroke="#8c959f"/>',
        f'<line x1="{g["left"]}" y1="{base}" x2="{g["w"] - g["right"]}" y2="{base}" stroke="#8c959f"/>',
    ]
    for i, c in enumerate(counts):
        if c:
            bh = (g["row"] - 4) * c / peak
            parts.append(
                f'<rect x="{x_of(lo) + i * bar:.1f}" y="{base - bh:.1f}" width="{max(bar - 1, 1):.1f}" height="{bh:.1f}" fill="{color}"><title>{c} runs</title></rect>'
            )
    x_end = g["w"] - g["right"]
    for k, (value, label, dash) in enumerate(((marks[0], "median", ""), (marks[1], "p90", ' stroke-dasharray="4,3"'))):
        x, text = x_of(value), f"{label} {value:.3g} ms"
        at = f'x="{x + 3:.1f}"' if x + 3 + 6.3 * len(text) <= x_end else f'x="{x - 3:.1f}" text-anchor="end"'
        parts.append(
            f'<line x1="{x:.1f}" y1="{y0 + 13 * k + 2}" x2="{x:.1f}" y2="{base}" stroke="#1d2430" stroke-width="1.5"{dash}/>'
        )
        parts.append(f'<text {at} y="{y0 + 13 * k + 11}">{text}</text>')
    slow = sum(1 for t in times if t > hi)
    if slow:
        parts.append(f'<text x="4" y="{base - 3}" font-size="10" fill="#6b7785">+{slow} off axis</text>')
    return parts


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
    out.append(
        "</table><p class=muted>How the time per run is spread, each batch size on its own axis: solid line "
        'median, dashed line p90; runs slower than 1.5 times the larger p90 are counted as "+N off axis". '
        "Two narrow peaks far apart mean a clear speed-up; a wide or double peak means noisy timing.</p><div class='grid wide'>"
    )
    for lat in result.latency:
        out.append(f"<div class=card><b>Latency distribution, batch {lat.batch_size}</b><br>{_latency(lat)}</div>")
    out.append("</div>")
    return out


def _layers_section(result: CompareResult, top_histograms: int, worst_marked: int = 3) -> list[str]:
    if not result.layers:
        return []
    order = _model_order(result.reference_path)
    ordered = _in_model_order(result.layers, order)
    position = {id(e): i + 1 for i, e in enumerate(ordered)}
    worst = result.layers[:worst_marked]
    where = "in model order" if order else "worst first (the model file could not be read for its order)"
    out = [
        f"<h2>Per-layer error</h2><h3>Where the error comes from</h3><p class=muted>{len(result.layers)} quantized "
        f"tensors, {where}. Filled dot: SQNR of the tensor with everything upstream quantized (accumulated; red "
        "under 20 dB, amber under 30). Ring: this layer alone, on FP32 inputs (local). A drop of the dots "
        "where the ring is also low: the error starts at that layer; a low dot over a high ring: it comes from "
        f"upstream. The {len(worst)} worst are numbered; hover a dot for its name.</p>",
        _error_plot(ordered, worst),
        "<h3>Worst layers</h3><table class=layers><tr><th>rank</th><th>node</th><th>op</th><th>position</th>"
        "<th>SQNR dB</th><th>local dB</th><th>hint</th></tr>",
    ]
    for rank, e in enumerate(result.layers[:15], start=1):
        out.append(
            f"<tr><td>{rank}</td><td><code>{_breakable(e.node)}</code></td><td>{_e(e.op_type)}</td><td>{position[id(e)]}</td>"
            f"<td>{_db(e.sqnr_db)}</td><td>{_db(e.local_sqnr_db)}</td><td>{_e(e.hint)}</td></tr>"
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
