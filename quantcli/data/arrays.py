"""Read rows of ``.npy`` files and of ``.npz`` members without loading whole arrays.

An uncompressed ``.npy`` (or a member of an uncompressed ``.npz``, which is what ``np.savez`` writes)
is read with ``seek`` + ``read`` for just the rows asked for, so memory stays at one batch whatever the
file size. Compressed members and Fortran-ordered arrays are loaded whole (and said so in the docs).
Object dtypes are refused before any data is read: nothing is ever unpickled.

A pass over the data reads through a ``RowReader``: each file is opened once for the pass, not once a
batch per input (Silero VAD, fed one sample a run: 783 opens for 256 samples, about 0.4 s), and a
member that fits a small budget (``KEEP_WHOLE_BYTES`` for all members together) is read whole on its
first read and served from memory after that; larger members are still read batch by batch, so memory
stays at one batch plus that budget whatever the number of samples.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np

from quantcli.core.errors import CalibrationDataError

__all__ = ["KEEP_WHOLE_BYTES", "OPEN_FILES", "ArraySource", "RowReader", "open_npy", "open_npz"]

#: bytes of members a ``RowReader`` reads whole and keeps for its pass, all members together
KEEP_WHOLE_BYTES = 1 << 20
#: files a ``RowReader`` keeps open at most (the least recently read is closed first)
OPEN_FILES = 8


class ArraySource(Protocol):
    """A read-only array whose rows (axis 0) can be read on demand."""

    @property
    def path(self) -> Path:
        """The file the rows come from."""
        ...

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the whole array."""
        ...

    @property
    def dtype(self) -> np.dtype:
        """Element type."""
        ...

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start`` to ``stop`` as a new in-memory array."""
        ...


@dataclass(frozen=True, slots=True)
class _FileRows:
    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int

    @property
    def nbytes(self) -> int:
        """Bytes of the whole array."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def read(self, start: int, stop: int) -> np.ndarray:
        with open(self.path, "rb") as fh:
            return self.read_from(fh, start, stop)

    def read_from(self, fh: BinaryIO, start: int, stop: int) -> np.ndarray:
        """``read`` through ``fh``, a handle on ``path`` opened for reading bytes."""
        if not self.shape:
            fh.seek(self.offset)
            return np.frombuffer(fh.read(self.dtype.itemsize), dtype=self.dtype).reshape(()).copy()
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        start, stop = max(0, start), min(stop, self.shape[0])
        count = max(0, stop - start)
        fh.seek(self.offset + start * row)
        buf = fh.read(count * row)
        if len(buf) != count * row:
            raise CalibrationDataError(f"{self.path}: file is truncated (rows {start}..{stop} missing)")
        return np.frombuffer(buf, dtype=self.dtype).reshape((count, *self.shape[1:])).copy()


