"""Kill ``convert`` while it writes, and race two of them on one output; report what is left on disk.

Runs in its own process, which imports quantcli once and forks one child per convert before any
onnxruntime session exists (so the children start fast and safely). Each child runs
``quantcli.api.convert_model`` and exits with its status; SIGKILL comes from the test hook of
``quantcli.graph.atomic`` (``QUANTCLI_KILL_AT_WRITE_STEP``), a deterministic step of the write.
Prints one JSON line.

    python -m tests.fault_worker kill plain|external MODEL CALIB DIR SEED COUNT
    python -m tests.fault_worker kill calibrate MODEL DATA DIR SEED COUNT
    python -m tests.fault_worker race plain|external MODEL CALIB_A CALIB_B DIR
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
from quantcli.core.options import CalibrationMethod
from quantcli.graph import atomic
from quantcli.graph.atomic import TEMP_SUFFIX
from quantcli.graph.model_io import load_model, save_model
from quantcli.pipeline import steps
from quantcli.stats.artifact import read_calibration, write_calibration


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


#: what the children run: "plain" or "external" convert (model + external data), or "calibrate"
KIND = "plain"


def _out(folder: Path) -> Path:
    return folder / ("out.json" if KIND == "calibrate" else "out.onnx")


def _pair(out: Path) -> tuple[str | None, str | None]:
    """sha256 of the output and of its companion (external data, histograms; None where absent)."""
    return _sha(out), _sha(out.with_name(out.name + (".hist.npz" if KIND == "calibrate" else ".data")))


def _run(model: Path, given: Path, out: Path, force: bool, method: str = "entropy") -> None:
    """One convert of ``model`` with calibration ``given``, or one calibration on data ``given``."""
    if KIND == "calibrate":
        result = api.calibrate(api.CalibrateRequest(model, given, method=CalibrationMethod(method)))
        write_calibration(result, out, model_path=model.name, force=force)
        return
    if KIND == "external":  # the same convert, with its output written as model + external data
        steps.save_model = functools.partial(save_model, external_data=True)  # type: ignore[assignment]
    api.convert_model(model, out, calibration=given, force=force)


def _child(
    model: Path, given: Path, out: Path, *, force: bool = True, env: dict[str, str] | None = None, method: str = ""
) -> int:
    """Fork a convert (or calibrate); returns the child's pid. ``env``: variables set in the child only."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.environ.update(env or {})
        _run(model, given, out, force, *([method] if method else []))
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
    if KIND == "calibrate":
        read_calibration(out)
    else:
        load_model(out)  # complete: onnx reads and validates it (with its external data)
    return "previous" if now == previous else "new"


def _strays(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(TEMP_SUFFIX))


def kill(model: Path, given: Path, folder: Path, seed: int, count: int) -> dict[str, object]:
    """Kill convert (calibrate) at ``count`` random steps of its write; check the output after each."""
    out, log = _out(folder), folder / "steps.log"
    first = _wait(_child(model, given, out, env={"QUANTCLI_WRITE_STEPS": str(log)}))
    clean = _pair(out)
    names = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    keep = folder / "previous"
    keep.mkdir()
    if KIND == "calibrate":  # the previous output: a percentile calibration, with its own histograms
        _wait(_child(model, given, keep / out.name, method="percentile"))
    else:  # the FP32 model
        save_model(load_model(model), keep / out.name, external_data=KIND == "external")
    previous = _pair(keep / out.name)
    rng = random.Random(seed)
    kills = []
    for _ in range(count):
        for old in keep.iterdir():  # plain copies: no write of quantcli's cleans the temporaries up
            shutil.copyfile(old, folder / old.name)
        step = rng.randint(1, len(names))
        status = _wait(_child(model, given, out, env={"QUANTCLI_KILL_AT_WRITE_STEP": str(step)}))
        kills.append({"step": step, "at": names[step - 1], "status": status, "left": _state(out, previous, clean)})
        kills[-1]["strays"] = len(_strays(folder))
    last = _wait(_child(model, given, out))
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


def _race_once(model: Path, calibs: tuple[Path, Path], out: Path, point: str, force: bool) -> str:
    """A writes up to ``point`` and waits; B writes the same output completely; then A finishes."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    original = atomic.checkpoint
    atomic.checkpoint = _paused_at(point, ready_w, go_r)  # inherited by A only: restored below
    try:
        a = _child(model, calibs[0], out, force=force)
    finally:
        atomic.checkpoint = original
    os.read(ready_r, 1)
    b = _wait(_child(model, calibs[1], out, force=force))
    os.write(go_w, b"g")
    return f"A {_wait(a)}, B {b}"


def race(model: Path, calibs: tuple[Path, Path], folder: Path) -> dict[str, object]:
    """Two converts of different outputs to one path, interleaved at chosen steps."""
    expected = []  # every output is named out.onnx: external data names its file in the model
    for i, calib in enumerate(calibs):
        (folder / f"clean{i}").mkdir()
        _wait(_child(model, calib, folder / f"clean{i}" / "out.onnx"))
        expected.append(_pair(folder / f"clean{i}" / "out.onnx"))
    runs = {}
    for point, force in (("fsync", True), ("created temporary", True), ("fsync", False)):
        out = folder / f"race-{point.replace(' ', '-')}-{force}" / "out.onnx"
        out.parent.mkdir()
        statuses = _race_once(model, calibs, out, point, force)
        now = _pair(out)
        which = "A" if now == expected[0] else "B" if now == expected[1] else f"mixed {now}"
        if which in ("A", "B"):
            load_model(out)
        runs[f"{point} force={force}"] = {"statuses": statuses, "final": which}
    return {"runs": runs, "strays": [s for d in folder.iterdir() for s in _strays(d)]}


def main() -> None:
    global KIND
    mode, KIND, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    onnx.checker  # noqa: B018 - imported before forking, like everything the children use
    if mode == "kill":
        report = kill(Path(args[0]), Path(args[1]), Path(args[2]), int(args[3]), int(args[4]))
    else:
        report = race(Path(args[0]), (Path(args[1]), Path(args[2])), Path(args[3]))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
