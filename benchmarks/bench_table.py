"""Benchmark: the fidelity table of issue 15 — every real model, default convert, budgeted search, onnxruntime.

    python benchmarks/fetch_models.py                       # once: models + real data into benchmarks/models/
    python benchmarks/bench_table.py --json table.json      # every model with data, both sample models
    python benchmarks/bench_table.py --models magika_standard_v3_3 --skip ort ort-u8

Per model, on its held-out ``_eval.npz`` samples against FP32 (nothing here tunes on them):

* ``fp32``: the task metric against labels where the data has them (else "-").
* ``default``: what a user gets from ``quantcli convert MODEL --data CALIB`` (min-max; 20% of the samples
  held back for the verdict). Task agreement with FP32 (``bench_models.METRICS``: top-1, CTC strings,
  text-mask IoU, detection F1, VAD decisions; cosine for the sentence encoder), worst-output SQNR,
  batch-1 speed against FP32 at 1 and 2 threads, and whether convert's own verdict warned.
* ``search``: ``convert --data CALIB --eval-data CALIB`` with a budget in the task's own terms, tuned on the
  calibration samples only (agreement 0.98 for classifiers and binary decisions, 0.95 for sequences, cosine
  0.99 for embeddings, IoU 0.9 for maps; detector heads, which have no task kind, F1 0.95 of their decoded
  boxes against FP32's, a Python metric of ``detection_f1.py`` given as ``--search-metric`` (ddddocr det),
  or SQNR 20 dB (NudeNet: 9 boxes in its calibration images)): the same
  columns plus float and run-time-quantized nodes and the search's wall time; when the search finds
  nothing inside the budget faster than FP32, the row says "exit 1" with the closest candidate.
* ``ort`` / ``ort-u8``: onnxruntime's ``quantize_static`` as its docs advise (``bench_models.run_ort``: pre-process,
  QDQ, per-channel, MinMax, int8 or uint8 activations), each in a child process with an address-space cap.

The "verdict check" line at the end lists models whose default convert misses agreement 0.98 / cosine 0.99 /
IoU 0.9 on held-out samples but whose verdict did not warn (must be none); a verdict that judged nothing
(all outputs raw: "no task metric", "not judged") passes no model, and is listed as such.
All sessions of a model are timed in alternation in this process; the host's CPU and int8 flags are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "benchmarks" / "models"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_convert import session, time_interleaved  # noqa: E402
from bench_models import (  # noqa: E402
    BASIC_PITCH_THRESHOLDS,
    METRICS,
    Outputs,
    batches,
    fixed_batch,
    load_npz,
    quantize_in_child,
    sqnr_db,
    top1,
)

from quantcli.api import convert_model  # noqa: E402
from quantcli.cli.flags import flag  # noqa: E402
from quantcli.compare.map_thresholds import DEFAULT_MAP_THRESHOLD, MapThresholds  # noqa: E402
from quantcli.compare.metrics import parse_metric  # noqa: E402
from quantcli.compare.output_kinds import OutputKind  # noqa: E402
from quantcli.core.errors import NotFasterError  # noqa: E402
from quantcli.core.host import cpu_model, int8_flags  # noqa: E402
from quantcli.search.accuracy_search import Budget, BudgetNotMetError, SearchOptions  # noqa: E402

SAMPLES = {
    "digits_cnn": (REPO / "sample_models/digits_cnn.onnx", REPO / "calibration_data/digits_cnn"),
    "digits_transformer": (
        REPO / "sample_models/digits_transformer.onnx",
        REPO / "calibration_data/digits_transformer",
    ),
}
AGREE, STRINGS, COSINE, IOU, F1 = 0.98, 0.95, 0.99, 0.9, 0.95
#: the budget in the task's own terms, per model (detector heads are raw tensors: F1 of the decoded boxes
#: against FP32's, a Python metric of ``detection_f1.py``, as a drop from FP32's 1.0 in points)
BUDGETS: dict[str, Budget] = {
    "ppocrv4_det": Budget(min_iou=IOU),
    "ppocrv4_rec": Budget(min_agreement=STRINGS),
    "ddddocr_ocr": Budget(min_agreement=STRINGS),
    "g2p_id_bert": Budget(min_agreement=STRINGS),
    "all_minilm_l6_v2": Budget(min_cosine=COSINE),
    "nudenet_320n": Budget(max_accuracy_drop=100 * (1 - F1)),  # 157 FP32 boxes in calibration, 167 held out
    "ddddocr_det": Budget(max_accuracy_drop=100 * (1 - F1)),
    "pp_layout_cdla": Budget(min_iou=IOU),  # its anchors x classes score maps (boxes stay raw)
    "basic_pitch_nmp": Budget(min_iou=IOU),
}
#: outputs whose kind the user names: the CTC recognizers' lines are read as decoded strings, as their
#: task metric (``bench_models.ctc_agreement``) reads them; Basic Pitch's posteriorgrams are maps
KINDS: dict[str, dict[str, OutputKind]] = {
    "ddddocr_ocr": {"387": OutputKind.CTC},
    "ppocrv4_rec": {"softmax_11.tmp_0": OutputKind.CTC},
    "basic_pitch_nmp": {f"StatefulPartitionedCall:{i}": OutputKind.MAP for i in range(3)},
}
#: the search's metric where the budget is a drop (``--search-metric``)
SEARCH_METRICS: dict[str, str] = {
    "ddddocr_det": f"{REPO / 'benchmarks' / 'detection_f1.py'}:ddddocr_det",
    "nudenet_320n": f"{REPO / 'benchmarks' / 'detection_f1.py'}:nudenet",
}
#: maps cut where the model's own library cuts them (the search's --min-iou and the verdict)
THRESHOLDS: dict[str, MapThresholds] = {
    "basic_pitch_nmp": MapThresholds(DEFAULT_MAP_THRESHOLD, tuple(BASIC_PITCH_THRESHOLDS.items())),
}
#: the bound a default convert should meet on the task metric (the verdict's thresholds; detections: the F1
#: the search's budget asks, since the verdict reads raw heads by SQNR only)
BOUNDS = {"cosine": COSINE, "text_mask_iou": IOU, "note_map_iou": IOU, "detection_f1_vs_fp32": F1}


def embedding_metric(ref: Outputs, cand: Outputs, labels: np.ndarray | None) -> dict[str, float]:
    """Sentence embeddings: mean per-sample cosine, and nearest-neighbour agreement within the set."""
    r = np.concatenate([b[0] for b in ref]).reshape(-1, ref[0][0].shape[-1]).astype(np.float64)
    c = np.concatenate([b[0] for b in cand]).reshape(r.shape).astype(np.float64)
    rn = r / np.linalg.norm(r, axis=1, keepdims=True)
    cn = c / np.linalg.norm(c, axis=1, keepdims=True)
    cos = float(np.mean(np.sum(rn * cn, axis=1)))

    def nearest(x: np.ndarray) -> np.ndarray:
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)

    return {"cosine": cos, "nn_agreement": float(np.mean(nearest(rn) == nearest(cn)))}


def metric_for(name: str) -> Callable[[Outputs, Outputs, np.ndarray | None], dict[str, float]]:
    return embedding_metric if name == "all_minilm_l6_v2" else METRICS.get(name, top1)


def budget_for(name: str) -> Budget:
    return BUDGETS.get(name, Budget(min_agreement=AGREE))


def task_value(metric: dict[str, float]) -> tuple[str, float]:
    """The task-agreement figure of a metric dict (first key that names agreement, IoU, F1 or cosine)."""
    for key in ("string_agreement", "masked_agreement", "top1_agreement", "decision_agreement", "cosine",
                "text_mask_iou", "note_map_iou", "detection_f1_vs_fp32"):  # fmt: skip
        if key in metric:
            return key, float(metric[key])
    raise KeyError(f"no task figure in {sorted(metric)}")


@dataclass
class Variant:
    path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)


def run_default(name: str, model: Path, calib: Path, out: Path) -> Variant:
    t0 = time.perf_counter()
    try:
        res = convert_model(model, out, data_path=calib, force=True, output_kinds=KINDS.get(name),
                            map_threshold=THRESHOLDS.get(name, DEFAULT_MAP_THRESHOLD))  # fmt: skip
    except Exception as exc:  # the table records failures, it does not stop
        return Variant(None, {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"})
    verdict = res.verdict
    return Variant(out, {
        "seconds": round(time.perf_counter() - t0, 1),
        "verdict_warned": bool(verdict and verdict.warnings),
        # all outputs raw and no metric: the verdict says "no task metric" and "not judged", it passes nothing
        "verdict_judged": bool(verdict and verdict.judged),
        # the warnings are templates naming options ($eval_data): render them as the command line does
        "verdict": " | ".join(verdict.render(flag)[1 : 1 + len(verdict.warnings)])
        if verdict and verdict.warnings else "ok" if verdict else "none",
    })  # fmt: skip


def run_search(name: str, model: Path, calib: Path, out: Path) -> Variant:
    budget = budget_for(name)
    metric = parse_metric(SEARCH_METRICS[name]) if name in SEARCH_METRICS else None
    described = f"F1 vs FP32 >= {F1:g} ({Path(SEARCH_METRICS[name]).name})" if metric else budget.describe()
    options = SearchOptions(
        budget, output_kinds=KINDS.get(name), map_threshold=THRESHOLDS.get(name, DEFAULT_MAP_THRESHOLD), metric=metric
    )
    t0 = time.perf_counter()
    try:
        res = convert_model(model, out, data_path=calib, eval_data=calib, search=options, output_kinds=KINDS.get(name))
    except (BudgetNotMetError, NotFasterError) as exc:  # convert's exit 1: what it says is the row
        return Variant(None, {"budget": described, "seconds": round(time.perf_counter() - t0, 1),
                              "exit1": " ".join(str(exc).split())[:300]})  # fmt: skip
    except Exception as exc:
        return Variant(None, {"budget": described, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    assert res.search is not None
    cand = res.search.chosen.candidate
    return Variant(out, {
        "budget": described,
        "seconds": round(time.perf_counter() - t0, 1),
        "trials": len(res.search.trials),
        "float_nodes": len(cand.float_nodes),
        "dynamic_nodes": len(getattr(cand, "dynamic_nodes", ()) or ()),
        "method": str(cand.method),
    })  # fmt: skip


def run_ort_variant(variant: str, model: Path, calib: Path, out: Path, args: argparse.Namespace) -> Variant:
    """onnxruntime's quantizer in a capped child; with ``--keep``, a model it wrote before is timed again."""
    record = out.with_suffix(".json")
    if args.keep and record.exists():
        info = json.loads(record.read_text())
        return Variant(out if info.get("ok") and out.exists() else None, {**info, "reused": True})
    info = quantize_in_child(variant, model, calib, out, args)
    return Variant(out if info.get("ok") and out.exists() else None, info)


