"""Benchmark: the default ``calibrate`` + ``convert`` on OCR models, judged in OCR terms against FP32.

    python benchmarks/bench_ocr.py                         # every OCR model found
    python benchmarks/bench_ocr.py --models ppocrv4_rec --models-dir /path/to/models --json out.json
    python benchmarks/bench_ocr.py --models ppocrv4_rec --calibrate-args="--method mse"
    python benchmarks/bench_ocr.py --models ppocrv4_rec --convert-data --convert-args="--cle --bias-correction"

(``--calibrate-args``/``--convert-args`` take one string: write ``--convert-args=--cle`` with ``=`` when it
starts with a dash. ``--convert-data`` runs ``convert --data _calib.npz``, which holds back 20% of the
calibration samples for its verdict: its ranges come from fewer samples than the two-step default.)

Models (``fetch_models.py``; ``<name>.onnx``, ``<name>_calib.npz``, ``<name>_eval.npz``): the PP-OCRv4
recognizer (LCNet + SVTR neck + CTC, output ``[N, T, C]``), the PP-OCRv4 DB text detector (probability
map), ddddocr's recognizer (CRNN-like, time-major ``[T, 1, C]`` CTC logits) and ddddocr's YOLOX detector.

For each model, in a child process with an address-space cap (``--mem-gb``): ``quantcli calibrate``
(min-max, on ``_calib.npz``) then ``quantcli convert -c`` with every default, exactly the two commands a
user types. Then, on the held-out ``_eval.npz``, in this process:

* recognizers: the share of lines whose greedy CTC string equals FP32's, the character error rate of
  those strings against FP32's (edit distance / FP32 length), and per-step argmax agreement;
* DB detector: IoU of the text masks at 0.3 (DB's binarization threshold); YOLOX detector: F1 of the
  detections matched to FP32's by class and IoU >= 0.5 (``bench_models.yolox_dets``);
* SQNR of the output; batch-1 latency of FP32 and int8 at 1 and 2 intra-op threads, the two sessions
  timed in alternation (median, time-boxed), and the host's CPU model and int8 flags.

Timings on a shared machine are noisy: the ratio of two medians taken in alternation is the figure to read.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_convert import session  # noqa: E402
from bench_models import detection_f1, yolox_dets  # noqa: E402

from quantcli.core.host import cpu_model, int8_flags  # noqa: E402

MODELS = Path(os.environ.get("QUANTCLI_MODELS", REPO / "benchmarks" / "models"))
#: model -> (task, time-major output)
OCR_MODELS: dict[str, tuple[str, bool]] = {
    "ppocrv4_rec": ("ctc", False),
    "ppocrv4_det": ("mask", False),
    "ddddocr_ocr": ("ctc", True),
    "ddddocr_det": ("yolox", False),
}


def quantize(name: str, models: Path, work: Path, args: argparse.Namespace) -> tuple[Path | None, str]:
    """``quantcli calibrate`` + ``quantcli convert`` (defaults unless ``--calibrate-args``/``--convert-args``),
    in a capped child; (output, log tail). With ``--convert-data`` convert calibrates from ``_calib.npz``
    itself (``--data``), which the data-driven algorithms (``--bias-correction``, ``--cle``) need."""
    cap = int(args.mem_gb * (1 << 30))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    model, calib_json, out = models / f"{name}.onnx", work / f"{name}.calib.json", work / f"{name}.int8.onnx"
    env = {**os.environ, "PYTHONPATH": str(REPO), "ORT_LOGGING_LEVEL": "3"}
    calib_npz = str(models / f"{name}_calib.npz")
    calibrate = ["calibrate", str(model), "--data", calib_npz, "-o", str(calib_json), "--force"]
    source = ["--data", calib_npz] if args.convert_data else ["-c", str(calib_json)]
    convert = ["convert", str(model), *source, "-o", str(out), "--force", "--quiet"]
    steps = [convert] if args.convert_data else [calibrate + shlex.split(args.calibrate_args), convert]
    steps[-1] = steps[-1] + shlex.split(args.convert_args)
    log = ""
    for step in steps:
        cmd = [sys.executable, "-m", "quantcli", *step]
        proc = subprocess.run(cmd, preexec_fn=limit, env=env, capture_output=True, text=True, timeout=args.timeout)
        log = " | ".join(line for line in proc.stdout.splitlines() if line.strip())[-400:]
        if proc.returncode != 0:
            return None, f"{step[0]} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-400:]}"
    return out, log


def run_all(path: Path, data: np.ndarray, input_name: str, time_major: bool, threads: int = 2) -> np.ndarray:
    """Outputs for every sample, one sample per run (ddddocr's inputs are batch 1), as [N, ...]."""
    sess = session(path, threads)
    outs = [sess.run(None, {input_name: data[i : i + 1]})[0] for i in range(len(data))]
    return np.concatenate([o.transpose(1, 0, 2) if time_major else o for o in outs])


def ctc_strings(logits: np.ndarray) -> list[tuple[int, ...]]:
    """Greedy CTC (blank 0) of [N, T, C] scores."""
    return [
        tuple(int(c) for i, c in enumerate(seq) if c != 0 and (i == 0 or c != seq[i - 1])) for seq in logits.argmax(-1)
    ]


def edit_distance(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[len(b)]


def ctc_metrics(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    r, c = ctc_strings(ref), ctc_strings(cand)
    errors = sum(edit_distance(a, b) for a, b in zip(r, c, strict=True))
    return {
        "string_agreement": float(np.mean([a == b for a, b in zip(r, c, strict=True)])),
        "cer_vs_fp32": errors / max(1, sum(len(a) for a in r)),
        "step_agreement": float((ref.argmax(-1) == cand.argmax(-1)).mean()),
    }


def mask_metrics(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    r, c = ref > 0.3, cand > 0.3
    return {"mask_iou": float((r & c).sum() / max(1, (r | c).sum()))}


def yolox_metrics(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    f1, n = detection_f1(yolox_dets([[x[None]] for x in ref]), yolox_dets([[x[None]] for x in cand]))
    return {"detection_f1_vs_fp32": f1, "fp32_detections": n}


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], dict[str, float]]] = {
    "ctc": ctc_metrics,
    "mask": mask_metrics,
    "yolox": yolox_metrics,
}


def sqnr_db(ref: np.ndarray, cand: np.ndarray) -> float:
    noise = float(((ref.astype(np.float64) - cand) ** 2).sum())
    return 10 * float(np.log10(float((ref.astype(np.float64) ** 2).sum()) / noise)) if noise > 0 else float("inf")


def latency(
    paths: dict[str, Path], feed: dict[str, np.ndarray], threads: int, runs: int, budget_s: float
) -> dict[str, float]:
    """Median batch-1 latency (ms) of each model, the sessions run in rotating order, time-boxed."""
    sessions = {k: session(p, threads) for k, p in paths.items()}
    for s in sessions.values():
        s.run(None, feed)
    keys, times = list(sessions), {k: [] for k in sessions}  # type: ignore[var-annotated]
    start = time.perf_counter()
    for i in range(runs):
        for k in keys[i % len(keys) :] + keys[: i % len(keys)]:
            t0 = time.perf_counter()
            sessions[k].run(None, feed)
            times[k].append(time.perf_counter() - t0)
        if i >= 9 and time.perf_counter() - start > budget_s:
            break
    return {k: float(np.median(v) * 1000) for k, v in times.items()}


def bench(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    task, time_major = OCR_MODELS[name]
    model = args.models_dir / f"{name}.onnx"
    out, log = quantize(name, args.models_dir, work, args)
    res: dict[str, Any] = {"model": name, "quantcli": log}
    if out is None:
        return {**res, "error": log}
    evaluation = np.load(args.models_dir / f"{name}_eval.npz")
    input_name = next(k for k in evaluation.files if k != "labels")
    data = evaluation[input_name][: args.max_eval]
    ref, cand = (run_all(p, data, input_name, time_major) for p in (model, out))
    res.update(METRICS[task](ref, cand), sqnr_db=sqnr_db(ref, cand), samples=len(data))
    feed = {input_name: data[:1]}
    for threads in (1, 2):
        lat = latency({"fp32": model, "int8": out}, feed, threads, args.runs, args.latency_budget)
        res[f"ms_t{threads}"] = lat
        res[f"speedup_t{threads}"] = lat["fp32"] / lat["int8"]
    return res


def _line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['model']:<12} FAILED {r['error']}"
    keys = ("string_agreement", "cer_vs_fp32", "step_agreement", "mask_iou", "detection_f1_vs_fp32")
    task = ", ".join(f"{k} {r[k]:.3f}" for k in keys if k in r)
    speed = ", ".join(
        f"{t} thread(s) {r[f'ms_t{t}']['fp32']:.1f} -> {r[f'ms_t{t}']['int8']:.1f} ms ({r[f'speedup_t{t}']:.2f}x)"
        for t in (1, 2)
    )
    return f"{r['model']:<12} n={r['samples']:<3} {task}, SQNR {r['sqnr_db']:.1f} dB; batch 1: {speed}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=list(OCR_MODELS), choices=list(OCR_MODELS))
    parser.add_argument("--models-dir", type=Path, default=MODELS)
    parser.add_argument("--work", type=Path, default=None, help="where the int8 models go (default: a temp dir)")
    parser.add_argument("--mem-gb", type=float, default=8.0)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--max-eval", type=int, default=64)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument(
        "--latency-budget", type=float, default=20.0, help="seconds of timing per model and thread count"
    )
    parser.add_argument("--calibrate-args", default="", help="extra calibrate flags, e.g. '--method mse'")
    parser.add_argument("--convert-args", default="", help="extra convert flags, e.g. '--bias-correction'")
    parser.add_argument(
        "--convert-data", action="store_true", help="convert calibrates from _calib.npz itself (no calibrate step)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / "bench_ocr"
    work.mkdir(parents=True, exist_ok=True)
    print(f"host: {cpu_model()}; int8 flags: {', '.join(int8_flags()) or 'none'}; {os.cpu_count()} logical CPUs")
    results = []
    for name in args.models:
        if not (args.models_dir / f"{name}.onnx").is_file():
            print(f"{name:<12} skipped: {args.models_dir / name}.onnx not found (benchmarks/fetch_models.py)")
            continue
        results.append(bench(name, args, work))
        print(_line(results[-1]), flush=True)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "host": cpu_model(),
                    "int8_flags": int8_flags(),
                    "calibrate_args": args.calibrate_args,
                    "convert_args": args.convert_args,
                    "convert_data": args.convert_data,
                    "results": results,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
