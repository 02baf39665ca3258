"""Quantize Silero VAD (its whole network sits inside If branches) and measure it on a long real stream.

    PYTHONPATH=. python benchmarks/bench_silero.py [--chunks 240] [--json out.json] [--save-data DIR]
        [--no-recurrent-rule]

``--save-data DIR`` writes the calibration and evaluation streams as the CLI reads them
(``DIR/calib/sr16000.npz``: ``input`` [N, 512], ``state`` [2, N, 128] recorded from FP32, ``sr`` scalar; one
file per sample rate), for ``quantcli calibrate silero_vad.onnx --data DIR/calib --batch-axis state=1``.
``--no-recurrent-rule`` quantizes the Conv feeding the LSTM too (the rule of ``quantcli.static.recurrent`` off),
for the before/after comparison.

Data: there is no labelled speech offline. The only real recordings on this machine are CPython's
test audio (``test/audiotest.au``, 3.5 s u-law at 8012 Hz; ``test/audiodata/pluck-*.wav``) and
IPython's ``lib/tests/test.wav``. Calibration runs ``audiotest.au`` through the FP32 model as a
stream (state fed back) at 16 kHz and at 8 kHz, so both sample-rate branches are calibrated.
Evaluation uses a different stream: the pluck and IPython recordings plus ``audiotest.au`` played
backwards, resampled and repeated to ``--chunks`` chunks; the FP32 and the quantized model each feed
their own state back, so drift accumulates as in deployment. Figures are agreement with FP32, not
detection accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sunau
import sysconfig
import wave
from pathlib import Path

import numpy as np
import onnx

from quantcli.compare.evaluate import measure_latency
from quantcli.core.host import default_config
from quantcli.core.options import CalibrationMethod
from quantcli.data.datasets import FeedList
from quantcli.graph.session import make_session
from quantcli.passes.preprocess import preprocess
from quantcli.static.lowering import apply_plan
from quantcli.static.planning import make_plan
from quantcli.stats.calibration import calibrate
from quantcli.verify.audit import audit_fusion

MODEL = Path(__file__).resolve().parent / "models" / "silero_vad.onnx"
if not MODEL.exists():  # worktrees share the fetched models of the main checkout
    MODEL = Path("/work/main/benchmarks/models/silero_vad.onnx")
CHUNK = {16000: 512, 8000: 256}


def _resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    n = round(len(x) * target / rate)
    return np.interp(np.linspace(0, len(x) - 1, n), np.arange(len(x)), x).astype(np.float32)


def _read(path: Path) -> tuple[np.ndarray, int]:
    opener = sunau.open if path.suffix == ".au" else wave.open
    with opener(str(path)) as w:  # type: ignore[operator]
        raw = w.readframes(w.getnframes())
        width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
    if width == 2:  # sunau decodes u-law to native-endian int16
        data = np.frombuffer(raw, "<i2" if path.suffix in (".au", ".wav") else ">i2").astype(np.float32) / 32768
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        data = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float32) / 2**23
    else:
        data = np.frombuffer(raw, "<i4").astype(np.float32) / 2**31
    return data.reshape(-1, channels).mean(axis=1), rate


def real_audio() -> tuple[np.ndarray, int, list[tuple[np.ndarray, int]]]:
    """(calibration signal, its rate, evaluation signals with rates), all real recordings."""
    test = Path(sysconfig.get_paths()["stdlib"]) / "test"
    calib, rate = _read(test / "audiotest.au")
    evals = [(calib[::-1].copy(), rate)]
    for p in [
        test / "audiodata" / "pluck-pcm16.wav",
        *Path(sysconfig.get_paths()["purelib"]).glob("IPython/lib/tests/test.wav"),
    ]:
        if p.exists():
            evals.append(_read(p))
    pyenv = Path("/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/IPython/lib/tests/test.wav")
    if pyenv.exists() and len(evals) < 3:
        evals.append(_read(pyenv))
    return calib, rate, evals


def stream(model_session, chunks: list[np.ndarray], sr: int, record: list | None = None):
    """Run chunks in order with the state fed back; returns (probabilities, states)."""
    state = np.zeros((2, 1, 128), np.float32)
    probs, states = [], []
    for c in chunks:
        feed = {"input": c[None, :], "state": state, "sr": np.array(sr, np.int64)}
        if record is not None:
            record.append(feed)
        out, state = model_session.run(None, feed)
        probs.append(float(out.ravel()[0]))
        states.append(state)
    return np.array(probs), np.stack(states)


def chunked(x: np.ndarray, size: int, count: int | None = None) -> list[np.ndarray]:
    if count is not None:
        reps = -(-count * size // len(x))
        x = np.tile(x, reps)[: count * size]
    n = len(x) // size
    return [x[i * size : (i + 1) * size].astype(np.float32) for i in range(n)]


def _save_stream(path: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    """One stream as the CLI reads it: chunks on axis 0, states on axis 1 (``--batch-axis state=1``), sr scalar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        input=np.concatenate([f["input"] for f in feeds]),
        state=np.concatenate([f["state"] for f in feeds], axis=1),
        sr=feeds[0]["sr"],
    )


def sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - out) ** 2))
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / noise))


def ort_quantized(feeds: list[dict[str, np.ndarray]]):
    """onnxruntime's quantize_static as its docs advise (pre-processing, QDQ, per-channel, uint8)."""
    import tempfile

    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    work = Path(tempfile.mkdtemp(prefix="silero-ort-"))
    source, note = MODEL, "pre-processed"
    try:
        quant_pre_process(str(MODEL), str(work / "pre.onnx"))
        source = work / "pre.onnx"
    except Exception as exc:  # it fails on many exported models
        note = f"quant_pre_process failed: {type(exc).__name__}: {str(exc)[:80]}"
    it = iter(feeds)

    class Reader:
        def get_next(self):
            return next(it, None)

    quantize_static(
        str(source), str(work / "ort.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    model = onnx.load(str(work / "ort.onnx"))
    audit = audit_fusion(model)
    report = {
        "note": note,
        "integer_kernels": audit.integer_op_counts(),
        "float_compute_left": [op for _, op in audit.float_compute_nodes],
        "size_bytes": (work / "ort.onnx").stat().st_size,
    }
    return make_session(model, threads=1), report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=240)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--method", default="minmax", choices=[m.value for m in CalibrationMethod])
    ap.add_argument("--percentile", type=float, default=99.99)
    ap.add_argument("--exclude", action="append", default=[], help="node-name pattern left float (repeatable)")
    ap.add_argument("--ort", action="store_true", help="also quantize with onnxruntime's quantize_static (same feeds)")
    ap.add_argument("--save-data", type=Path, help="write the calibration/evaluation streams as .npz for the CLI")
    ap.add_argument("--no-recurrent-rule", action="store_true", help="quantize the Conv feeding the LSTM too")
    args = ap.parse_args()
    model = onnx.load(str(MODEL))
    prepared, _ = preprocess(model)
    fp32 = make_session(model, threads=1)
    calib, rate, evals = real_audio()
    feeds: list[dict[str, np.ndarray]] = []
    for sr in (16000, 8000):
        stream(fp32, chunked(_resample(calib, rate, sr), CHUNK[sr]), sr, record=feeds)
    result = calibrate(
        prepared, FeedList(feeds, Path("<stream>")), model_sha256="silero",
        method=CalibrationMethod(args.method), percentile=args.percentile,
    )  # fmt: skip
    disabled = frozenset({"recurrent-feed"} if args.no_recurrent_rule else ())
    config = dataclasses.replace(default_config(), exclude_nodes=tuple(args.exclude), disabled_rules=disabled)
    plan = make_plan(prepared, result.ranges, config)
    quantized = apply_plan(prepared, plan)
    onnx.checker.check_model(quantized)
    q = make_session(quantized, threads=1)
    audit = audit_fusion(quantized)
    report: dict[str, object] = {
        "recurrent_rule": not args.no_recurrent_rule,
        "kept_float_for_recurrent_state": sorted(s.node for s in plan.skipped if "recurrent cell" in s.reason),
        "calibration_runs": len(feeds),
        "unobserved_subgraph_tensors": len(result.unobserved),
        "quantized_nodes": plan.summary(),
        "quantized_inside_subgraphs": sum(len(s.quantized_nodes) for s in plan.subgraphs),
        "left_float_inside_subgraphs": sum(len(s.skipped) for s in plan.subgraphs),
        "size_bytes": {"fp32": MODEL.stat().st_size, "quantized": quantized.ByteSize()},
        "subgraphs": {
            s.path: {
                "quantized": [op for _, op in s.quantized_nodes],
                "skipped": sorted({f"{k.op_type}: {k.reason}" for k in s.skipped}),
            }
            for s in plan.subgraphs
            if s.quantized_nodes
        },
        "integer_kernels": audit.integer_op_counts(),
        "float_compute_left": [op for _, op in audit.float_compute_nodes],
    }
    ort_q = None
    if args.ort:
        ort_q, ort_report = ort_quantized(feeds)
        report["onnxruntime"] = ort_report
    for sr in (16000, 8000):
        signal = np.concatenate([_resample(x, r, sr) for x, r in evals])
        chunks = chunked(signal, CHUNK[sr], args.chunks)
        recorded: list[dict[str, np.ndarray]] = []
        p_ref, s_ref = stream(fp32, chunks, sr, record=recorded)
        if args.save_data:
            calib_feeds = [f for f in feeds if int(f["sr"]) == sr]
            for part, part_feeds in (("calib", calib_feeds), ("eval", recorded)):
                _save_stream(args.save_data / part / f"sr{sr}.npz", part_feeds)
        p_q, s_q = stream(q, chunks, sr)
        # one step at a time from the FP32 state (teacher forcing): the error of a single step, no feedback
        forced = [
            q.run(None, {"input": c[None, :], "state": prev, "sr": np.array(sr, np.int64)})
            for c, prev in zip(chunks, [np.zeros((2, 1, 128), np.float32), *s_ref[:-1]], strict=True)
        ]
        p_forced = np.array([float(o[0].ravel()[0]) for o in forced])
        s_forced = np.stack([o[1] for o in forced])
        feed = {"input": chunks[0][None, :], "state": s_ref[10], "sr": np.array(sr, np.int64)}
        lat = measure_latency(fp32, q, feed, threads=1, warmup=20, runs=400)
        report[f"sr{sr}"] = {
            "chunks": len(chunks),
            "prob_sqnr_db": round(sqnr(p_ref, p_q), 2),
            "prob_max_abs_diff": round(float(np.max(np.abs(p_ref - p_q))), 4),
            "decisions_agree_at_0.5": round(float(np.mean((p_ref > 0.5) == (p_q > 0.5))), 4),
            "fp32_prob_range": [round(float(p_ref.min()), 4), round(float(p_ref.max()), 4)],
            "state_sqnr_db_final": round(sqnr(s_ref[-1], s_q[-1]), 2),
            "one_step_from_fp32_state": {
                "prob_sqnr_db": round(sqnr(p_ref, p_forced), 2),
                "state_sqnr_db": round(sqnr(s_ref, s_forced), 2),
            },
            "state_sqnr_db_first_50_last_50": [
                round(sqnr(s_ref[:50], s_q[:50]), 2),
                round(sqnr(s_ref[-50:], s_q[-50:]), 2),
            ],
            "latency_ms_b1": {
                "fp32": round(lat.reference.median_ms, 4),
                "quantized": round(lat.candidate.median_ms, 4),
                "speedup": round(lat.speedup, 3),
            },
        }
        if ort_q is not None:
            p_o, s_o = stream(ort_q, chunks, sr)
            lat_o = measure_latency(fp32, ort_q, feed, threads=1, warmup=20, runs=400)
            report[f"sr{sr}"]["onnxruntime"] = {  # type: ignore[index]
                "prob_sqnr_db": round(sqnr(p_ref, p_o), 2),
                "decisions_agree_at_0.5": round(float(np.mean((p_ref > 0.5) == (p_o > 0.5))), 4),
                "state_sqnr_db_first_50_last_50": [
                    round(sqnr(s_ref[:50], s_o[:50]), 2),
                    round(sqnr(s_ref[-50:], s_o[-50:]), 2),
                ],
                "speedup_b1": round(lat_o.speedup, 3),
            }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
