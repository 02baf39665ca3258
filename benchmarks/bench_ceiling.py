"""What int8 can buy on this CPU at all: FP32 against quantcli's int8 on ideal conv stacks, batch 1.

A real network's speed-up is bounded by its compute layers' own speed-up. This script builds stacks of
six identical Conv+Relu layers (3x3, 1x1 and depthwise 3x3, at typical CNN widths), quantizes each with
quantcli (calibrated on random inputs: this measures speed only, never accuracy), checks that every Conv
runs as QLinearConv, and times FP32 and int8 in alternation in one process (1 thread by default).
Compare the figures with `bench_convert.py --real`: a network cannot beat the ceiling of its layer mix.

    python benchmarks/bench_ceiling.py [--threads 1] [--runs 40]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_convert import time_interleaved
from quantcli.api import convert_model
from quantcli.core.host import detect_host
from quantcli.verify.audit import audit_fusion

#: (label, channels, spatial size, kernel, depthwise)
STACKS = [
    ("3x3 conv, 64 ch, 56x56", 64, 56, 3, False),
    ("3x3 conv, 128 ch, 28x28", 128, 28, 3, False),
    ("3x3 conv, 256 ch, 14x14", 256, 14, 3, False),
    ("1x1 conv, 256 ch, 14x14", 256, 14, 1, False),
    ("1x1 conv, 512 ch, 7x7", 512, 7, 1, False),
    ("depthwise 3x3, 128 ch, 56x56", 128, 56, 3, True),
    ("depthwise 3x3, 512 ch, 14x14", 512, 14, 3, True),
]


def conv_stack(channels: int, size: int, kernel: int, depthwise: bool, layers: int = 6) -> onnx.ModelProto:
    """``layers`` x (Conv + Relu), He-initialised so activations keep their scale."""
    rng = np.random.default_rng(0)
    group = channels if depthwise else 1
    fan_in = kernel * kernel * (1 if depthwise else channels)
    nodes, inits, cur = [], [], "x"
    for i in range(layers):
        w = rng.standard_normal((channels, channels // group, kernel, kernel)) * np.sqrt(2.0 / fan_in)
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(np.zeros(channels, np.float32), f"b{i}")]  # fmt: skip
        nodes += [
            helper.make_node("Conv", [cur, f"w{i}", f"b{i}"], [f"c{i}"], pads=[kernel // 2] * 4, group=group),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
        ]
        cur = f"r{i}"
    graph = helper.make_graph(
        nodes, "stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, size, size])],
        [helper.make_tensor_value_info(cur, TensorProto.FLOAT, ["N", channels, size, size])],
        inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timing per stack at most")
    args = parser.parse_args()
    host = detect_host()
    print(f"host: {host.describe()}")
    print(
        f"{'stack (6 x Conv+Relu, batch 1)':34s} {'fp32 ms':>9s} {'int8 ms':>9s} {'speed-up':>9s} {'QLinearConv':>12s}"
    )
    work = Path(tempfile.mkdtemp(prefix="bench-ceiling-"))
    rng = np.random.default_rng(1)
    for label, channels, size, kernel, depthwise in STACKS:
        fp32 = work / "fp32.onnx"
        onnx.save(conv_stack(channels, size, kernel, depthwise), str(fp32))
        calib = work / "calib.npz"
        np.savez(calib, x=rng.standard_normal((8, channels, size, size)).astype(np.float32))
        int8 = work / "int8.onnx"
        convert_model(fp32, int8, data_path=calib, force=True)
        fused = audit_fusion(int8).op_counts.get("QLinearConv", 0)
        feed = {"x": rng.standard_normal((1, channels, size, size)).astype(np.float32)}
        ms = time_interleaved({"fp32": fp32, "int8": int8}, feed, args.threads, args.runs, args.budget)
        print(f"{label:34s} {ms['fp32']:9.3f} {ms['int8']:9.3f} {ms['fp32'] / ms['int8']:8.2f}x {fused:>8d} / 6")


if __name__ == "__main__":
    main()
