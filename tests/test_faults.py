"""Outputs survive faults: a kill at any step of writing leaves the previous output or none (never a
partial or mixed file) and no temporaries after the next run; two writers end with one complete
file; a full disk is one clear line."""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app
from quantcli.core.errors import OutputPathError
from quantcli.graph import atomic
from quantcli.graph.atomic import TEMP_SUFFIX, atomic_output, stale_temporaries
from quantcli.graph.model_io import load_model, save_model
from tests import models
from tests.conftest import CALIBRATION_DATA, REPO, SAMPLE_MODELS

runner = CliRunner()


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """digits_cnn as a plain file and with external data, and two calibrations of it."""
    folder = tmp_path_factory.mktemp("faults")
    model = SAMPLE_MODELS / "digits_cnn.onnx"
    external = folder / "input" / "digits_cnn_ext.onnx"
    external.parent.mkdir()
    save_model(load_model(model), external, external_data=True)
    found = {"plain": model, "external": external}
    for (kind, path), method in itertools.product(list(found.items()), ("minmax", "percentile")):
        found[f"{kind}-{method}"] = folder / f"{kind}-{method}.json"
        args = ["calibrate", path, "--data", CALIBRATION_DATA / "digits_cnn_calib.npz", "--method", method]
        res = runner.invoke(app, [str(a) for a in [*args, "-o", found[f"{kind}-{method}"], "-q"]])
        assert res.exit_code == 0, res.output
    return found


def _worker(*args: object) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fault_worker", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain", "external", "calibrate"])
def test_kill_at_random_steps_leaves_previous_or_complete_output(tmp_path, calibrated, kind):
    if kind == "calibrate":  # calibrate (entropy: a calibration file and its histograms) over a percentile one
        given = [calibrated["plain"], CALIBRATION_DATA / "digits_cnn_calib.npz"]
    else:  # convert over the FP32 model, written plain or with external data
        given = [calibrated[kind], calibrated[f"{kind}-minmax"]]
    report = _worker("kill", kind, *given, tmp_path, 20260 + len(kind), 20)
    assert report["first"] == "exit 0" and report["last"] == "exit 0"
    assert len(report["steps"]) >= 5, report["steps"]
    assert len(report["kills"]) == 20
    steps = report["steps"]
    out = "out.json" if kind == "calibrate" else "out.onnx"
    committed = steps.index(f"renamed {out}") + 1  # the main file's rename is the last step
    removed = steps.index("removed old output") + 1 if kind != "plain" else committed
    for k in report["kills"]:
        assert k["status"] == "SIGKILL", k
        # before the commit: the previous output; after it: the new one; in between (a model with
        # its data file), no model at all, never a model with the other run's data
        expected = "previous" if k["step"] < removed else "new" if k["step"] >= committed else "absent"
        assert k["left"] == expected, k
    assert any(k["strays"] for k in report["kills"])  # kills do leave temporaries behind ...
    assert report["strays_after_next_run"] == []  # ... and the next run removes them
    assert report["final"] == "new"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain", "external"])
def test_two_converts_racing_on_one_output_end_with_one_complete_file(tmp_path, calibrated, kind):
    calibs = calibrated[f"{kind}-minmax"], calibrated[f"{kind}-percentile"]
    report = _worker("race", kind, calibrated[kind], *calibs, tmp_path)
    runs = report["runs"]
    # A waits with its file written; B writes the same output; A then commits last and wins
    assert runs["fsync force=True"] == {"statuses": "A exit 0, B exit 0", "final": "A"}
    # A's fresh temporary is locked: B's clean-up of dead writers' temporaries leaves it alone
    assert runs["created temporary force=True"] == {"statuses": "A exit 0, B exit 0", "final": "A"}
    # without --force the output did not exist when A started, but B wrote it meanwhile: A refuses
    assert runs["fsync force=False"] == {"statuses": "A exit 1, B exit 0", "final": "B"}
    assert report["strays"] == []


