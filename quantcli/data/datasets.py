"""Calibration and evaluation data: open ``.npz``/``.npy`` files or a directory of them, check them
against the model's inputs before the first batch, and stream batches.

Conventions: keys of an ``.npz`` are the model's input names (plus ``labels`` for evaluation data);
samples are stacked on axis 0. A ``.npy`` feeds a single-input model. A file whose arrays have one
dimension less than the model input holds a single sample. Pickles are never loaded.

Inputs that are not batched on axis 0 are declared by ``batch_axes`` (the CLI's repeatable
``--batch-axis NAME=AXIS``): an integer names the axis samples are stacked on (a recurrent state
``[2, batch, 128]`` is ``state=1``), ``None`` (``NAME=none``) an *unbatched* input, whose array is one
feed of the input and is fed unchanged with every batch. A scalar model input (rank 0) is unbatched
without being declared. A batch never mixes files when an input is unbatched (each file may hold its
own value, e.g. one file per sample rate).

Rows are read from disk batch by batch (``quantcli.data.arrays``), so memory holds one batch whatever
the number of samples (plus the small members a pass reads once, ``arrays.RowReader``). Names, ranks,
fixed dimensions and dtypes are checked when the data is opened; NaN/Inf are checked in each batch as
it is read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from quantcli.core.errors import CalibrationDataError, QuantCliError
from quantcli.data.arrays import ArraySource, RowReader, open_npy, open_npz
from quantcli.data.images import ImageFolder, ImagePreprocess, image_files

__all__ = [
    "LABEL_KEYS",
    "DataFormat",
    "Dataset",
    "FeedList",
    "InputSpec",
    "model_input_specs",
    "open_dataset",
    "parse_batch_axes",
    "random_dataset",
    "sample_shapes",
    "spread",
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
    #: False when the model declares no shape at all (then ``shape`` is empty but the rank is unknown)
    has_shape: bool = True

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
        specs.append(InputSpec(vi.name, dtype, shape, tt.HasField("shape")))
    return specs


def parse_batch_axes(values: Sequence[str] | None) -> dict[str, int | None]:
    """``["state=1", "sr=none"]`` -> ``{"state": 1, "sr": None}`` (the ``--batch-axis`` option).

    Raises:
        QuantCliError: a value is not ``NAME=AXIS`` with AXIS an integer or ``none``.
    """
    axes: dict[str, int | None] = {}
    for text in values or []:
        name, sep, axis = text.rpartition("=")
        axis = axis.strip().lower()
        if not sep or not name.strip() or not (axis == "none" or axis.lstrip("-").isdigit()):
            raise QuantCliError(
                f"--batch-axis {text!r}: expected NAME=AXIS, AXIS the axis samples are stacked on "
                "(e.g. state=1) or 'none' for an input fed unchanged with every batch (e.g. sr=none)"
            )
        axes[name.strip()] = None if axis == "none" else int(axis)
    return axes


def _resolve_axes(specs: Sequence[InputSpec], batch_axes: Mapping[str, int | None] | None) -> dict[str, int | None]:
    """The batch axis of every input: declared, else None for a scalar input, else 0."""
    batch_axes = dict(batch_axes or {})
    names = [s.name for s in specs]
    unknown = sorted(set(batch_axes) - set(names))
    if unknown:
        raise CalibrationDataError(
            f"--batch-axis names {unknown}, which the model does not take; its inputs are {names}"
        )
    axes: dict[str, int | None] = {}
    for spec in specs:
        rank = len(spec.shape)
        default = None if spec.has_shape and rank == 0 else 0
        axis = batch_axes.get(spec.name, default)
        if axis is not None and spec.has_shape:
            if not -rank <= axis < rank:
                raise CalibrationDataError(
                    f"--batch-axis {spec.name}={axis}: input '{spec.name}' is {spec.describe()}, "
                    f"with {rank} axes" + ("; a scalar input is unbatched (fed unchanged)" if rank == 0 else "")
                )
            axis %= rank
        axes[spec.name] = axis
    return axes


def _data_files(path: Path) -> list[Path]:
    if not path.exists():
        raise CalibrationDataError(f"{path}: data not found; give a .npz, a .npy or a directory of them")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy") and p.is_file())
        if not files:
            raise CalibrationDataError(f"{path}: directory holds no .npz, .npy or image files")
        return files
    if path.suffix not in (".npz", ".npy"):
        raise CalibrationDataError(f"{path}: unsupported data format '{path.suffix}'; use .npz or .npy")
    return [path]


def _describe(shape: tuple[int, ...], dtype: np.dtype) -> str:
    return f"{dtype}[{','.join(str(d) for d in shape)}]"


@dataclass(frozen=True, slots=True)
class _Chunk:
    """One file's arrays: ``count`` samples, read on demand."""

    file: Path
    sources: dict[str, ArraySource]
    count: int
    single: bool  # arrays lack the batch axis (one sample per file)
    #: the row of the file's arrays this chunk's first sample is (``Dataset.select``)
    first: int = 0

    def read(self, name: str, start: int, stop: int, reader: RowReader | None = None) -> np.ndarray:
        if self.single:
            return _whole(self.sources[name], reader)[np.newaxis]
        source = self.sources[name]
        start, stop = start + self.first, stop + self.first
        return source.read(start, stop) if reader is None else reader.read(source, start, stop)


