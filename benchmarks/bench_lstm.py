"""Does int8 pay for LSTM weights? FP32 LSTM vs onnxruntime's com.microsoft DynamicQuantizeLSTM.

    PYTHONPATH=. python benchmarks/bench_lstm.py

DynamicQuantizeLSTM takes int8 W [dirs, input, 4H] and R [dirs, hidden, 4H] (transposed from ONNX
LSTM's [dirs, 4H, input]) with per-gate-row scales [dirs, 4H]; the input and hidden state are
quantized on the fly at every step. Both models run in alternation (quantcli.compare.evaluate.measure_latency),
one thread. Accuracy is the SQNR of the output sequence and final states against FP32, with the
state fed back over a 300-step stream of a smooth signal.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantcli.compare.evaluate import measure_latency
from quantcli.graph.session import make_session


def lstm_models(seq: int, inp: int, hidden: int, seed: int = 0) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    rng = np.random.default_rng(seed)
    w = (rng.normal(size=(1, 4 * hidden, inp)) / np.sqrt(inp)).astype(np.float32)
    r = (rng.normal(size=(1, 4 * hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
    b = (rng.normal(size=(1, 8 * hidden)) * 0.1).astype(np.float32)
    ins = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [seq, 1, inp]),
        helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, 1, hidden]),
        helper.make_tensor_value_info("c0", TensorProto.FLOAT, [1, 1, hidden]),
    ]
    outs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [seq, 1, 1, hidden]),
        helper.make_tensor_value_info("hN", TensorProto.FLOAT, [1, 1, hidden]),
        helper.make_tensor_value_info("cN", TensorProto.FLOAT, [1, 1, hidden]),
    ]

    def model(nodes: list, inits: list, domains: list) -> onnx.ModelProto:
        m = helper.make_model(helper.make_graph(nodes, "lstm", ins, outs, inits), opset_imports=domains)
        m.ir_version = 8
        return m

    fp32 = model(
        [helper.make_node("LSTM", ["x", "W", "R", "B", "", "h0", "c0"], ["y", "hN", "cN"], hidden_size=hidden)],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R"), numpy_helper.from_array(b, "B")],
        [helper.make_opsetid("", 17)],
    )

    def per_row(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scale = np.maximum(np.abs(a).max(axis=2), 1e-12) / 127.0  # [1, 4H]
        q = np.clip(np.round(a / scale[:, :, None]), -127, 127).astype(np.int8)
        return q.transpose(0, 2, 1).copy(), scale.astype(np.float32)

    wq, ws = per_row(w)
    rq, rs = per_row(r)
    zp = np.zeros((1, 4 * hidden), np.int8)
    inits = [
        numpy_helper.from_array(wq, "Wq"), numpy_helper.from_array(rq, "Rq"), numpy_helper.from_array(b, "B"),
        numpy_helper.from_array(ws, "Ws"), numpy_helper.from_array(zp, "Wz"),
        numpy_helper.from_array(rs, "Rs"), numpy_helper.from_array(zp.copy(), "Rz"),
    ]  # fmt: skip
    node = helper.make_node(
        "DynamicQuantizeLSTM",
        ["x", "Wq", "Rq", "B", "", "h0", "c0", "", "Ws", "Wz", "Rs", "Rz"],
        ["y", "hN", "cN"],
        domain="com.microsoft",
        hidden_size=hidden,
    )
    quant = model([node], inits, [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return fp32, quant


def sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - out).astype(np.float64) ** 2)))


def main() -> None:
    for seq, inp, hidden in [(1, 128, 128), (1, 256, 256), (1, 512, 512), (64, 128, 128), (64, 512, 512)]:
        fp32, quant = lstm_models(seq, inp, hidden)
        a, b = make_session(fp32, threads=1), make_session(quant, threads=1)
        rng = np.random.default_rng(1)
        feed = {
            "x": rng.normal(size=(seq, 1, inp)).astype(np.float32),
            "h0": np.zeros((1, 1, hidden), np.float32),
            "c0": np.zeros((1, 1, hidden), np.float32),
        }
        speed = [measure_latency(a, b, feed, threads=1, warmup=10, runs=100) for _ in range(3)]
        # long stream: 300 calls, state fed back
        t = np.arange(300 * seq)
        freqs = np.linspace(0.01, 0.2, inp)
        signal = np.sin(np.outer(t, freqs) + np.arange(inp)).astype(np.float32)
        states = {k: {"h0": feed["h0"], "c0": feed["c0"]} for k in ("ref", "q")}
        ys: dict[str, list[np.ndarray]] = {"ref": [], "q": []}
        for step in range(300):
            x = signal[step * seq : (step + 1) * seq].reshape(seq, 1, inp)
            for key, sess in (("ref", a), ("q", b)):
                y, h, c = sess.run(None, {"x": x, **states[key]})
                states[key] = {"h0": h, "c0": c}
                ys[key].append(y)
        y_ref, y_q = np.concatenate(ys["ref"]), np.concatenate(ys["q"])
        print(
            f"seq {seq:3d} input {inp:4d} hidden {hidden:4d}: "
            f"fp32 {np.median([s.reference.median_ms for s in speed]):.4f} ms, "
            f"int8 {np.median([s.candidate.median_ms for s in speed]):.4f} ms, "
            f"speed-up x{np.median([s.speedup for s in speed]):.2f}; "
            f"stream SQNR first/last 50 calls {sqnr(y_ref[: 50 * seq], y_q[: 50 * seq]):.1f}/"
            f"{sqnr(y_ref[-50 * seq :], y_q[-50 * seq :]):.1f} dB, "
            f"final c {sqnr(states['ref']['c0'], states['q']['c0']):.1f} dB"
        )


if __name__ == "__main__":
    main()
