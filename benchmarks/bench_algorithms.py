"""Benchmark: each accuracy algorithm on and off, on the bundled and the real public models.

For every model and variant: ``quantcli.api.convert_model`` on the calibration data, then
``compare_models`` on the evaluation data: task accuracy (labels), output SQNR against FP32, and
batch-1 single-thread latency of FP32 and quantized timed in alternation (speed-up = FP32 / quant),
and each variant timed in alternation against the plain quantized model ("vs plain" = plain / variant,
1.00 = same speed), which is what shows whether an algorithm costs speed.

Usage:
    python benchmarks/bench_algorithms.py                       # bundled + benchmarks/models if fetched
    python benchmarks/bench_algorithms.py --models digits_cnn --runs 100 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quantcli.api import compare_models, convert_model  # noqa: E402
from quantcli.calibration import make_session  # noqa: E402
from quantcli.data import model_input_specs, open_dataset  # noqa: E402
from quantcli.evaluate import measure_latency  # noqa: E402
from quantcli.graph import load_model  # noqa: E402
from quantcli.host import default_config  # noqa: E402
from quantcli.options import AlgorithmOptions, CalibrationMethod, WeightClipping  # noqa: E402

MODELS_DIR = REPO / "benchmarks" / "models"
BUNDLED = {
    "digits_cnn": (REPO / "sample_models/digits_cnn.onnx", REPO / "calibration_data/digits_cnn_calib.npz",
                   REPO / "calibration_data/digits_cnn_eval.npz"),
    "digits_transformer": (REPO / "sample_models/digits_transformer.onnx",
                           REPO / "calibration_data/digits_transformer_calib.npz",
                           REPO / "calibration_data/digits_transformer_eval.npz"),
}  # fmt: skip
REAL = ("ppocr_mobile_v2_cls", "magika_standard_v3_3")

VARIANTS: dict[str, tuple[AlgorithmOptions, WeightClipping]] = {
    "plain": (AlgorithmOptions(), WeightClipping.ABSMAX),
    "cle": (AlgorithmOptions(cle=True), WeightClipping.ABSMAX),
    "smoothquant": (AlgorithmOptions(smoothquant=0.5), WeightClipping.ABSMAX),
    "bias-correction": (AlgorithmOptions(bias_correction=True), WeightClipping.ABSMAX),
    "weight-clipping": (AlgorithmOptions(), WeightClipping.MSE),
    "all": (AlgorithmOptions(cle=True, smoothquant=0.5, bias_correction=True), WeightClipping.MSE),
}


def models(models_dir: Path) -> dict[str, tuple[Path, Path, Path]]:
    found = dict(BUNDLED)
    for name in REAL:
        paths = tuple(models_dir / f"{name}{suffix}" for suffix in (".onnx", "_calib.npz", "_eval.npz"))
        if all(p.exists() for p in paths):
            found[name] = paths  # type: ignore[assignment]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="subset of model names")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--method", default="minmax", choices=[str(m) for m in CalibrationMethod])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    method = CalibrationMethod(args.method)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, calib, evaluation) in models(args.models_dir).items():
            if args.models and name not in args.models:
                continue
            for variant in args.variants:
                algorithms, clipping = VARIANTS[variant]
                out = Path(tmp) / f"{name}.{variant}.onnx"
                config = replace(default_config(), weight_clipping=clipping)
                converted = convert_model(
                    model,
                    out,
                    data_path=calib,
                    config=config,
                    method=method,
                    algorithms=algorithms,
                    force=True,
                    upgrade_opset=True,
                )
                result = compare_models(
                    model, out, evaluation, threads=1, latency_batch_sizes=(1,), runs=args.runs, warmup=10
                )
                o = result.outputs[0]
                lat = result.latency[0]
                vs_plain = 1.0
                if variant == "plain":
                    plain_path = Path(tmp) / f"{name}.plain-ref.onnx"
                    plain_path.write_bytes(out.read_bytes())
                elif "plain" in args.variants:
                    feed = next(open_dataset(evaluation, model_input_specs(load_model(model))).batches(1))
                    vs_plain = measure_latency(
                        make_session(load_model(plain_path), threads=1),
                        make_session(load_model(out), threads=1),
                        feed,
                        threads=1,
                        runs=args.runs,
                    ).speedup
                row = {
                    "model": name,
                    "variant": variant,
                    "method": str(method),
                    "fp32_top1": o.accuracy_fp32.value if o.accuracy_fp32 else None,
                    "quant_top1": o.accuracy_quant.value if o.accuracy_quant else None,
                    "agreement": o.top1_agreement.value if o.top1_agreement else None,
                    "sqnr_db": o.sqnr_db,
                    "fp32_ms": lat.reference.median_ms,
                    "quant_ms": lat.candidate.median_ms,
                    "speedup": lat.speedup,
                    "vs_plain": vs_plain,
                    "notes": [line for a in converted.algorithms for line in a.lines()],
                }
                rows.append(row)
                top1 = "-" if row["quant_top1"] is None else f"{100 * row['quant_top1']:.2f}%"
                fp32 = "-" if row["fp32_top1"] is None else f"{100 * row['fp32_top1']:.2f}%"
                print(
                    f"{name:22s} {variant:16s} top1 {top1:>7s} (fp32 {fp32}) SQNR {o.sqnr_db:5.1f} dB  "
                    f"b1 {lat.reference.median_ms:.3f} -> {lat.candidate.median_ms:.3f} ms ({lat.speedup:.2f}x)  "
                    f"vs plain {vs_plain:.2f}x",
                    flush=True,
                )
                for line in row["notes"]:
                    print(f"    {line}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
