"""The HTML report's plots on a made-up comparison: what they show, whole names, byte-stable, well-formed SVG."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import onnx
import pytest

from quantcli.cli.html_report import render_html
from quantcli.compare.evaluate import LatencyComparison, LatencyStats
from quantcli.compare.layers import LayerError
from quantcli.compare.result import CompareResult

LONG = "/encoder/layers.11/attention/self/" + "very_long_block_name/" * 6 + "MatMul"  # 170 characters
NAMES = ["/stem/Conv", LONG, "/head/Gemm"]  # model order
SQNR = {"/stem/Conv": (31.0, 31.0), LONG: (12.5, 14.0), "/head/Gemm": (18.0, 40.0)}


def _model(path: Path) -> Path:
    nodes = [onnx.helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"], name=n) for i, n in enumerate(NAMES)]
    graph = onnx.helper.make_graph(
        nodes,
        "chain",
        [onnx.helper.make_tensor_value_info("t0", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("t3", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph), str(path))
    return path


def _layer(i: int, node: str) -> LayerError:
    acc, local = SQNR[node]
    return LayerError(
        tensor=f"t{i + 1}", node=node, op_type="Relu", sqnr_db=acc, local_sqnr_db=local, clip_low=-1.0,
        clip_high=1.0, observed_min=-1.2, observed_max=1.1, p999_abs=1.0, hint="",
        hist_edges=(-1.5, 0.0, 1.5), hist_counts=(3, 5),
    )  # fmt: skip


def _stats(times: list[float]) -> LatencyStats:
    s = sorted(times)
    med, p90, p99 = s[len(s) // 2], s[int(0.9 * (len(s) - 1))], s[int(0.99 * (len(s) - 1))]
    return LatencyStats(runs=len(s), median_ms=med, p90_ms=p90, p99_ms=p99, mean_ms=sum(s) / len(s), throughput=1.0)


def _result(reference: Path) -> CompareResult:
    layers = sorted((_layer(i, n) for i, n in enumerate(NAMES)), key=lambda e: e.sqnr_db)  # worst first
    ref, cand = [0.2 + 0.001 * (i % 7) for i in range(40)], [0.1 + 0.001 * (i % 5) for i in range(40)] + [3.0]
    lat = LatencyComparison(
        batch_size=1, threads=1, reference=_stats(ref), candidate=_stats(cand), speedup=2.0, speedup_p25=1.9,
        speedup_p75=2.1, reference_times_ms=tuple(ref), candidate_times_ms=tuple(cand),
    )  # fmt: skip
    return CompareResult(
        reference_path=reference, candidate_path=reference.with_suffix(".int8.onnx"), data_path=Path("d.npz"),
        num_samples=8, outputs=[], latency=[lat], reference_bytes=100, candidate_bytes=30, integer_kernels={},
        layers=layers,
    )  # fmt: skip


@pytest.fixture
def page(tmp_path: Path) -> str:
    return render_html(_result(_model(tmp_path / "m.onnx")), [])


def _svgs(page: str) -> list[str]:
    return re.findall(r"<svg.*?</svg>", page, flags=re.S)


def test_every_plot_is_well_formed_svg_and_the_page_is_self_contained(page: str) -> None:
    for svg in _svgs(page):
        ET.fromstring(svg)  # raises on broken markup
    assert len(_svgs(page)) == 1 + 1 + 3  # one latency plot, the error plot, three histograms
    assert "<script" not in page and "http" not in page.replace("http://www.w3.org/2000/svg", "")


def test_the_same_result_renders_the_same_bytes(tmp_path: Path) -> None:
    model = _model(tmp_path / "m.onnx")
    assert render_html(_result(model), []).encode() == render_html(_result(model), []).encode()


def test_long_names_are_never_cut(page: str) -> None:
    assert "…" not in page
    error_plot = _svgs(page)[1]
    assert f"<title>{LONG}</title>" in error_plot  # the worst layer's label
    assert f"1: {LONG} (Relu), 12.5 dB at tensor 2" in error_plot
    assert f"<code>{LONG}</code>" in page.replace("<wbr>", "")  # and the table (it may wrap after a slash)


def test_the_error_plot_follows_the_model_and_marks_the_worst(page: str) -> None:
    error_plot = _svgs(page)[1]
    tips = re.findall(r"<title>(\d+)\. ([^<]*) \(Relu\): accumulated", error_plot)
    assert [n for _, n in tips[::2]] == NAMES  # ring then dot per tensor, in model order
    assert "SQNR (dB), higher is better" in error_plot and "in model order from input to output (1 to 3)" in error_plot
    assert "in model order." in page and "Where the error comes from" in page
    assert "2: /head/Gemm (Relu), 18.0 dB at tensor 3" in error_plot  # local 40 dB: inherited from upstream


def test_without_the_model_file_the_plot_says_it_is_worst_first(tmp_path: Path) -> None:
    page = render_html(_result(tmp_path / "missing.onnx"), [])
    assert "worst first (the model file could not be read for its order)" in page
    assert re.search(rf"<title>1\. {re.escape(LONG)} ", page)


def test_the_latency_plot_has_axes_and_marks(page: str) -> None:
    lat = _svgs(page)[0]
    assert "Latency distribution, batch 1" in page
    assert "time per run (ms)" in lat and lat.count(">runs<") == 2
    assert "median 0.203 ms" in lat and "median 0.102 ms" in lat and "p90 " in lat
    assert "+1 off axis" in lat  # the 3 ms outlier of the quantized model