def _whole(source: ArraySource, reader: RowReader | None = None) -> np.ndarray:
    stop = source.shape[0] if source.shape else 1
    return source.read(0, stop) if reader is None else reader.read(source, 0, stop)


class _AxisRows:
    """An array batched on axis ``axis`` > 0, seen with that axis first; loaded whole on first read."""

    def __init__(self, source: ArraySource, axis: int) -> None:
        self.path = source.path
        self.dtype = np.dtype(source.dtype)
        shape = list(source.shape)
        self.shape = (shape.pop(axis), *shape)
        self.axis = axis
        self._source = source
        self._array: np.ndarray | None = None

    def read(self, start: int, stop: int) -> np.ndarray:
        if self._array is None:
            self._array = np.moveaxis(_whole(self._source), self.axis, 0)
        return np.array(self._array[start:stop])


@dataclass(slots=True)
class Dataset:
    """Validated data for every model input, plus labels when present; re-iterable, read lazily."""

    path: Path
    specs: tuple[InputSpec, ...]
    chunks: tuple[_Chunk, ...]
    labels: np.ndarray | None
    limit: int | None = None
    _offsets: list[int] = field(default_factory=list)
    #: input name -> axis its samples are stacked on, None for an unbatched input (absent: 0)
    axes: dict[str, int | None] = field(default_factory=dict)
    #: (start, stop): only the batches starting at these sample positions are yielded (``window``)
    kept: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self._offsets = [0]
        for chunk in self.chunks:
            self._offsets.append(self._offsets[-1] + chunk.count)

    @classmethod
    def from_arrays(
        cls, specs: Sequence[InputSpec], arrays: dict[str, np.ndarray], labels: np.ndarray | None = None
    ) -> Dataset:
        """In-memory data (for the Python API and tests); arrays are stacked on axis 0."""
        from quantcli.data.arrays import _InMemory

        path = Path("<memory>")
        count = next(iter(arrays.values())).shape[0]
        chunk = _Chunk(path, {k: _InMemory(path, np.asarray(v)) for k, v in arrays.items()}, count, False)
        return cls(path, tuple(specs), (chunk,), labels)

    @property
    def num_samples(self) -> int:
        """Number of samples."""
        if self.kept is not None:
            return self.kept[1] - self.kept[0]
        return self._all_samples()

    def _all_samples(self) -> int:
        total = self._offsets[-1]
        return min(total, self.limit) if self.limit is not None else total

    def axis(self, name: str) -> int | None:
        """The axis input ``name`` is batched on (None: unbatched, fed unchanged)."""
        return self.axes.get(name, 0)

    def _fixed_batches(self) -> set[int]:
        fixed: set[int] = set()
        for spec in self.specs:
            axis = self.axis(spec.name)
            if axis is not None and axis < len(spec.shape):
                dim = spec.shape[axis]
                if isinstance(dim, int) and dim > 0:
                    fixed.add(dim)
        return fixed

    def effective_batch_size(self, requested: int) -> int:
        """``requested``, unless the model fixes its batch axis."""
        fixed = self._fixed_batches()
        return fixed.pop() if len(fixed) == 1 else max(1, requested)

    def _read(self, name: str, start: int, stop: int, reader: RowReader) -> np.ndarray:
        parts = []
        for i, chunk in enumerate(self.chunks):
            lo, hi = self._offsets[i], self._offsets[i + 1]
            if hi <= start or lo >= stop:
                continue
            parts.append(chunk.read(name, max(start, lo) - lo, min(stop, hi) - lo, reader))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _gather(self, name: str, indices: np.ndarray, reader: RowReader) -> np.ndarray:
        return np.concatenate([self._read(name, int(i), int(i) + 1, reader) for i in indices])

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of ``batch_size`` samples (the last may be smaller unless the model fixes its batch).

        Raises:
            CalibrationDataError: a batch holds NaN/Inf values (naming the file's sample range).
        """
        size = self.effective_batch_size(batch_size)
        fixed = bool(self._fixed_batches())
        n = self._all_samples()
        stop = n - (n % size) if fixed else n
        order = np.random.default_rng(seed).permutation(n) if shuffle else None
        with RowReader() as reader:  # each file opened once for the pass; small members read once
            yield from self._feeds(self._spans(size, stop, order is not None), order, reader)

    def _feeds(
        self, spans: Iterator[tuple[int, int]], order: np.ndarray | None, reader: RowReader
    ) -> Iterator[dict[str, np.ndarray]]:
        """The feed of each span ``(start, end)`` (positions in ``order`` when given) in the window."""
        for start, end in spans:
            if self.kept is not None and not self.kept[0] <= start < self.kept[1]:
                continue
            feed = {}
            for spec in self.specs:
                axis = self.axis(spec.name)
                if axis is None:
                    arr = _whole(self.chunks[self._chunk_of(start)].sources[spec.name], reader)
                else:
                    arr = (
                        self._read(spec.name, start, end, reader)
                        if order is None
                        else self._gather(spec.name, order[start:end], reader)
                    )
                    if axis:
                        arr = np.moveaxis(arr, 0, axis)
                if arr.dtype != spec.dtype:
                    arr = arr.astype(spec.dtype)
                if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                    bad = int(np.count_nonzero(~np.isfinite(arr)))
                    raise CalibrationDataError(
                        f"{self._file_of(start)}: input '{spec.name}' contains {bad} NaN/Inf values "
                        f"(samples {start}..{end - 1}); clean the data before calibrating"
                    )
                feed[spec.name] = np.ascontiguousarray(arr) if arr.ndim else arr  # keeps a scalar 0-d
            yield feed

    def _spans(self, size: int, stop: int, shuffled: bool) -> Iterator[tuple[int, int]]:
        """Batch boundaries; batches never straddle files whose samples differ in shape, nor files at all
        when an input is unbatched."""
        batched = [s for s in self.specs if self.axis(s.name) is not None][:1]
        shapes = {tuple(c.sources[s.name].shape[0 if c.single else 1 :]) for c in self.chunks for s in batched}
        per_file = len(shapes) > 1 or (len(batched) < len(self.specs) and len(self.chunks) > 1)
        if not per_file or shuffled:
            if per_file:
                raise CalibrationDataError(
                    f"{self.path}: files hold samples of different shapes or their own unbatched inputs; "
                    "--shuffle needs one file, or samples of one shape and no unbatched input"
                )
            yield from ((start, min(start + size, stop)) for start in range(0, stop, size))
            return
        for i in range(len(self.chunks)):
            lo, hi = self._offsets[i], min(self._offsets[i + 1], stop)
            yield from ((start, min(start + size, hi)) for start in range(lo, hi, size))

    def _chunk_of(self, index: int) -> int:
        for i in range(len(self.chunks)):
            if self._offsets[i] <= index < self._offsets[i + 1]:
                return i
        return len(self.chunks) - 1

    def _file_of(self, index: int) -> Path:
        return self.chunks[self._chunk_of(index)].file if self.chunks else self.path

    def batch_length(self, feed: Mapping[str, np.ndarray]) -> int:
        """How many samples ``feed`` (one of :meth:`batches`) holds."""
        for spec in self.specs:
            axis = self.axis(spec.name)
            if axis is not None and spec.name in feed:
                return int(np.shape(feed[spec.name])[axis])
        return 1

    def batch_starts(self, batch_size: int, *, shuffle: bool = False) -> list[int]:
        """Where each batch of ``batches(batch_size, shuffle=shuffle)`` starts, then where the last one
        ends (positions in the visiting order, of all the data even in a ``window``); nothing is read."""
        size = self.effective_batch_size(batch_size)
        n = self._all_samples()
        stop = n - (n % size) if self._fixed_batches() else n
        spans = list(self._spans(size, stop, shuffle))
        return [start for start, _ in spans] + [spans[-1][1] if spans else 0]

    def yielded_labels(self) -> np.ndarray | None:
        """The labels of the samples ``batches`` yields, in its (unshuffled) order; None without labels."""
        if self.labels is None:
            return None
        start, stop = self.kept if self.kept is not None else (0, self._all_samples())
        return self.labels[start:stop]

    def window(self, start: int, stop: int) -> Dataset:
        """The same data, yielding only the batches that start at positions ``start`` to ``stop - 1``.

        With ``start`` and ``stop`` taken from ``batch_starts`` for the same batch size and order,
        the batches are exactly those a run over all the data feeds (a shard of a calibration).
        """
        return replace(self, kept=(start, stop))

    def subset(self, count: int) -> Dataset:
        """The first ``count`` samples."""
        labels = None if self.labels is None else self.labels[:count]
        return Dataset(self.path, self.specs, self.chunks, labels, limit=count, axes=self.axes)

    def select(self, positions: Sequence[int]) -> Dataset:
        """The samples at ``positions`` (ascending), as data of their own: their batches, labels and
        ``subset`` count from the first of them. Rows are read from the same files (a run of adjacent
        positions as one slice); with an unbatched input, a batch never spans two runs."""
        if self.kept is not None:
            raise ValueError("select from a window")
        chunks = []
        for start, stop in _runs(positions):
            for i, chunk in enumerate(self.chunks):
                lo, hi = max(start, self._offsets[i]), min(stop, self._offsets[i + 1])
                if lo < hi:  # a one-sample file is whole: first stays 0
                    chunks.append(replace(chunk, count=hi - lo, first=chunk.first + lo - self._offsets[i]))
        labels = None if self.labels is None else self.labels[np.asarray(positions, dtype=np.int64)]
        return Dataset(self.path, self.specs, tuple(chunks), labels, axes=self.axes)


def spread(n: int, count: int) -> list[int]:
    """``count`` positions of ``n`` spread evenly, the last one included (``spread(8, 4)``: 1, 3, 5, 7)."""
    return [(i + 1) * n // count - 1 for i in range(count)]


def _runs(positions: Sequence[int]) -> list[tuple[int, int]]:
    """Ascending ``positions`` as runs ``(start, stop)`` of adjacent ones."""
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and p == runs[-1][1]:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


class FeedList:
    """Ready-made feeds, one onnxruntime run each, for ``calibration.calibrate`` from Python.

    For models whose inputs do not stack on axis 0 (a scalar input, a recurrent state batched on
    axis 1, as in Silero VAD), which the ``.npz`` convention cannot describe.
    """

    def __init__(self, feeds: list[dict[str, np.ndarray]], path: Path = Path("<feeds>")) -> None:
        self.feeds = feeds
        self.path = path

    @property
    def num_samples(self) -> int:
        """Number of runs."""
        return len(self.feeds)

    def effective_batch_size(self, requested: int) -> int:
        """Always 1: each feed is one run, whatever batch size is asked for."""
        return 1

    def batches(self, size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """The feeds in order (their own batching is kept; ``shuffle`` does not apply)."""
        return iter(self.feeds)


def _open_file(file: Path) -> dict[str, ArraySource]:
    return {"": open_npy(file)} if file.suffix == ".npy" else open_npz(file)


def open_dataset(
    path: Path,
    specs: Sequence[InputSpec],
    *,
    max_samples: int | None = None,
    images: ImagePreprocess | None = None,
    batch_axes: Mapping[str, int | None] | None = None,
) -> Dataset:
    """Open and check data for a model with inputs ``specs`` (no sample is read yet but labels).

    A directory of image files (and no ``.npz``/``.npy``) feeds a single-input image model, decoded
    and preprocessed per batch as ``images`` says (defaults: resize to the input size, scale 1/255).
    ``batch_axes`` maps an input name to the axis its samples are stacked on, or to None for an
    unbatched input (see the module docstring); inputs not named are batched on axis 0, scalars unbatched.

    Raises:
        CalibrationDataError: naming the file, the input and what was expected.
    """
    path = Path(path)
    axes = _resolve_axes(specs, batch_axes)
    if path.is_dir() and not any(p.suffix in (".npz", ".npy") for p in path.iterdir()) and image_files(path):
        dataset = _image_dataset(path, specs, images)
    else:
        files = _data_files(path)
        opened = [_open_chunk(file, specs, axes) for file in files]
        label_parts = [labels for _, labels in opened if labels is not None]
        labels_all = None
        if label_parts:
            if len(label_parts) != len(files):
                raise CalibrationDataError(f"{path}: some files carry labels and others do not")
            labels_all = np.concatenate(label_parts)
        dataset = Dataset(path, tuple(specs), tuple(chunk for chunk, _ in opened), labels_all, axes=axes)
    if max_samples is not None and max_samples < dataset.num_samples:
        dataset = dataset.subset(max_samples)
    return dataset


def _image_dataset(path: Path, specs: Sequence[InputSpec], images: ImagePreprocess | None) -> Dataset:
    """A folder of images feeding a single-input model."""
    if len(specs) != 1:
        raise CalibrationDataError(f"{path}: an image folder feeds a single-input model; this one has {len(specs)}")
    source = ImageFolder.open(path, specs[0].shape, images or ImagePreprocess())
    if source.dtype != specs[0].dtype:
        raise CalibrationDataError(f"{path}: images give float32 but input '{specs[0].name}' is {specs[0].dtype}")
    chunk = _Chunk(path, {specs[0].name: source}, source.shape[0], False)
    return Dataset(path, tuple(specs), (chunk,), None)


def _open_chunk(
    file: Path, specs: Sequence[InputSpec], axes: Mapping[str, int | None]
) -> tuple[_Chunk, np.ndarray | None]:
    """One data file checked against the model inputs: its chunk, and its labels if it has any."""
    names = [s.name for s in specs]
    content = _open_file(file)
    if "" in content:
        if len(specs) != 1:
            raise CalibrationDataError(
                f"{file}: a .npy feeds a single-input model, but this model has inputs {names}; use .npz"
            )
        content = {names[0]: content.pop("")}
    label_src = next((content.pop(k) for k in LABEL_KEYS if k in content), None)
    unknown = sorted(set(content) - set(names))
    missing = [n for n in names if n not in content]
    if missing or unknown:
        detail = f"missing {missing}" if missing else ""
        if unknown:
            detail += ("; " if detail else "") + f"unexpected keys {unknown}"
        raise CalibrationDataError(f"{file}: keys do not match the model inputs {names}: {detail}")
    counts: dict[str, int] = {}
    singles: set[bool] = set()
    for spec in specs:
        axis = axes[spec.name]
        if axis is None:
            _check_unbatched(file, spec, content[spec.name])
            continue
        single = _check_source(file, spec, content[spec.name], axis)
        singles.add(single)
        counts[spec.name] = 1 if single else content[spec.name].shape[axis]
        if axis and not single:
            content[spec.name] = _AxisRows(content[spec.name], axis)
    if len(set(counts.values())) > 1 or len(singles) > 1:
        raise CalibrationDataError(_count_mismatch(file, specs, content, counts, axes))
    count = next(iter(counts.values()), 1)
    if count == 0:
        raise CalibrationDataError(f"{file}: holds no samples")
    labels = None
    if label_src is not None:
        labels = np.atleast_1d(label_src.read(0, label_src.shape[0] if label_src.shape else 1))
        if labels.shape[0] != count:
            raise CalibrationDataError(f"{file}: {labels.shape[0]} labels for {count} samples")
    return _Chunk(file, content, count, bool(singles) and singles.pop()), labels


@dataclass(frozen=True, slots=True)
class DataFormat:
    """How a data path is read, whatever path it is: ``open_dataset``'s ``batch_axes`` and ``images``.

    ``convert`` reads its calibration data, its evaluation data and single samples the same way.
    """

    batch_axes: Mapping[str, int | None] | None = None
    images: ImagePreprocess | None = None

    def open(self, path: Path, specs: Sequence[InputSpec], *, max_samples: int | None = None) -> Dataset:
        """``open_dataset`` with this format."""
        return open_dataset(path, specs, max_samples=max_samples, images=self.images, batch_axes=self.batch_axes)


def _check_dtype(file: Path, spec: InputSpec, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if dtype.kind in "OUSV":
        raise CalibrationDataError(f"{file}: input '{spec.name}' is a {dtype} array; expected {spec.describe()}")
    if dtype != spec.dtype and (dtype, spec.dtype) not in _SAFE_CASTS:
        raise CalibrationDataError(
            f"{file}: input '{spec.name}' is {_describe(shape, dtype)} but the model expects {spec.describe()}"
        )


def _check_source(file: Path, spec: InputSpec, src: ArraySource, batch_axis: int = 0) -> bool:
    """Check one array against its input; True when it holds a single sample without batch axis."""
    dtype, shape = np.dtype(src.dtype), tuple(src.shape)
    if dtype.kind in "OUSV":
        raise CalibrationDataError(f"{file}: input '{spec.name}' is a {dtype} array; expected {spec.describe()}")
    single = bool(spec.shape) and len(shape) == len(spec.shape) - 1
    full = (*shape[:batch_axis], 1, *shape[batch_axis:]) if single else shape
    where = f" with samples on axis {batch_axis}" if batch_axis else ""
    if spec.shape and len(full) != len(spec.shape):
        raise CalibrationDataError(
            f"{file}: input '{spec.name}' is {_describe(shape, dtype)} but the model expects {spec.describe()}{where}"
        )
    for axis, (want, have) in enumerate(zip(spec.shape, full, strict=True)):
        if axis != batch_axis and isinstance(want, int) and want > 0 and want != have:
            raise CalibrationDataError(
                f"{file}: input '{spec.name}' is {_describe(shape, dtype)} but the model expects "
                f"{spec.describe()}{where} (axis {axis} should be {want})"
            )
    _check_dtype(file, spec, shape, dtype)
    if not single and (not full or full[batch_axis] == 0):
        raise CalibrationDataError(f"{file}: input '{spec.name}' holds no samples")
    return single


def _check_unbatched(file: Path, spec: InputSpec, src: ArraySource) -> None:
    """An unbatched array is one feed: its shape must be the input's (fixed axes equal, same rank)."""
    dtype, shape = np.dtype(src.dtype), tuple(src.shape)
    fits = not spec.has_shape or (
        len(shape) == len(spec.shape)
        and all(not (isinstance(w, int) and w > 0) or w == h for w, h in zip(spec.shape, shape, strict=True))
    )
    if not fits:
        what = "a scalar input is unbatched: store one value" if not spec.shape else "--batch-axis says unbatched"
        raise CalibrationDataError(
            f"{file}: input '{spec.name}' is {_describe(shape, dtype)} but the model expects {spec.describe()} "
            f"({what}, fed unchanged with every batch)"
        )
    _check_dtype(file, spec, shape, dtype)


def _count_mismatch(
    file: Path,
    specs: Sequence[InputSpec],
    content: Mapping[str, ArraySource],
    counts: Mapping[str, int],
    axes: Mapping[str, int | None],
) -> str:
    """The error for inputs holding different numbers of samples, with a ``--batch-axis`` hint when
    another (dynamic) axis of an input holds the number of samples of some other input."""
    listed = ", ".join(f"'{n}' {c} (axis {axes[n]})" for n, c in counts.items())
    hints = []
    for spec in specs:
        if spec.name not in counts:
            continue
        others = {c for n, c in counts.items() if n != spec.name}
        if counts[spec.name] in others:
            continue
        shape = list(content[spec.name].shape)
        axis = axes[spec.name] or 0
        if axis:  # wrapped: the batch axis was moved first
            shape.insert(axis, shape.pop(0))
        for j, have in enumerate(shape):
            dim = spec.shape[j] if j < len(spec.shape) else None
            fixed = isinstance(dim, int) and dim > 0
            if j != axis and have in others and not fixed:
                hints.append(f"--batch-axis {spec.name}={j}")
                break
    hint = (
        f"; if samples are stacked on another axis, say so: {' '.join(hints)}"
        if hints
        else "; if an input is stacked on another axis than 0, pass --batch-axis NAME=AXIS (NAME=none: fed unchanged)"
    )
    return f"{file}: inputs hold different numbers of samples: {listed}{hint}"


def random_dataset(
    specs: Sequence[InputSpec], count: int, *, seed: int = 0, shapes: dict[str, tuple[int, ...]] | None = None
) -> Dataset:
    """Random inputs for smoke tests only: ranges calibrated on them say nothing about real data.

    Float inputs are standard normal, integer inputs uniform in [0, 10); dynamic axes other than the
    batch axis need ``shapes`` (name -> full shape without the batch axis).
    """
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        dims = (shapes or {}).get(spec.name)
        if dims is None:
            rest = spec.shape[1:]
            if not all(isinstance(d, int) and d > 0 for d in rest):
                raise CalibrationDataError(
                    f"input '{spec.name}' has dynamic axes {spec.describe()}; random data needs a fixed shape"
                )
            dims = tuple(int(d) for d in rest)  # type: ignore[arg-type]
        shape = (count, *dims)
        if spec.dtype.kind == "f":
            arrays[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind in "iu":
            arrays[spec.name] = rng.integers(0, 10, size=shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            arrays[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise CalibrationDataError(f"input '{spec.name}': cannot make random {spec.dtype} data")
    dataset = Dataset.from_arrays(specs, arrays)
    dataset.path = Path(f"<random, seed {seed}>")
    return dataset


def sample_shapes(data: Dataset | FeedList) -> dict[str, tuple[int, ...]]:
    """The shape of each input in ``data``'s first feed of one sample (empty when it has none).

    A model that fixes its batch gets its batch, and a ``FeedList`` its first feed as it is.
    """
    first = next(iter(data.batches(1)), None)
    return {} if first is None else {name: tuple(int(d) for d in arr.shape) for name, arr in first.items()}