def evaluate(name: str, paths: dict[str, Path], evaluation: Path, max_eval: int) -> dict[str, dict[str, Any]]:
    data, labels = load_npz(evaluation, max_eval)
    feeds = batches(data, fixed_batch(paths["fp32"]) or 16)
    outs = {key: [session(p, 2).run(None, f) for f in feeds] for key, p in paths.items()}
    ref, metric = outs["fp32"], metric_for(name)
    floats = [i for i, o in enumerate(ref[0]) if o.dtype.kind == "f"]
    rows: dict[str, dict[str, Any]] = {}
    for key, out in outs.items():
        m = metric(ref, out, labels)
        worst = min(sqnr_db([b[i] for b in ref], [b[i] for b in out]) for i in floats) if floats else float("nan")
        rows[key] = {"metric": m, "task": task_value(m), "sqnr_db": worst}
    return rows


def time_both(paths: dict[str, Path], evaluation: Path, args: argparse.Namespace) -> dict[str, dict[int, float]]:
    data, _ = load_npz(evaluation, 1)
    speeds: dict[str, dict[int, float]] = {k: {} for k in paths}
    for threads in (1, 2):
        ms = time_interleaved(paths, data, threads, args.runs, args.latency_budget, "min")
        for key in paths:
            speeds[key][threads] = ms["fp32"] / ms[key]
    return speeds


