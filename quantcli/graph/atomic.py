"""Write output files so that a crash, a kill or a full disk never leaves a partial file.

Every output (model, external data, calibration file and its sidecar, statistics, recipe, report)
is written to a temporary file beside its target and renamed over it only once complete:

* **Temporaries** are named ``.<target name>.<pid>.<random>.quantcli.tmp`` and held under an
  exclusive ``flock`` by the process writing them. The lock dies with the process, even under
  SIGKILL, so the next write of the same target removes every temporary whose lock it can take
  (its writer is gone) and leaves those still being written.
* **Commit**: the file is flushed to disk (``fsync``), then renamed over the target under an
  exclusive lock on the directory, so two processes writing the same output commit one after the
  other and end with one complete file (the last one). Without ``force`` the check that the target
  does not exist is repeated under that lock.
* **Several files** that go together (a model and its external data, a calibration file and its
  histograms): the companions are committed first and the main file last, after the old main file
  has been removed. A kill in between leaves no main file (none), never a main file with another
  run's companion.
* **A full disk** (ENOSPC, or a quota: EDQUOT) is one ``OutputPathError`` line naming the target;
  the temporaries are removed.

``QUANTCLI_KILL_AT_WRITE_STEP=N`` (a test hook) makes the process kill itself with SIGKILL at the
N-th step of writing (``checkpoint``); ``QUANTCLI_WRITE_STEPS=FILE`` appends each step's name to
FILE, so a test knows how many there are.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from quantcli.core.errors import OutputPathError

__all__ = [
    "SCRATCH_PREFIX",
    "TEMP_SUFFIX",
    "atomic_files",
    "atomic_output",
    "checkpoint",
    "release_scratch",
    "scratch_directory",
    "stale_scratch",
    "stale_temporaries",
    "write_bytes",
]

TEMP_SUFFIX = ".quantcli.tmp"
#: a run's scratch directory (``scratch_directory``), beside the output; ``owner.lock`` inside is
#: locked while its process lives
SCRATCH_PREFIX = ".quantcli-scratch-"
_OWNER = "owner.lock"
#: a scratch directory without its lock file is left alone this long (its owner may be creating it)
_UNLOCKED_GRACE_S = 3600.0
_KILL_ENV, _LOG_ENV = "QUANTCLI_KILL_AT_WRITE_STEP", "QUANTCLI_WRITE_STEPS"
_CHUNK = 1 << 16
_steps = 0

try:  # POSIX; elsewhere no locks: temporaries are then only removed by the run that made them
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def checkpoint(name: str) -> None:
    """A step of writing: the test hooks may log it or kill the process here (module docstring)."""
    global _steps
    kill_at, log = os.environ.get(_KILL_ENV), os.environ.get(_LOG_ENV)
    if kill_at is None and log is None:
        return
    _steps += 1
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"{_steps} {name}\n")
    if kill_at is not None and kill_at.isdigit() and int(kill_at) == _steps:
        os.kill(os.getpid(), signal.SIGKILL)


def _lock(fd: int, *, wait: bool) -> bool:
    """Take an exclusive flock on ``fd``; False if another process holds it (and not ``wait``)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as exc:  # a file system without locks: behave as if nobody else were writing
        if exc.errno in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
            return True
        raise
    return True


