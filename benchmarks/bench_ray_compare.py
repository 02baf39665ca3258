"""Benchmark ``compare --ray``: wall time of compare in one process against Ray shard tasks, and the
check that both give the same result (the JSON document minus latency and memory).

Needs ``quantcli[ray]`` (``/work/venv-ray/bin/python`` with ``PYTHONPATH`` at this checkout). Each
real model (``<name>.onnx``, ``<name>_calib.npz``, ``<name>_eval.npz`` under ``--models``) is
quantized once (not timed), then compared on its held-out ``_eval.npz`` in alternation, one process
then Ray, ``--repeats`` times, in this process (so machine noise hits both). A local Ray with
``--cpus`` CPUs is started once before (its start-up time is printed apart); latency is timed at
batch 1 only (``--runs``), since it runs on the driver in both.

    PYTHONPATH=$PWD /work/venv-ray/bin/python benchmarks/bench_ray_compare.py magika_standard_v3_3 ppocrv4_det
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from quantcli.api import CompareRequest, compare_models, convert_model
from quantcli.schemas import compare_document

MODELS = Path("/work/main/benchmarks/models")


def _accuracy(doc: dict) -> str:
    return json.dumps({k: v for k, v in doc.items() if k not in ("latency", "memory")}, sort_keys=True)


def bench(name: str, args: argparse.Namespace, work: Path) -> None:
    """Quantize ``name``, then time compare in one process and on Ray in alternation."""
    model = args.models / f"{name}.onnx"
    quantized = work / f"{name}.int8.onnx"
    convert_model(model, quantized, data_path=args.models / f"{name}_calib.npz")
    base = CompareRequest(
        model, quantized, args.models / f"{name}_eval.npz", batch_size=args.batch_size,
        latency_batch_sizes=(1,), runs=args.runs, warmup=2, measure_memory=False, per_layer=args.per_layer,
    )  # fmt: skip
    times: dict[str, list[float]] = {"one process": [], f"Ray, {args.shards} shards": []}
    docs: dict[str, str] = {}
    for _ in range(args.repeats):
        for label, request in zip(times, (base, replace(base, ray="local", shards=args.shards)), strict=True):
            start = time.perf_counter()
            result = compare_models(request)
            times[label].append(time.perf_counter() - start)
            docs[label] = _accuracy(compare_document(result))
    same = len(set(docs.values())) == 1
    print(f"{name}: {result.num_samples} samples, batch {args.batch_size}, per-layer {args.per_layer}")
    for label, ts in times.items():
        print(f"  {label}: median {statistics.median(ts):.1f} s  (runs: {', '.join(f'{t:.1f}' for t in ts)})")
    print(f"  results identical (JSON minus latency and memory): {same}")


def main() -> None:
    """Parse the arguments, start Ray once, run the benchmarks."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+")
    parser.add_argument("--models", type=Path, default=MODELS)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--per-layer", action="store_true")
    args = parser.parse_args()
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=args.cpus, log_to_driver=False)
    print(f"Ray start-up ({args.cpus} CPUs): {time.perf_counter() - start:.1f} s; load {os.getloadavg()[0]:.1f}")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ray-compare-") as tmp:
            for name in args.names:
                bench(name, args, Path(tmp))
    finally:
        ray.shutdown()
    print(f"load average after: {os.getloadavg()[0]:.1f} (2 vCPUs, shared)")


if __name__ == "__main__":
    main()