def bench(name: str, model: Path, calib: Path, evaluation: Path, args: argparse.Namespace, work: Path) -> dict:
    variants: dict[str, Variant] = {"fp32": Variant(model)}
    steps: dict[str, Callable[[], Variant]] = {
        "default": lambda: run_default(name, model, calib, (args.save or work) / f"{name}.default.onnx"),
        "search": lambda: run_search(name, model, calib, (args.save or work) / f"{name}.search.onnx"),
        "ort": lambda: run_ort_variant("ort", model, calib, (args.keep or work) / f"{name}.ort.onnx", args),
        "ort-u8": lambda: run_ort_variant("ort-u8", model, calib, (args.keep or work) / f"{name}.ort-u8.onnx", args),
    }
    for key, step in steps.items():
        if key in args.skip:
            continue
        print(f"  [{name}] {key} ...", flush=True)
        variants[key] = step()
    paths = {k: v.path for k, v in variants.items() if v.path is not None}
    quality = evaluate(name, paths, evaluation, args.max_eval)
    speeds = time_both(paths, evaluation, args)
    return {
        "model": name,
        "variants": {k: {**v.info, **quality.get(k, {}), "speedup": speeds.get(k)} for k, v in variants.items()},
    }


def _cell(row: dict[str, Any], labelled: bool) -> str:
    if "task" not in row:
        return "-"
    key, value = row["task"]
    acc = row["metric"].get("accuracy")
    text = f"{key.replace('_', ' ')} {value:.3f}"
    return text + (f" (acc {acc:.3f})" if labelled and acc is not None else "")


