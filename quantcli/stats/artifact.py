"""The calibration file: versioned JSON that ``calibrate`` writes and ``convert`` reads.

Schema ``quantcli.calibration/1``::

    {
      "schema": "quantcli.calibration/1",
      "quantcli_version": "0.1.0",
      "model": {"path": "model.onnx", "sha256": "..."},
      "method": {"kind": "percentile", "percentile": 99.99, "bins": 4096, "batch_size": 32},
      "num_samples": 200,
      "tensors": {"conv1_out": {"min": -1.5, "max": 3.25, "observed_min": -1.5, "observed_max": 4.0}, ...}
    }

Floats are written with ``repr`` of Python floats, so values round-trip exactly. Tensors are sorted
by name, so the same calibration gives the same bytes. Histograms (for re-choosing a method
without re-running the data) go to a sidecar ``<file>.hist.npz`` of plain arrays.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from quantcli import __version__
from quantcli.core.errors import ArtifactMismatchError
from quantcli.core.options import CalibrationMethod
from quantcli.graph.atomic import atomic_files, write_bytes
from quantcli.stats.observers import HistogramObserver
from quantcli.stats.ranges import CalibrationResult, TensorRange

__all__ = ["SCHEMA", "read_calibration", "write_calibration"]

SCHEMA = "quantcli.calibration/1"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".hist.npz")


def to_json_dict(result: CalibrationResult, *, model_path: str) -> dict[str, Any]:
    """The JSON document for ``result`` (``unobserved`` only when some subgraph tensor never ran, ``nans``
    only when some tensor took NaN values, ``input_shapes`` when calibration read data)."""
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "quantcli_version": __version__,
        "model": {"path": model_path, "sha256": result.model_sha256},
        "method": {"kind": str(result.method), **dict(sorted(result.params.items()))},
        "num_samples": result.num_samples,
        "tensors": {
            name: {
                "min": r.min,
                "max": r.max,
                "observed_min": r.observed_min,
                "observed_max": r.observed_max,
            }
            for name, r in sorted(result.ranges.items())
        },
    }
    if result.unobserved:
        doc["unobserved"] = sorted(result.unobserved)
    if result.nans:
        doc["nans"] = dict(sorted(result.nans.items()))
    if result.input_shapes:
        doc["input_shapes"] = {name: list(shape) for name, shape in sorted(result.input_shapes.items())}
    return doc


def write_calibration(result: CalibrationResult, path: Path, *, model_path: str, force: bool = False) -> None:
    """Write the calibration file and its histogram sidecar (when there are histograms) atomically, together.

    A kill leaves the old pair or no calibration file, never a file with another run's histograms;
    an old sidecar goes when the new calibration has no histograms.
    """
    path = Path(path)
    text = json.dumps(to_json_dict(result, model_path=model_path), indent=1) + "\n"
    side = [_sidecar(path)]
    companions, remove = (side, []) if result.histograms else ([], side)
    with atomic_files(path, companions, remove=remove, force=force) as tmps:
        write_bytes(tmps[0], text.encode("utf-8"))
        if result.histograms:
            _write_histograms(result, tmps[1])


def _write_histograms(result: CalibrationResult, tmp: Path) -> None:
    names = sorted(result.histograms)
    with open(tmp, "wb") as fh:
        np.savez(
            fh,
            names=np.array(names, dtype=np.str_),
            lo=np.array([result.histograms[n].lo for n in names]),
            hi=np.array([result.histograms[n].hi for n in names]),
            counts=np.stack([result.histograms[n].counts for n in names]),
        )


def read_calibration(path: Path, *, expected_sha256: str | None = None) -> CalibrationResult:
    """Read and validate a calibration file.

    Raises:
        ArtifactMismatchError: not JSON, another schema, malformed, or made for another model.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactMismatchError(f"{path}: calibration file not found; run 'quantcli calibrate' first")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactMismatchError(f"{path}: not a quantcli calibration file (not JSON: {exc})") from exc
    if not isinstance(doc, dict) or "schema" not in doc:
        raise ArtifactMismatchError(f"{path}: not a quantcli calibration file (no 'schema' key)")
    schema = str(doc["schema"])
    if schema != SCHEMA:
        raise ArtifactMismatchError(
            f"{path}: calibration schema '{schema}' is not supported (this quantcli reads '{SCHEMA}'); "
            "re-run 'quantcli calibrate'"
        )
    try:
        sha = str(doc["model"]["sha256"])
        method = CalibrationMethod(doc["method"]["kind"])
        params = {k: v for k, v in doc["method"].items() if k != "kind"}
        ranges = {
            str(name): TensorRange(float(t["min"]), float(t["max"]), float(t["observed_min"]), float(t["observed_max"]))
            for name, t in doc["tensors"].items()
        }
        num_samples = int(doc["num_samples"])
        unobserved = tuple(str(n) for n in doc.get("unobserved", []))
        nans = {str(n): int(c) for n, c in doc.get("nans", {}).items()}
        shapes = {str(n): tuple(int(d) for d in dims) for n, dims in doc.get("input_shapes", {}).items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactMismatchError(f"{path}: malformed calibration file ({type(exc).__name__}: {exc})") from exc
    if expected_sha256 is not None and sha != expected_sha256:
        raise ArtifactMismatchError(
            f"{path}: made for a model with sha256 {sha[:12]}…, but this model's sha256 is "
            f"{expected_sha256[:12]}…; re-run 'quantcli calibrate' on this model"
        )
    for name, r in ranges.items():
        if not all(np.isfinite([r.min, r.max])) or r.min > r.max:
            raise ArtifactMismatchError(f"{path}: tensor '{name}' has an invalid range [{r.min}, {r.max}]")
    histograms: dict[str, HistogramObserver] = {}
    side = _sidecar(path)
    if side.is_file():
        histograms = _read_histograms(side)
    return CalibrationResult(sha, method, params, num_samples, ranges, histograms, unobserved, nans, shapes)


def _read_histograms(path: Path) -> dict[str, HistogramObserver]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            names, lo, hi, counts = npz["names"], npz["lo"], npz["hi"], npz["counts"]
    except Exception as exc:
        raise ArtifactMismatchError(f"{path}: unreadable histogram sidecar ({exc}); delete it or re-calibrate") from exc
    out: dict[str, HistogramObserver] = {}
    for i, name in enumerate(names.tolist()):
        hist = HistogramObserver(float(lo[i]), float(hi[i]), bins=int(counts.shape[1]))
        hist.counts = counts[i].astype(np.int64)
        out[str(name)] = hist
    return out
