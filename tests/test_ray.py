"""Calibration on Ray (the optional extra): shards as tasks on a local Ray with 2 CPUs, merged on the
driver, give the same calibration file as one process; the base install never imports Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app
from tests.conftest import CALIBRATION_DATA, REPO, SAMPLE_MODELS

runner = CliRunner()


def test_base_install_never_imports_ray():
    code = "import sys, quantcli.api, quantcli.cli.app, quantcli.stats.merge; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


def test_ray_without_ray_installed_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    model, data = SAMPLE_MODELS / "digits_cnn.onnx", CALIBRATION_DATA / "digits_cnn_calib.npz"
    res = runner.invoke(
        app, ["calibrate", str(model), "--data", str(data), "--ray", "local", "-o", str(tmp_path / "c.json")]
    )
    assert res.exit_code == 3 and "pip install 'quantcli[ray]'" in res.output


@pytest.mark.slow
def test_calibrate_on_local_ray_equals_one_process(tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'quantcli[ray]'")
    model, data = SAMPLE_MODELS / "digits_transformer.onnx", CALIBRATION_DATA / "digits_transformer_calib.npz"
    args = ["calibrate", str(model), "--data", str(data), "--method", "percentile", "-q"]
    one = runner.invoke(app, [*args, "-o", str(tmp_path / "one.json")])
    assert one.exit_code == 0, one.output
    import ray

    ray.init(num_cpus=2, log_to_driver=False)  # a local Ray with 2 CPUs; calibrate uses it as it is
    try:
        res = runner.invoke(app, [*args, "--ray", "local", "--shards", "3", "-o", str(tmp_path / "ray.json")])
    finally:
        ray.shutdown()
    assert res.exit_code == 0, res.output
    for suffix in ("", ".hist.npz"):
        assert (tmp_path / f"ray.json{suffix}").read_bytes() == (tmp_path / f"one.json{suffix}").read_bytes()
