"""Calibration and evaluation data: open ``.npz``/``.npy`` files or a directory of them, check them
against the model's inputs before the first batch, and stream batches.

Conventions: keys of an ``.npz`` are the model's input names (plus ``labels`` for evaluation data);
samples are stacked on axis 0. A ``.npy`` feeds a single-input model. A file whose arrays have one
dimension less than the model input holds a single sample. Pickles are never loaded.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from quantcli.errors import CalibrationDataError

__all__ = [
    "LABEL_KEYS",
    "Dataset",
    "InputSpec",
    "model_input_specs",
    "open_dataset",
]

#: keys that carry labels rather than model inputs
LABEL_KEYS = ("labels", "label")

_SAFE_CASTS = {
    (np.dtype(np.float64), np.dtype(np.float32)),
    (np.dtype(np.float16), np.dtype(np.float32)),
    (np.dtype(np.int32), np.dtype(np.int64)),
    (np.dtype(np.uint8), np.dtype(np.float32)),
}


@dataclass(frozen=True, slots=True)
class InputSpec:
    """Name, numpy dtype and shape (ints, or a name/None for dynamic axes) of one model input."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    def describe(self) -> str:
        """E.g. ``float32[batch,1,16,16]``."""
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.dtype}[{dims}]"

    @property
    def fixed_batch(self) -> int | None:
        """The batch size when axis 0 is fixed, else None."""
        if self.shape and isinstance(self.shape[0], int) and self.shape[0] > 0:
            return self.shape[0]
        return None


def model_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that must be fed (initializers with defaults are skipped)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype("float32")
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dtype, shape))
    return specs


def _describe_array(arr: np.ndarray) -> str:
    return f"{arr.dtype}[{','.join(str(d) for d in arr.shape)}]"


