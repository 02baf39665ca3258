"""Benchmark: every ``convert --mode`` against FP32, in one run.

For each model and mode: file size ratio, accuracy against labels (when the data has them), top-1
agreement with FP32 (for sequence outputs such as PP-OCR's recognizer: the share of text lines whose
greedy CTC decoding is identical to FP32's), output SQNR, integer kernels in the optimized graph, and
the latency ratio FP32 / mode at batch 1 and 8, each mode timed in alternation with FP32 on the same
feed (``quantcli.compare.evaluate.measure_latency``), one thread.

Usage:
    python benchmarks/bench_modes.py                              # bundled transformer + fetched models
    python benchmarks/bench_modes.py --model m.onnx --eval e.npz [--calib c.npz]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quantcli.api import convert_model  # noqa: E402
from quantcli.compare.evaluate import measure_latency  # noqa: E402
from quantcli.data.datasets import model_input_specs, open_dataset  # noqa: E402
from quantcli.graph.model_io import load_model  # noqa: E402
from quantcli.graph.session import make_session  # noqa: E402
from quantcli.modes.common import ConvertMode  # noqa: E402


def _default(models: Path) -> list[tuple[str, Path, Path | None, Path]]:
    return [
        ("digits_transformer", REPO / "sample_models/digits_transformer.onnx",
         REPO / "calibration_data/digits_transformer_calib.npz", REPO / "calibration_data/digits_transformer_eval.npz"),
        ("magika", models / "magika_standard_v3_3.onnx", models / "magika_standard_v3_3_calib.npz",
         models / "magika_standard_v3_3_eval.npz"),
        # static mode skipped: calibrating it holds ~4 GB of activations per batch of 8 (see README)
        ("ppocrv4_rec", models / "ppocrv4_rec.onnx", None, models / "ppocrv4_rec_eval.npz"),
    ]  # fmt: skip


def _ctc(seq: np.ndarray) -> tuple[int, ...]:
    ids = seq.argmax(-1)
    keep = np.concatenate([[True], ids[1:] != ids[:-1]]) & (ids != 0)
    return tuple(int(i) for i in ids[keep])


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - out) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / noise)


def bench(name: str, model: Path, calib: Path | None, eval_path: Path, *, runs: int, budget: float) -> list[dict]:
    ds = open_dataset(eval_path, model_input_specs(load_model(model)))
    feeds = list(ds.batches(16))
    ref_sess = make_session(load_model(model), threads=1)
    ref_out = np.concatenate([ref_sess.run(None, f)[0] for f in feeds])
    rows = []
    modes = [ConvertMode.STATIC] if calib is not None else []
    modes += [ConvertMode.DYNAMIC, ConvertMode.WEIGHT_ONLY, ConvertMode.FP16]
    with tempfile.TemporaryDirectory(prefix="quantcli-modes-") as tmp:
        for mode in modes:
            out_path = Path(tmp) / f"{name}.{mode}.onnx"
            kwargs = {"data_path": calib} if mode == ConvertMode.STATIC else {}
            result = convert_model(model, out_path, mode=mode, upgrade_opset=True, **kwargs)  # type: ignore[arg-type]
            sess = make_session(load_model(out_path), threads=1)
            out = np.concatenate([sess.run(None, f)[0] for f in feeds])
            row: dict = {
                "model": name, "mode": str(mode), "size_ratio": out_path.stat().st_size / model.stat().st_size,
                "sqnr_db": _sqnr(ref_out, out), "integer_kernels": result.audit.integer_op_counts(),
            }  # fmt: skip
            if ref_out.ndim == 3:
                same = [_ctc(a) == _ctc(b) for a, b in zip(ref_out, out, strict=True)]
                row["lines_identical"] = float(np.mean(same))
            else:
                row["agreement"] = float((ref_out.argmax(-1) == out.argmax(-1)).mean())
            if ds.labels is not None:
                row["acc_fp32"] = float((ref_out.argmax(-1) == ds.labels).mean())
                row["acc_mode"] = float((out.argmax(-1) == ds.labels).mean())
            for bs in (1, 8):
                feed = next(ds.batches(bs))
                lat = measure_latency(ref_sess, sess, feed, threads=1, warmup=3, runs=runs, time_budget_s=budget)
                row[f"speedup_b{bs}"] = lat.speedup
                row[f"ms_fp32_b{bs}"] = lat.reference.median_ms
                row[f"ms_mode_b{bs}"] = lat.candidate.median_ms
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(r: dict) -> str:
    acc = f"acc {100 * r['acc_fp32']:.1f}->{100 * r['acc_mode']:.1f}%" if "acc_mode" in r else ""
    agree = (
        f"lines identical {100 * r['lines_identical']:.1f}%" if "lines_identical" in r
        else f"agree {100 * r['agreement']:.1f}%"
    )  # fmt: skip
    return (
        f"{r['model']:18s} {r['mode']:11s} size x{r['size_ratio']:.3f}  {acc:18s} {agree:24s} "
        f"SQNR {r['sqnr_db']:5.1f} dB  speed-up b1 x{r['speedup_b1']:.2f} ({r['ms_fp32_b1']:.2f}->"
        f"{r['ms_mode_b1']:.2f} ms)  b8 x{r['speedup_b8']:.2f} ({r['ms_fp32_b8']:.2f}->{r['ms_mode_b8']:.2f} ms)  "
        f"{r['integer_kernels']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--calib", type=Path)
    parser.add_argument("--eval", type=Path)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--time-budget", type=float, default=20.0, help="seconds per model, mode and batch size")
    parser.add_argument("--models-dir", type=Path, default=REPO / "benchmarks" / "models")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    models = [(args.model.stem, args.model, args.calib, args.eval)] if args.model else _default(args.models_dir)
    rows = []
    for name, model, calib, eval_path in models:
        if not model.exists():
            print(f"skipping {name}: {model} not found (run benchmarks/fetch_models.py)")
            continue
        rows += bench(name, model, calib, eval_path, runs=args.runs, budget=args.time_budget)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
