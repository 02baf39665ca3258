"""Kill ``convert`` while it writes, and race two of them on one output; report what is left on disk.

Runs in its own process, which imports quantcli once and forks one child per convert before any
onnxruntime session exists (so the children start fast and safely). Each child runs
``quantcli.api.convert_model`` and exits with its status; SIGKILL comes from the test hook of
``quantcli.graph.atomic`` (``QUANTCLI_KILL_AT_WRITE_STEP``), a deterministic step of the write.
Prints one JSON line.

    python -m tests.fault_worker kill MODEL CALIB DIR SEED COUNT [external]
    python -m tests.fault_worker race MODEL CALIB_A CALIB_B DIR [external]
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import onnx

from quantcli import api
from quantcli.graph import atomic
from quantcli.graph.atomic import TEMP_SUFFIX
from quantcli.graph.model_io import load_model, save_model
from quantcli.pipeline import steps


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _pair(out: Path) -> tuple[str | None, str | None]:
    """sha256 of the model file and of its external data file (None where absent)."""
    return _sha(out), _sha(out.with_name(out.name + ".data"))


def _child(
    model: Path, calib: Path, out: Path, *, external: bool, force: bool = True, env: dict[str, str] | None = None
) -> int:
    """Fork a convert; returns the child's pid. ``env``: variables set in the child only."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.environ.update(env or {})
        if external:  # the same convert, with its output written as model + external data
            steps.save_model = functools.partial(save_model, external_data=True)  # type: ignore[assignment]
        api.convert_model(model, out, calibration=calib, force=force)
        code = 0
    except BaseException as exc:  # report and exit: never return into the parent's code
        print(f"child: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        os._exit(code)


def _wait(pid: int) -> str:
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    return f"exit {os.WEXITSTATUS(status)}"


def _state(out: Path, previous: tuple[str | None, str | None], clean: tuple[str | None, str | None]) -> str:
    """What a kill left: absent, previous, new (each a complete, loadable model) or mixed."""
    now = _pair(out)
    if now[0] is None:
        return "absent"
    if now not in (previous, clean):
        return f"mixed {now[0][:8]}/{(now[1] or '-')[:8]}"
    load_model(out)  # complete: onnx reads and validates it (with its external data)
    return "previous" if now == previous else "new"


def _strays(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(TEMP_SUFFIX))


def kill(model: Path, calib: Path, folder: Path, seed: int, count: int, external: bool) -> dict[str, object]:
    """Kill convert at ``count`` random steps of its write; check the output after each."""
    out, log = folder / "out.onnx", folder / "steps.log"
    first = _wait(_child(model, calib, out, external=external, force=True, env={"QUANTCLI_WRITE_STEPS": str(log)}))
    clean = _pair(out)
    names = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    keep = folder / "previous"
    keep.mkdir()
    save_model(load_model(model), keep / out.name, external_data=external)  # the previous output: FP32
    previous = _pair(keep / out.name)
    rng = random.Random(seed)
    kills = []
    for _ in range(count):
        for old in keep.iterdir():  # plain copies: no write of quantcli's cleans the temporaries up
            shutil.copyfile(old, folder / old.name)
        step = rng.randint(1, len(names))
        status = _wait(_child(model, calib, out, external=external, env={"QUANTCLI_KILL_AT_WRITE_STEP": str(step)}))
        kills.append({"step": step, "at": names[step - 1], "status": status, "left": _state(out, previous, clean)})
        kills[-1]["strays"] = len(_strays(folder))
    last = _wait(_child(model, calib, out, external=external))
    return {
        "first": first,
        "steps": names,
        "kills": kills,
        "last": last,
        "final": _state(out, previous, clean),
        "strays_after_next_run": _strays(folder),
    }


def _paused_at(point: str, ready: int, go: int) -> Callable[[str], None]:
    """A ``checkpoint`` that stops at ``point`` until the parent says go (one byte on a pipe)."""
    original = atomic.checkpoint
    waited: list[str] = []

    def hook(name: str) -> None:
        original(name)
        if name.startswith(point) and not waited:  # the first such step only
            waited.append(name)
            os.write(ready, b"r")
            os.read(go, 1)

    return hook


def _race_once(model: Path, calibs: tuple[Path, Path], out: Path, point: str, force: bool, external: bool) -> str:
    """A writes up to ``point`` and waits; B writes the same output completely; then A finishes."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    original = atomic.checkpoint
    atomic.checkpoint = _paused_at(point, ready_w, go_r)  # inherited by A only: restored below
    try:
        a = _child(model, calibs[0], out, external=external, force=force)
    finally:
        atomic.checkpoint = original
    os.read(ready_r, 1)
    b = _wait(_child(model, calibs[1], out, external=external, force=force))
    os.write(go_w, b"g")
    return f"A {_wait(a)}, B {b}"


def race(model: Path, calibs: tuple[Path, Path], folder: Path, external: bool) -> dict[str, object]:
    """Two converts of different outputs to one path, interleaved at chosen steps."""
    expected = []  # every output is named out.onnx: external data names its file in the model
    for i, calib in enumerate(calibs):
        (folder / f"clean{i}").mkdir()
        _wait(_child(model, calib, folder / f"clean{i}" / "out.onnx", external=external))
        expected.append(_pair(folder / f"clean{i}" / "out.onnx"))
    runs = {}
    for point, force in (("fsync", True), ("created temporary", True), ("fsync", False)):
        out = folder / f"race-{point.replace(' ', '-')}-{force}" / "out.onnx"
        out.parent.mkdir()
        statuses = _race_once(model, calibs, out, point, force, external)
        now = _pair(out)
        which = "A" if now == expected[0] else "B" if now == expected[1] else f"mixed {now}"
        if which in ("A", "B"):
            load_model(out)
        runs[f"{point} force={force}"] = {"statuses": statuses, "final": which}
    return {"runs": runs, "strays": [s for d in folder.iterdir() for s in _strays(d)]}


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    external = args[-1] == "external"
    onnx.checker  # noqa: B018 - imported before forking, like everything the children use
    if mode == "kill":
        report = kill(Path(args[0]), Path(args[1]), Path(args[2]), int(args[3]), int(args[4]), external)
    else:
        report = race(Path(args[0]), (Path(args[1]), Path(args[2])), Path(args[3]), external)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