def test_stale_temporaries_are_those_of_dead_writers(tmp_path):
    target = tmp_path / "m.onnx"
    dead = tmp_path / f".m.onnx.1.abcd{TEMP_SUFFIX}"
    dead.write_bytes(b"half a model")
    unrelated = tmp_path / f".other.onnx.1.abcd{TEMP_SUFFIX}"
    unrelated.write_bytes(b"x")
    with atomic_output(target, force=False) as tmp:
        assert not dead.exists()  # removed on entry: nobody holds its lock
        assert stale_temporaries(target) == []  # our own temporary is locked, so not stale
        tmp.write_bytes(b"complete")
    assert target.read_bytes() == b"complete" and unrelated.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, unrelated.name])
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_calibration_and_its_sidecar_are_replaced_together(tmp_path, calibrated):
    out = tmp_path / "c.json"
    shutil.copy(calibrated["plain-percentile"], out)
    shutil.copy(str(calibrated["plain-percentile"]) + ".hist.npz", str(out) + ".hist.npz")
    shutil.copy(calibrated["plain-minmax"], tmp_path / "mm.json")
    from quantcli.stats.artifact import read_calibration, write_calibration

    write_calibration(read_calibration(tmp_path / "mm.json"), out, model_path="digits_cnn.onnx", force=True)
    assert out.read_bytes() == calibrated["plain-minmax"].read_bytes()
    assert not Path(str(out) + ".hist.npz").exists()  # no histograms of another calibration left beside it


def _no_space(name: str) -> None:
    if name == "wrote a chunk":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_is_one_line_and_leaves_the_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous")
    monkeypatch.setattr(atomic, "checkpoint", _no_space)
    with pytest.raises(OutputPathError, match=r"m\.onnx: no space left on the device") as info:
        save_model(models.small_cnn(), out, force=True)
    assert "\n" not in str(info.value)
    assert out.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 64 KiB tmpfs (needs root / CAP_SYS_ADMIN: skipped, saying so, where mount is not permitted)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if proc.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.decode().strip() or 'not permitted'})")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_convert_onto_a_full_tmpfs_is_one_clear_line(small_disk, calibrated):
    out = small_disk / "q.onnx"
    args = ["convert", calibrated["plain"], "-o", out, "--calibration", calibrated["plain-minmax"]]
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 3, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no space left on the device" in lines[0], res.output
    assert list(small_disk.iterdir()) == []  # no partial output, no temporary
    data = np.zeros(8, np.uint8).tobytes()
    (small_disk / "fits.bin").write_bytes(data)  # the disk itself still works


def test_a_killed_runs_scratch_folder_goes_with_the_next_write_and_a_live_one_stays(tmp_path):
    """Above 2 GB convert spills weights to a scratch folder beside the output; SIGKILL leaves it behind.
    The next write beside it removes it once its owner is dead, never while the owner lives."""
    import subprocess
    import sys

    from quantcli.graph.atomic import SCRATCH_PREFIX, atomic_output, release_scratch, scratch_directory, stale_scratch

    child = (
        "import os, signal, sys; from pathlib import Path; from quantcli.graph.atomic import scratch_directory; "
        "folder, _ = scratch_directory(Path(sys.argv[1])); (folder / 'w.bin').write_bytes(b'x' * 1024); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )

    def killed_run() -> Path:
        subprocess.run([sys.executable, "-c", child, str(tmp_path)], check=False)
        (dead,) = [p for p in tmp_path.iterdir() if p.name.startswith(SCRATCH_PREFIX) and p != young]
        return dead

    young = tmp_path / f"{SCRATCH_PREFIX}starting"  # no lock file yet: its owner may be making it
    young.mkdir()
    dead = killed_run()
    assert stale_scratch(tmp_path) == [dead]
    with atomic_output(tmp_path / "out.onnx", force=False) as tmp:
        tmp.write_bytes(b"model")
    assert not dead.exists() and young.is_dir()
    dead = killed_run()
    live, fd = scratch_directory(tmp_path)  # the next run's scratch folder: the dead one goes first
    try:
        assert not dead.exists() and live.is_dir()
        assert stale_scratch(tmp_path) == []  # this process lives: its folder is not stale
    finally:
        release_scratch(live, fd)
    assert not live.exists() and young.is_dir()