def _speed(row: dict[str, Any]) -> str:
    s = {int(k): v for k, v in (row.get("speedup") or {}).items()}  # JSON keys are strings
    return f"{s[1]:.2f}x / {s[2]:.2f}x" if s else "-"


def print_table(results: list[dict[str, Any]]) -> None:
    print("\n| model | variant | task agreement with FP32 (held out) | worst SQNR dB | speed vs FP32 b1, 1 / 2 threads "
          "| notes |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | - | **bench failed**: {r['error'][:160]} | | | |")
            continue
        fp = r["variants"]["fp32"]
        acc = fp.get("metric", {}).get("accuracy")
        fp_text = f"accuracy {acc:.3f}" if acc is not None else "-"
        print(f"| {r['model']} | fp32 | {fp_text} | - | 1.00x | |")
        for key, row in r["variants"].items():
            if key == "fp32":
                continue
            note = _note(key, row)
            sqnr = row.get("sqnr_db")
            sq = f"{sqnr:.1f}" if isinstance(sqnr, float) and np.isfinite(sqnr) else "-"
            print(f"| | {key} | {_cell(row, True)} | {sq} | {_speed(row)} | {note} |")
    print("\nVerdict check (default convert; bounds agreement 0.98 / strings 0.95 / cosine 0.99 / IoU 0.9 / F1 0.95):")
    for r in results:
        row = r["variants"].get("default", {})
        if "task" not in row:
            continue
        key, value = row["task"]
        bound = BOUNDS.get(key, STRINGS if key == "string_agreement" else AGREE)
        missed = value < bound
        warned, judged = row.get("verdict_warned"), row.get("verdict_judged", True)
        said = "warned" if warned else "ok" if judged else "no task metric (not judged)"
        state = "ok" if warned or not missed or not judged else "MISSED BY THE VERDICT"
        print(f"- {r['model']}: {key} {value:.3f} (bound {bound}), verdict {said}: {state}")


