"""Benchmark a model above protobuf's 2 GB limit end to end: calibrate, convert, compare.

Generates a wide MLP (``--layers`` x MatMul+Add+Relu, ``--width`` square FP32 weights; the default
3 x 16384 x 16384 is 3 GiB) saved with external data, and calibration/evaluation data for it. The
weights and the data come from a seeded RNG: what is measured is memory, time and fidelity to the
FP32 model (``compare``'s error against it), never task accuracy, so no real weights are needed.

Each ``quantcli`` command runs as a child process; its wall time and peak RSS (the child's own
``ru_maxrss`` from ``os.wait4``) are printed with the model and output sizes and the host.
Big files go under ``--workdir`` (default /tmp/large) and are removed unless ``--keep``.

    python benchmarks/bench_large_model.py                    # 3 GiB model
    python benchmarks/bench_large_model.py --width 4096 --layers 2 --keep   # quick check
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from quantcli.graph.model_io import file_sha256

REPO = Path(__file__).resolve().parent.parent


def _external(name: str, shape: list[int], location: str, offset: int) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
    tensor.data_location = TensorProto.EXTERNAL
    length = int(np.prod(shape)) * 4
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def generate(path: Path, width: int, layers: int, seed: int) -> None:
    """Write the MLP's graph to ``path`` and its weights to ``path.data``, one row block at a time."""
    rng = np.random.default_rng(seed)
    data_name = path.name + ".data"
    nodes, inits = [], []
    scale = np.float32(1.0 / np.sqrt(width))
    with open(path.with_name(data_name), "wb") as fh:
        prev = "x"
        for i in range(layers):
            offset = fh.tell()
            for start in range(0, width, 1024):  # 64 MiB blocks: memory stays small
                rows = min(1024, width - start)
                fh.write((rng.standard_normal((rows, width), dtype=np.float32) * scale).tobytes())
            inits.append(_external(f"w{i}", [width, width], data_name, offset))
            offset = fh.tell()
            fh.write((rng.standard_normal(width, dtype=np.float32) * np.float32(0.1)).tobytes())
            inits.append(_external(f"b{i}", [width], data_name, offset))
            out = "y" if i == layers - 1 else f"r{i}"
            nodes += [
                helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"matmul{i}"),
                helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"),
                helper.make_node("Relu", [f"a{i}"], [out], name=f"relu{i}"),
            ]
            prev = out
    graph = helper.make_graph(
        nodes,
        "wide_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    rng_data = np.random.default_rng(seed + 1)
    for split, count in (("calib", 32), ("eval", 32)):
        np.savez(path.with_name(f"{split}.npz"), x=rng_data.standard_normal((count, width), dtype=np.float32))


def run(cmd: list[str], cap_gib: float | None = None) -> tuple[float, float, int, str]:
    """Wall seconds, peak RSS (MiB), exit code and the last lines of output of one child process
    (its address space capped at ``cap_gib``, so that a shared machine is never run out of memory)."""

    def limit() -> None:
        if cap_gib is not None:
            import resource

            cap = int(cap_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=limit)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    return wall, usage.ru_maxrss / 1024, proc.returncode, "\n".join(out.strip().splitlines()[-6:])


def size_of(path: Path) -> int:
    """Bytes of a model and its external data file."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/large"))
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--reuse", action="store_true", help="reuse a model already generated in --workdir")
    parser.add_argument(
        "--only",
        choices=("calibrate", "convert", "compare"),
        action="append",
        help="run only these commands (repeatable; with --reuse --keep, one at a time)",
    )
    parser.add_argument("--cap-gib", type=float, help="address-space limit of each command (RLIMIT_AS), GiB")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model, calib, quant = work / "mlp.onnx", work / "mlp.calib.json", work / "mlp.int8.onnx"
    print(f"host: {platform.node()} {platform.machine()} cpus={os.cpu_count()} python {platform.python_version()}")
    print(f"onnx {onnx.__version__}, onnxruntime {__import__('onnxruntime').__version__}")
    flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    print("cpu flags (simd):", " ".join(f for f in flags.split() if f.startswith(("avx", "sse4", "amx", "fma"))))
    if not (args.reuse and model.exists()):
        t0 = time.perf_counter()
        generate(model, args.width, args.layers, args.seed)
        print(f"generated in {time.perf_counter() - t0:.1f} s")
    print(f"model: {size_of(model) / 2**30:.3f} GiB ({args.layers} x {args.width}^2 FP32, external data)")
    quantcli = [sys.executable, "-m", "quantcli"]
    steps = [
        ("calibrate", [*quantcli, "calibrate", str(model), "--data", str(work / "calib.npz"), "-o", str(calib)]),
        ("convert", [*quantcli, "convert", str(model), "--calibration", str(calib), "-o", str(quant)]),
        ("compare", [*quantcli, "compare", str(model), str(quant), "--data", str(work / "eval.npz")]),
    ]
    failed = False
    for name, cmd in steps:
        if args.only and name not in args.only:
            continue
        wall, rss, code, tail = run([*cmd, "--force"] if name != "compare" else cmd, args.cap_gib)
        ratio = rss * 2**20 / size_of(model)
        print(f"{name:<10} wall {wall:7.1f} s  peak RSS {rss:8.0f} MiB ({ratio:.2f}x the model)  exit {code}")
        if code != 0:
            print("  " + tail.replace("\n", "\n  "))
            failed = True
            break
    if not failed and quant.exists():
        print(f"quantized: {size_of(quant) / 2**30:.3f} GiB (beside it: {quant.name}.data)")
        for written in (quant, quant.with_name(quant.name + ".data")):  # same bytes before and after a change?
            if written.exists():
                print(f"sha256 {written.name}: {file_sha256(written)}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