def stale_temporaries(path: Path) -> list[Path]:
    """Temporaries of ``path`` (and its companions) whose writer has died: removed by the next write."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    prefix = f".{path.name}."
    stale = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            ours = entry.name.startswith(prefix) and entry.name.endswith(TEMP_SUFFIX) and entry.is_file()
            if ours and _unowned(Path(entry.path)):
                stale.append(Path(entry.path))
    return stale


def _unowned(tmp: Path) -> bool:
    try:
        fd = os.open(tmp, os.O_RDONLY)
    except OSError:
        return False
    try:
        return _lock(fd, wait=False)
    finally:
        os.close(fd)  # the lock goes with it; the file is removed right after, still unowned


def _remove_stale(path: Path) -> None:
    for tmp in stale_temporaries(path):
        with contextlib.suppress(OSError):
            tmp.unlink()
    parent = Path(path).parent if str(Path(path).parent) else Path(".")
    for folder in stale_scratch(parent):
        shutil.rmtree(folder, ignore_errors=True)


def scratch_directory(parent: Path | None) -> tuple[Path, int]:
    """A new scratch directory in ``parent`` (None: the system's) that this process owns: the returned
    descriptor holds the lock on its ``owner.lock`` until ``release_scratch``. If the process dies
    first (SIGKILL), the next write beside it, or the next scratch directory there, removes it."""
    if parent is not None:
        for folder in stale_scratch(parent):
            shutil.rmtree(folder, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=parent))
    fd = os.open(folder / _OWNER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    _lock(fd, wait=True)
    return folder, fd


def release_scratch(folder: Path, fd: int) -> None:
    """Remove a scratch directory of this process's, then let go of its lock."""
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.close(fd)


def stale_scratch(parent: Path) -> list[Path]:
    """Scratch directories in ``parent`` whose process has died (their lock is free), and ones that
    never got a lock file and are older than an hour. Nothing without file locks (no ``fcntl``)."""
    if fcntl is None:
        return []
    stale = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            if not (entry.name.startswith(SCRATCH_PREFIX) and entry.is_dir(follow_symlinks=False)):
                continue
            lock = Path(entry.path) / _OWNER
            if lock.exists():
                if _unowned(lock):
                    stale.append(Path(entry.path))
            elif time.time() - entry.stat(follow_symlinks=False).st_mtime > _UNLOCKED_GRACE_S:
                stale.append(Path(entry.path))
    return stale


def _new_temporary(path: Path) -> tuple[Path, int]:
    """A new, empty, locked temporary beside ``path`` (mode from the umask, as a plain open gives)."""
    for _ in range(8):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        _lock(fd, wait=True)
        try:  # another process's clean-up may have taken it between the open and the lock
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return tmp, fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise OutputPathError(f"{path}: cannot create a temporary file beside it")


def _check_target(path: Path, force: bool) -> Path:
    """The target's directory, after checking the target can be written."""
    if path.is_dir():
        raise OutputPathError(f"{path}: is a directory; give a file name for the output")
    if path.exists() and not force:
        raise OutputPathError(f"{path}: already exists; pass --force to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputPathError(f"{path}: directory '{parent}' does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"{path}: directory '{parent}' is not writable")
    return parent


@contextlib.contextmanager
def _directory_lock(parent: Path) -> Iterator[None]:
    """An exclusive lock on a directory for the duration of a commit."""
    try:
        fd = os.open(parent, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        _lock(fd, wait=True)
        yield
    finally:
        os.close(fd)


def _fsync(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.fsync(fd)


def _commit(path: Path, temps: list[tuple[Path, Path, int]], remove: Sequence[Path], force: bool) -> None:
    """Rename the temporaries over their targets: companions first, the main file (first) last."""
    for _, _, fd in temps:
        checkpoint("fsync")
        _fsync(fd)
    parent = path.parent if str(path.parent) else Path(".")
    with _directory_lock(parent):
        if path.exists() and not force:
            raise OutputPathError(f"{path}: already exists (written meanwhile); pass --force to overwrite it")
        if len(temps) > 1 or remove:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # from here to the last rename: no main file, never a mismatched pair
            checkpoint("removed old output")
        for target in remove:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
        for target, tmp, _ in [*temps[1:], temps[0]]:
            os.replace(tmp, target)
            checkpoint(f"renamed {target.name}")
        dir_fd = os.open(parent, os.O_RDONLY)
        try:
            _fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def atomic_files(
    path: Path, companions: Sequence[Path] = (), *, force: bool, remove: Sequence[Path] = ()
) -> Iterator[list[Path]]:
    """Yield temporaries for ``path`` and each companion; renamed into place only if the block succeeds.

    ``remove``: files that go with ``path`` and must not outlive the old version (a histogram
    sidecar the new calibration does not have); removed in the same commit. Refuses an existing
    ``path`` unless ``force``, a missing directory, or one that cannot be written.

    Raises:
        OutputPathError: those refusals, or no space left on the device.
    """
    path = Path(path)
    parent = _check_target(path, force)
    _remove_stale(path)
    temps: list[tuple[Path, Path, int]] = []
    try:
        for target in (path, *map(Path, companions)):
            temps.append((target, *_new_temporary(target)))
            checkpoint(f"created temporary of {target.name}")
        yield [tmp for _, tmp, _ in temps]
        _commit(path, temps, [Path(r) for r in remove], force)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputPathError(
                f"{path}: no space left on the device writing it (in '{parent}'); free some space or write elsewhere"
            ) from exc
        raise
    finally:
        for _, tmp, fd in temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.close(fd)


@contextlib.contextmanager
def atomic_output(path: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it is renamed into place only if the block succeeds.

    Refuses an existing path unless ``force``, a missing directory, or a directory that cannot be
    written. On any failure (including KeyboardInterrupt) the temporary file is removed; after a
    kill, the next write of ``path`` removes it.
    """
    with atomic_files(path, force=force) as temps:
        yield temps[0]


def write_bytes(tmp: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``tmp`` in chunks (each a ``checkpoint``)."""
    view = memoryview(data)
    with open(tmp, "wb") as fh:
        for start in range(0, len(view), _CHUNK):
            fh.write(view[start : start + _CHUNK])
            checkpoint("wrote a chunk")
