"""Transformer encoders under the default plan: fidelity to FP32 on held-out data and batch-1 speed.

    PYTHONPATH=. python benchmarks/bench_encoder.py [--runs 30] [--models all_minilm_l6_v2,g2p_id_bert]

For each model: the default ``calibrate`` (min-max on the calibration file) + ``convert``, then
``compare`` on the held-out file: the task-level metric of each output (cosine for embeddings,
whole-sequence agreement for per-position outputs, top-1 agreement for classifiers), output SQNR,
and batch-1 latency of FP32 and int8 timed in alternation at 1 and 2 threads. Also prints the
host's CPU model and integer-relevant flags. The real models come from ``benchmarks/fetch_models.py``
(``--models-dir``, default ``benchmarks/models``; ``all_minilm_l6_v2`` needs ``--only
all_minilm_l6_v2``); the digits transformer is bundled. ``--disable-rules residual,encoder-linear``
gives the plan without the encoder rules, for a before/after.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
from dataclasses import replace
from pathlib import Path

import onnxruntime as ort

from quantcli.api import calibrate, compare_models, convert
from quantcli.core.host import cpu_model, default_config, int8_flags
from quantcli.pipeline.request import CalibrateRequest, CompareRequest, ConvertRequest

REPO = Path(__file__).resolve().parent.parent
MODELS = ("all_minilm_l6_v2", "g2p_id_bert", "digits_transformer")


def _paths(name: str, models_dir: Path) -> tuple[Path, Path, Path]:
    if name == "digits_transformer":
        return (REPO / "sample_models" / f"{name}.onnx", REPO / "calibration_data" / f"{name}_calib.npz",
                REPO / "calibration_data" / f"{name}_eval.npz")  # fmt: skip
    return models_dir / f"{name}.onnx", models_dir / f"{name}_calib.npz", models_dir / f"{name}_eval.npz"


def bench(name: str, models_dir: Path, runs: int, disabled: frozenset[str], out: Path) -> list[str]:
    """Rows for one model: its outputs' fidelity, then the speed at 1 and 2 threads."""
    model, calib, evals = _paths(name, models_dir)
    if not model.exists():
        return [f"{name:<20} missing: {model} (run benchmarks/fetch_models.py)"]
    ranges = calibrate(CalibrateRequest(model, calib))
    config = replace(default_config(), disabled_rules=disabled)
    quantized = out / f"{name}.int8.onnx"
    convert(ConvertRequest(model, quantized, calibration=ranges, config=config, force=True, verdict=False))
    rows = []
    for threads in (1, 2):
        r = compare_models(
            CompareRequest(model, quantized, evals, threads=threads, latency_batch_sizes=(1,), runs=runs, warmup=5)
        )
        if threads == 1:
            for k in r.kinds:
                metric = next(
                    f"{label} {v:.3f}"
                    for label, v in (("agreement", k.agreement), ("cosine", k.cosine), ("IoU", k.iou), ("", 0.0))
                    if v is not None
                )
                rows.append(f"{name:<20} {k.name:<20} {k.kind!s:<11} {metric:<17} SQNR {k.sqnr_db:6.1f} dB "
                            f"on {k.num_samples} held-out samples")  # fmt: skip
        lat = r.latency[0]
        rows.append(f"{name:<20} batch 1, {threads} thread(s): FP32 {lat.reference.median_ms:7.2f} ms, int8 "
                    f"{lat.candidate.median_ms:7.2f} ms: {lat.speedup:.2f}x "
                    f"[IQR {lat.speedup_p25:.2f}, {lat.speedup_p75:.2f}]")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--models-dir", type=Path, default=REPO / "benchmarks" / "models")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--disable-rules", default="", help="planning rules to switch off (before/after)")
    parser.add_argument("--max-memory-gb", type=float, default=8.0, help="address-space cap of this process")
    args = parser.parse_args()
    cap = int(args.max_memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    print(f"host: {cpu_model()}; int8 flags: {', '.join(int8_flags()) or 'none'}; onnxruntime {ort.__version__}")
    disabled = frozenset(r for r in args.disable_rules.split(",") if r)
    print(f"plan: default{' without ' + ', '.join(sorted(disabled)) if disabled else ''}; min-max calibration")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for row in bench(name, args.models_dir, args.runs, disabled, Path(tmp)):
                print(row)


if __name__ == "__main__":
    main()
