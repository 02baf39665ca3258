"""Benchmark: converted files of one real model against FP32, timed in alternation, with held-out accuracy.

    python benchmarks/bench_variants.py ppocr_mobile_v2_cls main=/tmp/cls.main.onnx branch=/tmp/cls.branch.onnx

For comparing what two quantcli versions wrote for the same model (``quantcli convert`` run from each
checkout): every variant and FP32 are evaluated on the model's ``_eval.npz`` (task agreement with FP32,
``bench_models.METRICS``, and worst-output SQNR), then timed at batch 1 with 1 and 2 threads in one
interleaved loop per thread count (``bench_convert.time_interleaved``, rotating order; min and median
of the runs, both as FP32 time / variant time). Repeat with ``--repeats`` to see the spread. Prints the
host's CPU, its int8 flags and the load average before and after, since timings on a shared host move.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_convert import time_interleaved  # noqa: E402
from bench_models import load_npz  # noqa: E402
from bench_table import MODELS, evaluate  # noqa: E402

from quantcli.core.host import cpu_model, int8_flags  # noqa: E402


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="manifest name (benchmarks/models/NAME.onnx, NAME_eval.npz)")
    parser.add_argument("variants", nargs="+", help="LABEL=PATH of a converted model")
    parser.add_argument("--max-eval", type=int, default=256)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--latency-budget", type=float, default=10.0, help="seconds per thread count and repeat")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    paths = {"fp32": MODELS / f"{args.model}.onnx"}
    paths |= {label: Path(p) for label, _, p in (v.partition("=") for v in args.variants)}
    evaluation = MODELS / f"{args.model}_eval.npz"
    print(f"host: {cpu_model()}; int8 flags: {', '.join(int8_flags()) or 'none'}; onnxruntime {ort.__version__}")
    print(f"load before: {_load()}")
    quality = evaluate(args.model, paths, evaluation, args.max_eval)
    for label, q in quality.items():
        print(f"{label:>10}: task {q['task'][0]} {q['task'][1]:.4f}  worst SQNR {q['sqnr_db']:.1f} dB")
    feed = {k: v[:1] for k, v in load_npz(evaluation, 1)[0].items()}
    for threads in (1, 2):
        for rep in range(args.repeats):
            for stat in ("min", "median"):
                ms = time_interleaved(paths, feed, threads, args.runs, args.latency_budget / 2, stat)
                ratios = "  ".join(f"{k} {ms['fp32'] / ms[k]:.3f}x ({ms[k]:.2f} ms)" for k in paths if k != "fp32")
                print(f"t{threads} r{rep} {stat:>6}: fp32 {ms['fp32']:.2f} ms  {ratios}", flush=True)
    print(f"load after: {_load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