class RowReader:
    """Reads rows of array sources during one pass over the data (see the module docstring).

    A file member (``open_npy``/``open_npz``) that fits what is left of ``keep_bytes`` is read whole on
    its first read, and its rows are copied from memory after that; a larger one is read rows by rows
    through a handle kept open for the pass (at most ``max_open`` files open, the least recently read
    closed first). Other sources (in memory, images, arrays batched on another axis) read themselves.
    ``close`` (or leaving a ``with`` block) closes the files and drops what was kept.
    """

    def __init__(self, keep_bytes: int = KEEP_WHOLE_BYTES, max_open: int = OPEN_FILES) -> None:
        self.keep_left = keep_bytes
        self.max_open = max(1, max_open)
        self._kept: dict[tuple[Path, int], np.ndarray] = {}
        self._files: dict[Path, BinaryIO] = {}  # insertion order: least recently read first

    def __enter__(self) -> RowReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, source: ArraySource, start: int, stop: int) -> np.ndarray:
        """Rows ``start`` to ``stop`` of ``source`` as a new array (a scalar source: its value)."""
        if not isinstance(source, _FileRows):
            return source.read(start, stop)
        key = (source.path, source.offset)
        kept = self._kept.get(key)
        if kept is None and source.nbytes <= self.keep_left:
            kept = source.read_from(self._file(source.path), 0, source.shape[0] if source.shape else 1)
            self._kept[key] = kept
            self.keep_left -= source.nbytes
        if kept is not None:
            return kept.copy() if not kept.ndim else np.array(kept[max(0, start) : stop])
        return source.read_from(self._file(source.path), start, stop)

    def _file(self, path: Path) -> BinaryIO:
        fh = self._files.pop(path, None)
        if fh is None:
            if len(self._files) >= self.max_open:
                self._files.pop(next(iter(self._files))).close()
            try:
                fh = open(path, "rb")  # noqa: SIM115 (closed by close(), after the pass)
            except OSError as exc:
                raise CalibrationDataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
        self._files[path] = fh  # now the most recently read
        return fh

    def close(self) -> None:
        """Close the files and drop the members kept."""
        files, self._files = self._files, {}
        self._kept.clear()
        for fh in files.values():
            fh.close()


@dataclass(frozen=True, slots=True)
class _InMemory:
    path: Path
    array: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.array(self.array[start:stop]) if self.array.ndim else self.array.copy()


def _header(fh, path: Path, what: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh, max_header_size=100_000)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh, max_header_size=100_000)
    except ValueError as exc:
        raise CalibrationDataError(f"{path}: {what} is not a valid .npy array ({exc})") from exc
    if dtype.hasobject:
        raise CalibrationDataError(
            f"{path}: {what} holds a pickled/object array; quantcli never unpickles data. "
            "Save plain numeric arrays with np.savez"
        )
    return tuple(int(d) for d in shape), bool(fortran), np.dtype(dtype)


def open_npy(path: Path) -> ArraySource:
    """Rows of a ``.npy`` file, read on demand."""
    try:
        with open(path, "rb") as fh:
            shape, fortran, dtype = _header(fh, path, "file")
            offset = fh.tell()
    except OSError as exc:
        raise CalibrationDataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if fortran:
        return _InMemory(path, np.load(path, allow_pickle=False))
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if path.stat().st_size < need:
        raise CalibrationDataError(f"{path}: file is truncated ({path.stat().st_size} of {need} bytes)")
    return _FileRows(path, shape, dtype, offset)


def open_npz(path: Path) -> dict[str, ArraySource]:
    """Each member of an ``.npz`` as rows read on demand (compressed members are loaded whole)."""
    out: dict[str, ArraySource] = {}
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                key = info.filename[: -len(".npy")]
                if info.compress_type != zipfile.ZIP_STORED:
                    with zf.open(info) as member:
                        shape, fortran, dtype = _header(member, path, f"member '{key}'")
                    with np.load(path, allow_pickle=False) as npz:
                        out[key] = _InMemory(path, npz[key])
                    continue
                raw.seek(info.header_offset)
                local = raw.read(30)
                if len(local) != 30 or local[:4] != b"PK\x03\x04":
                    raise CalibrationDataError(f"{path}: corrupted .npz (bad header for '{key}')")
                name_len = int.from_bytes(local[26:28], "little")
                extra_len = int.from_bytes(local[28:30], "little")
                raw.seek(info.header_offset + 30 + name_len + extra_len)
                shape, fortran, dtype = _header(raw, path, f"member '{key}'")
                offset = raw.tell()
                if fortran:
                    with np.load(path, allow_pickle=False) as npz:
                        out[key] = _InMemory(path, npz[key])
                else:
                    out[key] = _FileRows(path, shape, dtype, offset)
    except (zipfile.BadZipFile, EOFError) as exc:
        raise CalibrationDataError(f"{path}: not a readable .npz file ({exc})") from exc
    except OSError as exc:
        raise CalibrationDataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return out
