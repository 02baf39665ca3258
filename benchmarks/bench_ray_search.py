"""Wall time of convert's accuracy search in one process against its candidates scored on a local Ray.

Runs the same search (``--min-agreement`` budget by default, on magika) alternately in one process and
with ``SearchOptions.ray = "local"`` on a Ray started with ``--workers`` CPUs (A B C, then C B A), checks
that every run makes the same trials (actions and scores), and prints each wall time, the ratios
to one process, the host's CPU flags and its load. Only the independent candidates (stage 1's methods,
stage 3's probes) run as Ray tasks; the rest of the search stays on the driver.

    python benchmarks/bench_ray_search.py                       # magika, 1 and 2 workers, 2 rounds
    python benchmarks/bench_ray_search.py --workers 2 --rounds 3
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

from quantcli import api
from quantcli.core.host import cpu_model, int8_flags
from quantcli.search.accuracy_search import Budget, SearchOptions

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "benchmarks" / "models"


def search_once(args: argparse.Namespace, workers: int, out: Path) -> tuple[float, str, int]:
    """Wall seconds, a digest of the trials (actions and scores) and the step chosen of one search
    (``workers`` 0: one process). The model's bytes are not compared: convert chooses among the cheapest
    few trials in the budget by timing them, which differs from run to run."""
    options = SearchOptions(Budget(min_agreement=args.min_agreement), ray="local" if workers else None)
    if workers:
        import ray

        ray.init(num_cpus=workers, log_to_driver=False)  # the search uses this Ray as it is
    try:
        start = time.perf_counter()
        result = api.convert_model(
            args.model, out, data_path=args.data, eval_data=args.eval_data, search=options, force=True
        )
        wall = time.perf_counter() - start
    finally:
        if workers:
            ray.shutdown()
    search = result.search
    if search is None:
        return wall, "no search", 0
    trials = repr([(t.action, t.sqnr_db, t.accuracy_drop, t.kinds, t.meets_budget) for t in search.trials])
    return wall, hashlib.sha256(trials.encode()).hexdigest()[:12], search.chosen.step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODELS / "magika_standard_v3_3.onnx")
    parser.add_argument("--data", type=Path, default=MODELS / "magika_standard_v3_3_calib.npz")
    parser.add_argument("--eval-data", type=Path, default=MODELS / "magika_standard_v3_3_eval.npz")
    parser.add_argument("--min-agreement", type=float, default=0.98)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    flags = " ".join(int8_flags()) or "no int8 flags"
    print(f"host: {cpu_model()}, {os.cpu_count()} CPUs, {flags}; load {os.getloadavg()[0]:.2f}")
    print(f"{args.model.name}: --min-agreement {args.min_agreement}, eval {args.eval_data.name}")
    times: dict[int, list[float]] = {}
    seen: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = (0, *args.workers)
            for workers in order if r % 2 == 0 else order[::-1]:  # A B C, C B A: a drifting load cancels out
                wall, digest, chosen = search_once(args, workers, Path(tmp) / "q.onnx")
                times.setdefault(workers, []).append(wall)
                seen.add(digest)
                name = f"ray {workers} CPU" if workers else "one process"
                print(f"round {r + 1} {name}: {wall:.1f} s, trials {digest}, chose step {chosen}", flush=True)
    base = sum(times[0]) / len(times[0])
    for workers, walls in times.items():
        mean = sum(walls) / len(walls)
        name = f"ray {workers} CPU" if workers else "one process"
        print(f"{name}: mean {mean:.1f} s, {base / mean:.2f}x one process")
    print("the same trials in every run" if len(seen) == 1 else f"TRIALS DIFFER: {sorted(seen)}")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
