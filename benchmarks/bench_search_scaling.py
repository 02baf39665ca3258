"""Benchmark: how the accuracy search's wall time grows with the number of nodes (issue 15).

Each model is a chain of ``depth`` blocks (MatMul 64x64 + bias Add + Relu); the third MatMul is made
un-quantizable the way ``tests/models.sensitive_mlp`` is (a dead hidden unit whose weight row is
500x the rest sets the int8 weight scale, so the layer's other weights round to zero). The SQNR
budget is what the default plan with that layer left in float reaches on the evaluation samples,
less ``--margin`` dB: out of reach until that layer leaves static int8, so the search has to find it
among ``3 x depth`` nodes: the same answer at every depth, so the growth is the search's work. The
chains are generated (no accuracy claim rests on them): only the search's work is measured. Each run
is a child process (wall time, peak RSS, trials, what was chosen).

Printed per depth: nodes, compute nodes, trials, wall seconds, seconds per trial, float and run-time
quantized nodes of the answer, and the growth exponent between depths (log ratio of wall times over
log ratio of node counts: 1.0 is linear). The machine's load and CPU flags are printed beside it.

    python benchmarks/bench_search_scaling.py                    # depths 8 16 32 64
    python benchmarks/bench_search_scaling.py --depths 8 16 32 64 128 --json scaling.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantcli.core.host import cpu_model, int8_flags

REPO = Path(__file__).resolve().parent.parent
D = 64


def chain(depth: int, seed: int = 0) -> onnx.ModelProto:
    """``depth`` MatMul+Add+Relu blocks; the third MatMul has an outlier weight row (one answer at every depth)."""
    rng = np.random.default_rng(seed)
    inits, nodes, x = [], [], "x"
    for i in range(depth):
        w = rng.normal(size=(D, D)) * math.sqrt(2.0 / D)  # He: the signal neither fades nor grows with depth
        b = rng.normal(size=D) * 0.01
        if i == 2:  # hidden unit 3 of the previous layer is dead, and its row here is 500x
            w[3, :] *= 500.0
        if i == 1:
            w[:, 3] = -np.abs(w[:, 3])
            b[3] = -1.0
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{i}")]  # fmt: skip
        nodes += [
            helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"h{i}"], name=f"add{i}"),
            helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        x = f"r{i}"
    graph = helper.make_graph(
        nodes,
        f"chain{depth}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", D])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def inputs(n: int, seed: int) -> np.ndarray:
    """Non-negative inputs (so the dead units stay dead), smooth across features like real activations."""
    rng = np.random.default_rng(seed)
    base = np.abs(rng.normal(size=(n, 1))) * np.linspace(0.2, 1.0, D)[None, :]
    return (base + np.abs(rng.normal(size=(n, D))) * 0.3).astype(np.float32)


CHILD = """
import json, resource, sys, time
from dataclasses import replace
from pathlib import Path
import numpy as np
import onnxruntime as ort
from quantcli import api
from quantcli.core.host import default_config
from quantcli.search.accuracy_search import Budget, SearchOptions
model, calib, evald, out, margin = sys.argv[1:6]
x = np.load(evald)["x"]
ref = ort.InferenceSession(model).run(None, {"x": x})[0].astype(np.float64)
# the budget: what leaving the outlier layer alone in float reaches, less a margin (one answer at every depth)
api.convert_model(Path(model), Path(out), data_path=Path(calib), force=True,
                  config=replace(default_config(), exclude_nodes=("mm2",)))
q = ort.InferenceSession(out).run(None, {"x": x})[0]
target = 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - q) ** 2)) - float(margin)
start = time.perf_counter()
try:
    result = api.convert_model(Path(model), Path(out), data_path=Path(calib), eval_data=Path(evald), force=True,
                               search=SearchOptions(Budget(min_sqnr_db=target), latency_runs=3, max_fallback=64))
    s = result.search
    row = {"trials": len(s.trials), "float": len(s.chosen.candidate.float_nodes),
           "dynamic": len(s.chosen.candidate.dynamic_nodes), "sqnr": s.chosen.sqnr_db, "met": True}
except Exception as exc:  # the budget not met is a figure too
    row = {"met": False, "error": str(exc).splitlines()[0][:200]}
row["wall_s"] = time.perf_counter() - start
row["budget_db"] = target
row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("ROW " + json.dumps(row))
"""


def run_depth(depth: int, folder: Path, margin: float, mem_gb: float) -> dict[str, object]:
    model = folder / f"chain{depth}.onnx"
    onnx.save(chain(depth), model)
    calib, evald = folder / "calib.npz", folder / "eval.npz"
    np.savez(calib, x=inputs(256, 1))
    np.savez(evald, x=inputs(256, 2))
    cap = int(mem_gb * 2**30)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    env = dict(os.environ, PYTHONPATH=str(REPO), QUANTCLI_KERNEL_SPEED="constant")
    args = [sys.executable, "-c", CHILD, str(model), str(calib), str(evald), str(folder / "out.onnx"), str(margin)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, preexec_fn=limit, check=False)
    rows = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    row: dict[str, object] = json.loads(rows[-1]) if rows else {"met": False, "error": proc.stderr[-300:]}
    row.update(depth=depth, nodes=3 * depth, compute=depth)
    return row


def host_line() -> str:
    flags = " ".join(int8_flags()) or "no int8 flags"
    return f"host: {cpu_model()}; flags {flags}; cpus {os.cpu_count()}; load {os.getloadavg()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--margin", type=float, default=1.0, help="dB below the one-float answer's SQNR")
    parser.add_argument("--mem-gb", type=float, default=6.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(host_line())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for depth in args.depths:
            folder = Path(tmp) / str(depth)
            folder.mkdir()
            started = time.time()
            row = run_depth(depth, folder, args.margin, args.mem_gb)
            row["load"] = os.getloadavg()[0]
            rows.append(row)
            print(json.dumps(row), f"({time.time() - started:.0f} s)", flush=True)
    heads = ("nodes", 6), ("compute", 8), ("trials", 7), ("wall s", 8), ("s/trial", 8), ("float", 6), ("dyn", 4)
    print("\n" + " ".join(f"{h:>{w}}" for h, w in heads) + f" {'growth':>7}")
    prev = None
    for row in rows:
        trials = row.get("trials")
        per = f"{float(row['wall_s']) / int(trials):8.2f}" if trials else f"{'-':>8}"  # type: ignore[arg-type]
        growth = ""
        if prev is not None:
            wall = math.log(float(row["wall_s"]) / float(prev["wall_s"]))  # type: ignore[arg-type]
            growth = f"{wall / math.log(int(row['nodes']) / int(prev['nodes'])):7.2f}"  # type: ignore[call-overload]
        print(f"{row['nodes']:>6} {row['compute']:>8} {trials or '-':>7} {float(row['wall_s']):8.1f} {per}"  # type: ignore[arg-type]
              f" {row.get('float', '-'):>6} {row.get('dynamic', '-'):>4} {growth:>7}"
              + ("" if row.get("met") else f"  not met: {row.get('error', '')}"))  # fmt: skip
        prev = row
    print(host_line())
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
