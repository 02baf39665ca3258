"""Benchmark ``compare --per-layer`` memory: peak RSS and wall time of the per-layer pass at memory budgets.

Each real model (``<name>.onnx``, ``<name>_calib.npz``, ``<name>_eval.npz`` under ``--models``) is
quantized once into ``--work`` (not timed, kept for the next run). Then, for each batch size and budget,
a fresh child process (under an address-space cap, ``--cap``) loads both models and the evaluation
data and runs the per-layer comparison's two passes (``quantcli.compare.layers``); it prints its own
peak RSS (``ru_maxrss``), the RSS it had before them (interpreter, libraries, models, data), their wall
time (and pass 1's, with the batch it ran at and its passes over the data) and a digest of the
per-layer numbers. Budgets alternate within each repeat (A, B, A, B) so load noise hits all of them;
the fastest run of each is printed with the digests, which agree across budgets when onnxruntime
computes the same values at every batch (the budget decides the batch and the passes, not the sums).
``default`` passes ``max_memory=None``: this checkout's default (run the script with ``PYTHONPATH`` at
another checkout to measure that one).
The host's CPU model, integer flags and load average are printed first.

    PYTHONPATH=$PWD python benchmarks/bench_perlayer_memory.py ppocrv4_rec --batch-size 8 32 \
        --budgets default 64M 4G
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

MODELS = Path(__file__).resolve().parent / "models"


def parse_size(text: str) -> int | None:
    """``default`` -> None; ``512M``, ``2G`` -> bytes."""
    if text == "default":
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def worker(model: str, quantized: str, data: str, batch: int, budget: str) -> None:
    """In the child: the per-layer pass, then one JSON line with its figures."""
    import onnx

    from quantcli.compare.layers import layer_errors, layer_models, layer_statistics
    from quantcli.data.datasets import model_input_specs, open_dataset

    ref, cand = onnx.load(model), onnx.load(quantized)
    dataset = open_dataset(Path(data), model_input_specs(ref))
    before = _rss_now()
    start = time.perf_counter()
    models = layer_models(ref, cand)
    stats = layer_statistics(models, dataset, batch_size=batch, max_memory=parse_size(budget))
    pass1 = time.perf_counter() - start
    errors = layer_errors(models, stats, dataset, max_memory=parse_size(budget))
    wall = time.perf_counter() - start
    numbers = [(e.tensor, e.sqnr_db, e.local_sqnr_db, e.p999_abs, e.observed_min, e.observed_max) for e in errors]
    digest = hashlib.sha256(repr(numbers).encode()).hexdigest()[:12]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    run_batch = getattr(stats, "run_batch", 0) or batch  # a checkout before issue 14 runs at the batch asked for
    got = {"peak": peak, "before": before, "wall": wall, "pass1": pass1, "digest": digest, "layers": len(errors)}
    print(json.dumps({**got, "run_batch": run_batch, "passes": stats.passes}))


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(args: argparse.Namespace, name: str, quantized: Path, batch: int, budget: str) -> dict:
    """One child: its figures, or ``{"error": ...}``."""
    cap = parse_size(args.cap) or 0
    cmd = [sys.executable, __file__, "--worker", str(args.models / f"{name}.onnx"), str(quantized),
           str(args.models / f"{name}_eval.npz"), str(batch), budget]  # fmt: skip

    def limit() -> None:  # in the child, before it runs anything
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, preexec_fn=limit)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:120]}"}
    return json.loads(lines[-1])


def bench(args: argparse.Namespace, name: str) -> None:
    """Quantize ``name`` once, then the children at every batch size and budget, alternating."""
    from quantcli.api import convert_model

    quantized = args.work / f"{name}.int8.onnx"
    if not quantized.exists():
        convert_model(args.models / f"{name}.onnx", quantized, data_path=args.models / f"{name}_calib.npz")
    for batch in args.batch_size:
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for budget in args.budgets:
                got = run(args, name, quantized, batch, budget)
                if "error" in got or budget not in best or got["wall"] < best[budget].get("wall", 1e9):
                    best[budget] = got
        print(f"{name}, batch {batch}:")
        for budget, got in best.items():
            if "error" in got:
                print(f"  {budget:>8}: {got['error']}")
                continue
            print(
                f"  {budget:>8}: peak {got['peak'] / 2**30:.2f} GB (+{(got['peak'] - got['before']) / 2**30:.2f} GB "
                f"for the pass), {got['wall']:.1f} s (pass 1 {got['pass1']:.1f} s at batch {got['run_batch']}, "
                f"{got['passes']} passes), {got['layers']} layers, digest {got['digest']}"
            )
        digests = {g["digest"] for g in best.values() if "digest" in g}
        print(f"  same per-layer numbers at every budget: {len(digests) == 1}; load {os.getloadavg()[0]:.1f}")


def main() -> None:
    """Parse the arguments, print the host, run the benchmarks."""
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+")
    parser.add_argument("--models", type=Path, default=MODELS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-perlayer"))
    parser.add_argument("--batch-size", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--budgets", nargs="+", default=["default", "64M", "4G"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cap", default="12G")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    from quantcli.core.host import cpu_model, int8_flags

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"host: {cpu_model()}, int8 flags {' '.join(int8_flags()) or '-'}; load average {load}")
    for name in args.names:
        bench(args, name)


if __name__ == "__main__":
    main()