def _read_file(path: Path) -> dict[str, np.ndarray]:
    try:
        if path.suffix == ".npy":
            return {"": np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise CalibrationDataError(
                f"{path}: holds a pickled/object array; quantcli never unpickles data. "
                "Save plain numeric arrays with np.savez"
            ) from exc
        raise CalibrationDataError(f"{path}: not a readable numpy file ({exc})") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CalibrationDataError(f"{path}: not a readable .npz/.npy file ({exc})") from exc


def _data_files(path: Path) -> list[Path]:
    if not path.exists():
        raise CalibrationDataError(f"{path}: data not found; give a .npz, a .npy or a directory of them")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy") and p.is_file())
        if not files:
            raise CalibrationDataError(f"{path}: directory holds no .npz or .npy files")
        return files
    if path.suffix not in (".npz", ".npy"):
        raise CalibrationDataError(f"{path}: unsupported data format '{path.suffix}'; use .npz or .npy")
    return [path]


@dataclass(slots=True)
class Dataset:
    """Validated arrays for every model input, plus labels when present; re-iterable."""

    path: Path
    specs: tuple[InputSpec, ...]
    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None

    @property
    def num_samples(self) -> int:
        """Number of samples (length of axis 0)."""
        return int(next(iter(self.arrays.values())).shape[0])

    def effective_batch_size(self, requested: int) -> int:
        """``requested``, unless the model fixes its batch axis."""
        fixed = {s.fixed_batch for s in self.specs} - {None}
        return fixed.pop() if len(fixed) == 1 else max(1, requested)

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of ``batch_size`` samples (the last one may be smaller unless the batch is fixed)."""
        size = self.effective_batch_size(batch_size)
        fixed = any(s.fixed_batch for s in self.specs)
        n = self.num_samples
        stop = n - (n % size) if fixed else n
        for start in range(0, stop, size):
            yield {name: arr[start : start + size] for name, arr in self.arrays.items()}

    def subset(self, count: int) -> Dataset:
        """The first ``count`` samples."""
        return Dataset(
            self.path,
            self.specs,
            {k: v[:count] for k, v in self.arrays.items()},
            None if self.labels is None else self.labels[:count],
        )


def open_dataset(path: Path, specs: Sequence[InputSpec], *, max_samples: int | None = None) -> Dataset:
    """Open and check data for a model with inputs ``specs``.

    Raises:
        CalibrationDataError: naming the file, the input and what was expected.
    """
    path = Path(path)
    files = _data_files(path)
    names = [s.name for s in specs]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    label_parts: list[np.ndarray] = []
    for file in files:
        content = _read_file(file)
        if "" in content:
            if len(specs) != 1:
                raise CalibrationDataError(
                    f"{file}: a .npy feeds a single-input model, but this model has inputs {names}; use .npz"
                )
            content = {names[0]: content.pop("")}
        labels = next((content.pop(k) for k in LABEL_KEYS if k in content), None)
        unknown = sorted(set(content) - set(names))
        missing = [n for n in names if n not in content]
        if missing or unknown:
            detail = f"missing {missing}" if missing else ""
            if unknown:
                detail += ("; " if detail else "") + f"unexpected keys {unknown}"
            raise CalibrationDataError(f"{file}: keys do not match the model inputs {names}: {detail}")
        counts = set()
        for spec in specs:
            arr = _check_array(file, spec, content[spec.name])
            parts[spec.name].append(arr)
            counts.add(arr.shape[0])
        if len(counts) != 1:
            raise CalibrationDataError(f"{file}: inputs hold different numbers of samples: {sorted(counts)}")
        if labels is not None:
            labels = np.atleast_1d(labels)
            if labels.shape[0] != counts.copy().pop():
                raise CalibrationDataError(f"{file}: {labels.shape[0]} labels for {counts.pop()} samples")
            label_parts.append(labels)
    arrays = {n: (p[0] if len(p) == 1 else np.concatenate(p)) for n, p in parts.items()}
    labels_all = None
    if label_parts:
        if len(label_parts) != len(files):
            raise CalibrationDataError(f"{path}: some files carry labels and others do not")
        labels_all = label_parts[0] if len(label_parts) == 1 else np.concatenate(label_parts)
    dataset = Dataset(path, tuple(specs), arrays, labels_all)
    if dataset.num_samples == 0:
        raise CalibrationDataError(f"{path}: holds no samples")
    if max_samples is not None and max_samples < dataset.num_samples:
        dataset = dataset.subset(max_samples)
    return dataset


def _check_array(file: Path, spec: InputSpec, arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind in "OUSV":
        raise CalibrationDataError(f"{file}: input '{spec.name}' is a {arr.dtype} array; expected {spec.describe()}")
    if spec.shape and arr.ndim == len(spec.shape) - 1:
        arr = arr[np.newaxis]
    if spec.shape and arr.ndim != len(spec.shape):
        raise CalibrationDataError(
            f"{file}: input '{spec.name}' is {_describe_array(arr)} but the model expects {spec.describe()}"
        )
    for axis, (want, have) in enumerate(zip(spec.shape, arr.shape, strict=True)):
        if axis > 0 and isinstance(want, int) and want > 0 and want != have:
            raise CalibrationDataError(
                f"{file}: input '{spec.name}' is {_describe_array(arr)} but the model expects "
                f"{spec.describe()} (axis {axis} should be {want})"
            )
    if arr.dtype != spec.dtype:
        if (arr.dtype, spec.dtype) not in _SAFE_CASTS:
            raise CalibrationDataError(
                f"{file}: input '{spec.name}' is {_describe_array(arr)} but the model expects {spec.describe()}"
            )
        arr = arr.astype(spec.dtype)
    if arr.shape[0] == 0:
        raise CalibrationDataError(f"{file}: input '{spec.name}' holds no samples")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise CalibrationDataError(
            f"{file}: input '{spec.name}' contains {bad} NaN/Inf values; clean the data before calibrating"
        )
    return np.ascontiguousarray(arr)