def _note(key: str, row: dict[str, Any]) -> str:
    if "error" in row:
        return f"**failed**: {row['error'][:120]}"
    if "exit1" in row:
        return f"exit 1 after {row.get('seconds')} s: {row['exit1'][:160]}"
    if key == "default":
        text = row.get("verdict", "")
        return (text if text.startswith("verdict:") else f"verdict: {text}")[:160]
    if key == "search":
        return (f"{row['budget']}: {row['float_nodes']} float, {row['dynamic_nodes']} dynamic nodes, "
                f"{row['trials']} trials, {row['seconds']} s")  # fmt: skip
    return "pre-process failed" if str(row.get("pre_process", "ok")).startswith("failed") else ""


def model_list(args: argparse.Namespace) -> dict[str, tuple[Path, Path, Path]]:
    found = {n: (m, Path(f"{d}_calib.npz"), Path(f"{d}_eval.npz")) for n, (m, d) in SAMPLES.items()}
    manifest = json.loads((MODELS / "manifest.json").read_text()) if (MODELS / "manifest.json").exists() else {}
    for n in manifest:
        if (MODELS / f"{n}_calib.npz").exists() and (MODELS / f"{n}_eval.npz").exists():
            found[n] = (MODELS / f"{n}.onnx", MODELS / f"{n}_calib.npz", MODELS / f"{n}_eval.npz")
    return {n: v for n, v in found.items() if not args.models or n in args.models}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="sample or manifest names (default: all with data)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("default", "search", "ort", "ort-u8"))
    parser.add_argument("--json", type=Path, help="write every figure here (after each model)")
    parser.add_argument("--resume", action="store_true", help="keep the models already in --json, run the rest")
    parser.add_argument("--print-only", action="store_true", help="print the table of --json, run nothing")
    parser.add_argument("--max-eval", type=int, default=512, help="evaluation samples (spread through the file)")
    parser.add_argument("--calib-samples", type=int, default=64, help="onnxruntime's calibration samples")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--latency-budget", type=float, default=20.0, help="seconds of timing per thread count")
    parser.add_argument("--mem-gb", type=float, default=10.0, help="address-space cap of onnxruntime's quantizer")
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument(
        "--keep",
        type=Path,
        help="keep onnxruntime's models here, and reuse them in a later run (its output is "
        "independent of quantcli's code, so a rerun after a quantcli change times the same files)",
    )
    parser.add_argument(
        "--save",
        type=Path,
        help="write quantcli's models (default, search) here rather than to a temporary folder, e.g. to time "
        "them again at a quieter moment (a search is long, its timing short)",
    )
    args = parser.parse_args(argv)
    print(f"host: {cpu_model()}; int8 flags: {', '.join(int8_flags()) or 'none'}; onnxruntime {ort.__version__}, "
          f"onnx {onnx.__version__}")  # fmt: skip
    if args.print_only and args.json:
        print_table(json.loads(args.json.read_text()))
        return 0
    for folder in (args.keep, args.save):
        if folder:
            folder.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.json.read_text()) if args.resume and args.json and args.json.exists() else []
    done = {r["model"] for r in results}
    with tempfile.TemporaryDirectory(prefix="bench-table-") as tmp:
        for name, (model, calib, evaluation) in model_list(args).items():
            if name in done:
                continue
            t0 = time.perf_counter()
            try:
                results.append(bench(name, model, calib, evaluation, args, Path(tmp)))
            except Exception as exc:  # one model's failure is a row, not the end of the run
                results.append({"model": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}", "variants": {}})
            print(f"  [{name}] done in {time.perf_counter() - t0:.0f}s", flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1, default=str))
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
