"""One calibration run in its own process, so its peak RSS is its own: prints one JSON line.

quantcli runs as ``quantcli calibrate`` does (glibc's allocator tuned at start-up, ``tune_malloc``).

python benchmarks/_calib_worker.py quantcli|ort METHOD MODEL DATA.npz NUM_SAMPLES BATCH [MAX_MEMORY_BYTES]
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def tiled(data: Path, num: int) -> dict[str, np.ndarray]:
    """The first ``num`` samples of ``data``, repeating it when it holds fewer."""
    with np.load(data) as npz:
        arrays = {k: npz[k] for k in npz.files if k not in ("labels", "label")}
    n = next(iter(arrays.values())).shape[0]
    idx = np.arange(num) % n
    return {k: v[idx] for k, v in arrays.items()}


def main() -> None:
    tool, method, model, data, num, batch = sys.argv[1:7]
    num_samples, batch_size = int(num), int(batch)
    max_memory = int(sys.argv[7]) if len(sys.argv) > 7 and int(sys.argv[7]) > 0 else None
    work = Path(tempfile.mkdtemp(prefix="calib-bench-", suffix=f"-{os.getpid()}"))
    arrays = tiled(Path(data), num_samples)
    npz = work / "data.npz"
    np.savez(npz, **arrays)
    del arrays
    # Both tools' modules are imported before the baseline, so both pay them in the RSS and neither in
    # the time: quantcli's own would otherwise be compiled from source in every child wherever
    # PYTHONDONTWRITEBYTECODE is set (0.3-0.6 s, the whole difference on the small models).
    import onnxruntime
    import onnxruntime.quantization.calibrate  # noqa: F401

    import quantcli.api
    import quantcli.data.datasets  # noqa: F401

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.perf_counter(), time.process_time()
    if tool == "quantcli":
        from quantcli.api import calibrate_model
        from quantcli.core.options import CalibrationMethod
        from quantcli.core.process import tune_malloc

        tune_malloc()  # as `quantcli calibrate` does at start-up
        result = calibrate_model(
            Path(model),
            npz,
            method=CalibrationMethod(method),
            batch_size=batch_size,
            max_memory=max_memory,
            upgrade_opset=True,
        )
        count = len(result.ranges)
    else:
        from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

        from quantcli.data.datasets import model_input_specs, open_dataset

        ds = open_dataset(npz, model_input_specs(onnx.load(model, load_external_data=False)))

        class Reader:
            def __init__(self) -> None:
                self.it = iter(ds.batches(batch_size))

            def get_next(self):
                return next(self.it, None)

            def rewind(self) -> None:
                self.it = iter(ds.batches(batch_size))

        kind = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile}[method]  # fmt: skip
        extra = {"percentile": 99.99} if method == "percentile" else {}
        calibrator = create_calibrator(
            model, augmented_model_path=str(work / "augmented.onnx"), calibrate_method=kind, extra_options=extra
        )
        calibrator.collect_data(Reader())
        count = len(calibrator.compute_data().data)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"tool": tool, "method": method, "samples": num_samples, "wall_s": wall, "cpu_s": cpu,
                      "peak_rss_mb": peak / 1024, "baseline_rss_mb": baseline / 1024, "tensors": count}))  # fmt: skip


if __name__ == "__main__":
    try:
        main()
    finally:  # the data copy and onnxruntime's augmented model: hundreds of folders piled up in /tmp
        for folder in Path(tempfile.gettempdir()).glob(f"calib-bench-*-{os.getpid()}"):
            shutil.rmtree(folder, ignore_errors=True)
