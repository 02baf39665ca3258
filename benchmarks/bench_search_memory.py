"""Peak memory and wall time of convert's accuracy search under an address-space cap.

Runs ``quantcli convert MODEL --data --eval-data --min-sqnr ... --search-max-fallback ...`` as a child
process with ``RLIMIT_AS`` set (as ``prlimit --as`` does), once per ``--max-memory`` given ("default":
the option left out), and prints each run's exit code, wall time, peak RSS (the child's ``ru_maxrss``
from ``os.wait4``) and its batch line, with the host's CPU flags and load. On PP-OCRv4 det (one
3x640x640 sample exposes ~531 MiB of activations) the search before its memory budget ran out of
memory under a 10 GB cap; see the branch's commit messages for the figures.

    python benchmarks/bench_search_memory.py                                   # PP-OCRv4 det, default budget
    python benchmarks/bench_search_memory.py --max-memory default --max-memory 2G --max-fallback 0
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from quantcli.core.host import cpu_model, int8_flags

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "benchmarks" / "models"


def run(args: argparse.Namespace, max_memory: str, out: Path) -> tuple[int, float, float, str]:
    """Exit code, wall seconds, peak RSS in GiB and the search's batch line of one convert."""
    cmd = [sys.executable, "-m", "quantcli", "convert", str(args.model), "-o", str(out), "--force",
           "--data", str(args.data), "--eval-data", str(args.eval_data), "--min-sqnr", str(args.min_sqnr),
           "--search-max-fallback", str(args.max_fallback)]  # fmt: skip
    if max_memory != "default":
        cmd += ["--max-memory", max_memory]
    cap = args.as_limit

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=limit, cwd=REPO)
    output = proc.stdout.read().decode(errors="replace") if proc.stdout is not None else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    line = next((x.strip() for x in output.splitlines() if "a sample: candidates scored" in x), "")
    if os.waitstatus_to_exitcode(status) not in (0, 1):
        line = (line + " | " if line else "") + " ".join(output.strip().splitlines()[-1:])
    return os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss / 2**20, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODELS / "ppocrv4_det.onnx")
    parser.add_argument("--data", type=Path, default=MODELS / "ppocrv4_det_calib.npz")
    parser.add_argument("--eval-data", type=Path, default=MODELS / "ppocrv4_det_eval.npz")
    parser.add_argument("--min-sqnr", type=float, default=30.0)
    parser.add_argument("--max-fallback", type=int, default=2)
    parser.add_argument("--as-limit", type=int, default=10_000_000_000, help="address-space cap in bytes")
    parser.add_argument("--max-memory", action="append", help="convert's --max-memory ('default': left out)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_search_memory.onnx"))
    args = parser.parse_args()
    flags = " ".join(int8_flags()) or "no int8 flags"
    print(f"host: {cpu_model()}, {os.cpu_count()} CPUs, {flags}; load {os.getloadavg()[0]:.2f}")
    print(f"model {args.model.name}, eval {args.eval_data.name}, --min-sqnr {args.min_sqnr}, "
          f"--search-max-fallback {args.max_fallback}, RLIMIT_AS {args.as_limit / 1e9:.1f} GB")  # fmt: skip
    for budget in args.max_memory or ["default"]:
        code, wall, peak, line = run(args, budget, args.out)
        print(f"--max-memory {budget}: exit {code}, {wall:.0f} s, peak RSS {peak:.2f} GiB; {line}")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
