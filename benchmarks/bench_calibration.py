"""Benchmark calibration: quantcli against onnxruntime.quantization's calibrators, in one run.

Each (tool, method, sample count) runs in a fresh child process; its wall time, CPU time and peak RSS
(the child's own high-water mark, ``ru_maxrss``) are printed with the ratios quantcli / onnxruntime.
``--repeat N`` alternates the two tools N times per cell and keeps each one's fastest run (for a
shared, noisy machine); CPU time is the check that a wall-time ratio is not load noise.
"+calib" is the peak above the RSS the process had after importing onnxruntime, its quantizer and
quantcli and loading the data (interpreter and libraries that both tools pay; the imports are out of
the timed part too).
Sample counts above what the data file holds repeat it (the cost, not the ranges, is measured).
quantcli runs with ``--batch-size`` (its most; it shrinks the batch to fit its memory budget,
``--max-memory``), onnxruntime's quantizer with ``--ort-batch-size`` (default 1: its data reader
feeding one sample at a time, as its examples do; a larger batch multiplies its memory).
Every child runs under an address-space cap (``--cap``, default 12G; onnxruntime's histogram
calibrators can need 11-15 GB on OCR models): a child that runs out of memory under it is reported
as "exceeded the cap", a result, not a crash of the benchmark. Children run one at a time. The load
(``/proc/loadavg``) and the host's CPU and integer flags are printed first: on a shared machine the
wall times are noisy, CPU times less so.

    python benchmarks/bench_calibration.py                       # bundled models
    python benchmarks/bench_calibration.py --model m.onnx --data d.npz --samples 32 64
    python benchmarks/bench_calibration.py --model m.onnx --data d.npz --batch-size 1 8 32 \
        --max-memory 16G --tools quantcli
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_calib_worker.py"
BUNDLED = [
    ("digits_cnn", REPO / "sample_models/digits_cnn.onnx", REPO / "calibration_data/digits_cnn_calib.npz"),
    ("digits_transformer", REPO / "sample_models/digits_transformer.onnx",
     REPO / "calibration_data/digits_transformer_calib.npz"),
]  # fmt: skip


def run(tool: str, method: str, model: Path, data: Path, samples: int, batch: int, args: argparse.Namespace) -> dict:
    timeout = args.timeout
    cmd = [sys.executable, str(WORKER), tool, method, str(model), str(data), str(samples), str(batch)]
    cmd.append(str(parse_size(args.max_memory) if tool == "quantcli" and args.max_memory else 0))
    cap = parse_size(args.cap)

    def limit() -> None:  # in the child, before it runs anything
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        if any(word in proc.stderr for word in OUT_OF_MEMORY):
            return {"error": f"exceeded {args.cap} cap"}
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:120]}"}
    return json.loads(lines[-1])


#: what a child that hit the address-space cap prints (numpy, Python, onnxruntime's allocator, C++)
OUT_OF_MEMORY = ("MemoryError", "Unable to allocate", "Failed to allocate", "bad_alloc", "out of memory")


def host_line() -> str:
    """Load average, CPU model and its integer-kernel flags."""
    sys.path.insert(0, str(REPO))
    from quantcli.core.host import cpu_model, int8_flags

    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    return f"host: {cpu_model()}, flags {' '.join(int8_flags()) or '-'}; load average {' '.join(load)}"


def parse_size(text: str) -> int:
    """Bytes of a size such as 512M or 2G."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def best_of(
    repeat: int, method: str, model: Path, data: Path, n: int, batch: int, args: argparse.Namespace
) -> list[dict]:
    """quantcli and onnxruntime ``repeat`` times each, alternating; per tool the run with the least wall time."""
    best: list[dict] = [{}, {}]
    for _ in range(max(1, repeat)):
        for i, tool in enumerate(("quantcli", "ort")):
            if tool not in args.tools:
                best[i] = {"error": "not run"}
                continue
            size = batch if tool == "quantcli" else args.ort_batch_size
            r = run(tool, method, model, data, n, size, args)
            if not best[i] or r.get("wall_s", float("inf")) < best[i].get("wall_s", float("inf")):
                best[i] = r
    return best


def cell(r: dict, w: int) -> str:
    """Wall time, peak RSS and its part above the baseline, or the error."""
    if "wall_s" not in r:
        return f"{r['error']:>{w + 17}s}"
    own = r["peak_rss_mb"] - r["baseline_rss_mb"]
    return f"{r['wall_s']:{w}.2f} {r['peak_rss_mb']:8.0f} (+{own:5.0f})"


def ratio(q: dict, o: dict) -> str:
    """quantcli / onnxruntime: wall time, CPU time, peak RSS, RSS above the baseline."""
    if "wall_s" not in q or "wall_s" not in o:
        return ""
    q_own = max(q["peak_rss_mb"] - q["baseline_rss_mb"], 1.0)
    o_own = max(o["peak_rss_mb"] - o["baseline_rss_mb"], 1.0)
    return (
        f"{q['wall_s'] / o['wall_s']:8.2f} {q['cpu_s'] / o['cpu_s']:8.2f} "
        f"{q['peak_rss_mb'] / o['peak_rss_mb']:8.2f} {q_own / o_own:10.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--samples", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--methods", nargs="+", default=["minmax", "percentile", "entropy"])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[32], help="quantcli's (most) batch sizes")
    parser.add_argument("--ort-batch-size", type=int, default=1, help="samples per get_next of the ORT reader")
    parser.add_argument("--max-memory", help="quantcli's --max-memory (default: its own, 512M)")
    parser.add_argument("--tools", nargs="+", default=["quantcli", "ort"], choices=["quantcli", "ort"])
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per tool and cell (alternating); the fastest is kept"
    )
    parser.add_argument("--cap", default="12G", help="address-space cap of every child (RLIMIT_AS)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    models = [(args.model.stem, args.model, args.data)] if args.model else BUNDLED
    results = []
    print(host_line())
    for name, model, data in models:
        print(f"\n== {name}  (quantcli batch {args.batch_size}, ort batch {args.ort_batch_size}); {host_line()}")
        head = f"  {'method':10s} {'batch':>5s} {'samples':>7s} | {'quantcli s':>10s} {'RSS MB (+calib)':>16s} | "
        head += f"{'ort s':>8s} {'RSS MB (+calib)':>16s} | "
        head += f"{'time q/o':>8s} {'cpu q/o':>8s} {'RSS q/o':>8s} {'+calib q/o':>10s}"
        print(head)
        for method, batch, n in ((m, b, n) for m in args.methods for b in args.batch_size for n in args.samples):
            q, o = best_of(args.repeat, method, model, data, n, batch, args)
            results.append({"model": name, "method": method, "batch": batch, "samples": n, "quantcli": q, "ort": o})
            print(f"  {method:10s} {batch:5d} {n:7d} | {cell(q, 10)} | {cell(o, 8)} | {ratio(q, o)}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
