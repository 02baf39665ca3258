"""Whether two data paths hold the same samples: the same file or folder, or a byte-identical copy of it.

``convert`` asks it of ``--data`` and ``--eval-data``: a search scored on the samples calibration fitted
its ranges to reads optimistic (``quantcli.pipeline.holdout``). A copy under another
name is the same samples, so content counts, not only the resolved path. The check is cheap when the
sources differ: files are hashed only when both sides hold as many files of the same sizes. A source
that holds some of the other's samples (a subset, a reshuffled copy in one file) is not detected.
"""

from __future__ import annotations

from pathlib import Path

from quantcli.core.digest import file_sha256

__all__ = ["same_data"]


def same_data(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are the same file or folder, or hold byte-identical files (a folder: the same files'
    contents, whatever their names)."""
    a, b = Path(a), Path(b)
    if not (a.exists() and b.exists()):
        return False
    if a.resolve() == b.resolve():
        return True
    files_a, files_b = _files(a), _files(b)
    if not files_a or sorted(p.stat().st_size for p in files_a) != sorted(p.stat().st_size for p in files_b):
        return False
    return sorted(map(file_sha256, files_a)) == sorted(map(file_sha256, files_b))


def _files(path: Path) -> list[Path]:
    """The file itself, or the files directly inside a folder (data files and images alike)."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file())
    return [path]
