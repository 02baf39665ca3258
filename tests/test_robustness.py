"""Fuzzing, interruption and determinism: the promises that matter when quantcli runs unattended."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from quantcli.core.host import default_config
from quantcli.graph.model_io import atomic_output
from quantcli.verify.audit import audit_fusion
from tests import models
from tests.helpers import quantize, run, sqnr

REPO = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def test_mutated_model_files_give_clean_errors_never_crashes():
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz_worker", "7", "300"],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=_env(), check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcome["bug"] == 0, outcome["bugs"][:5]
    assert outcome["clean_error"] + outcome["converted"] == 300
    assert outcome["clean_error"] > 100  # the mutations do break most files


@st.composite
def conv_graphs(draw):
    """Random small conv nets of the ops quantcli quantizes, with trained-looking weight scales."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    c = draw(st.sampled_from([3, 4, 8]))
    nodes, inits = [], []
    cur, ch, size, k = "x", 3, 16, 0

    def w(shape, fan_in):
        name = f"w{len(inits)}"
        inits.append(numpy_helper.from_array((rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32), name))
        return name

    for op in draw(st.lists(st.sampled_from(["conv", "conv_relu", "residual", "maxpool", "sigmoid", "avgpool"]),
                            min_size=1, max_size=6)):  # fmt: skip
        k += 1
        out = f"t{k}"
        if op in ("conv", "conv_relu"):
            nodes.append(
                helper.make_node("Conv", [cur, w((c, ch, 3, 3), ch * 9), w((c,), 1)], [out], pads=[1, 1, 1, 1])
            )
            ch = c
            if op == "conv_relu":
                nodes.append(helper.make_node("Relu", [out], [out + "r"]))
                out += "r"
        elif op == "residual" and ch == c:
            nodes.append(helper.make_node("Conv", [cur, w((c, c, 3, 3), c * 9)], [out + "c"], pads=[1, 1, 1, 1]))
            nodes.append(helper.make_node("Add", [out + "c", cur], [out]))
        elif op == "maxpool" and size >= 4:
            nodes.append(helper.make_node("MaxPool", [cur], [out], kernel_shape=[2, 2], strides=[2, 2]))
            size //= 2
        elif op == "avgpool" and size >= 4:
            nodes.append(helper.make_node("AveragePool", [cur], [out], kernel_shape=[2, 2], strides=[2, 2]))
            size //= 2
        elif op == "sigmoid":
            nodes.append(helper.make_node("Sigmoid", [cur], [out]))
        else:
            continue
        cur = out
    nodes.append(helper.make_node("GlobalAveragePool", [cur], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    nodes.append(helper.make_node("Gemm", ["flat", w((5, ch), ch), w((5,), 1)], ["y"], transB=1))
    for i, node in enumerate(nodes):
        node.name = f"n{i}"
    return models.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_graphs())
def test_random_graphs_quantize_close_to_fp32(model):
    x = {"x": models.structured_images(32, seed=5)}
    qmodel, _, _ = quantize(model, x, default_config())
    onnx.checker.check_model(qmodel)
    ref, out = run(model, x)[0], run(qmodel, x)[0]
    # the integer kernels compute what the Q/DQ graph says, and the result stays near FP32
    assert sqnr(run(qmodel, x, optimize=False)[0], out) > 25.0
    assert sqnr(ref, out) > 15.0
    assert audit_fusion(qmodel).float_compute_nodes == ()


def test_failure_inside_atomic_output_leaves_nothing(tmp_path):
    target = tmp_path / "out.onnx"
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), atomic_output(target, force=False) as tmp:
            tmp.write_bytes(b"partial")
            raise exc
        assert list(tmp_path.iterdir()) == []


# the CLI in a child process whose progress hook, once the first calibration batch has run, says READY on
# stdout and waits for a signal: the parent signals a calibration known to be under way, on any machine
_SIGNAL_CHILD = """
import importlib, signal, sys
cli = importlib.import_module("quantcli.cli.app")  # the module (the package exports the Typer object as app)

def _progress(quiet):
    def wrap(batches, total, desc, size):
        for i, batch in enumerate(batches):
            yield batch
            if i == 0:
                print("READY", flush=True)
                signal.pause()
    return wrap

cli._progress = _progress
sys.argv = ["quantcli", *sys.argv[1:]]
cli.main()
"""


def test_sigterm_stops_calibration_cleanly(tmp_path):
    out = tmp_path / "c.json"
    cmd = [sys.executable, "-c", _SIGNAL_CHILD, "calibrate", str(REPO / "sample_models/digits_cnn.onnx"), "--data",
           str(REPO / "calibration_data/digits_cnn_calib.npz"), "-o", str(out), "--method", "percentile",
           "--batch-size", "8"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout is not None
    ready = proc.stdout.readline()  # blocks until calibration has run its first batch (or the child ended)
    if ready.strip() != "READY":
        proc.kill()
        pytest.fail(f"the child never started calibrating: {ready!r} {proc.communicate(timeout=60)}")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_same_inputs_same_bytes_across_processes(tmp_path):
    model = REPO / "sample_models/digits_cnn.onnx"
    data = REPO / "calibration_data/digits_cnn_calib.npz"
    outputs = []
    for i, hashseed in enumerate(("1", "2")):
        calib, quant = tmp_path / f"c{i}.json", tmp_path / f"q{i}.onnx"
        for argv in (["calibrate", str(model), "--data", str(data), "-o", str(calib), "--method", "entropy"],
                     ["convert", str(model), "-c", str(calib), "-o", str(quant)]):  # fmt: skip
            proc = subprocess.run([sys.executable, "-m", "quantcli", *argv], capture_output=True, text=True,
                                  env=_env(PYTHONHASHSEED=hashseed), check=False)  # fmt: skip
            assert proc.returncode == 0, proc.stderr
        outputs.append((calib.read_bytes(), (tmp_path / f"c{i}.json.hist.npz").read_bytes(), quant.read_bytes()))
    assert outputs[0] == outputs[1]


def test_running_out_of_memory_is_one_line_and_exit_3(tmp_path, monkeypatch):
    """A MemoryError (numpy under a ulimit, e.g. the MSE observer's float64 copy of a 640x640 batch) is the
    machine's limit, not a bug: one line naming what lowers the need, exit 3, no traceback, nothing written."""
    import importlib

    from typer.testing import CliRunner

    cli = importlib.import_module("quantcli.cli.app")  # the module (the package exports the Typer object)

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(cli.api, "calibrate", exhausted)
    out = tmp_path / "c.json"
    result = CliRunner().invoke(
        cli.app,
        ["calibrate", str(REPO / "sample_models/digits_cnn.onnx"), "--data",
         str(REPO / "calibration_data/digits_cnn_calib.npz"), "-o", str(out)],
    )  # fmt: skip
    assert result.exit_code == 3, result.output
    assert "out of memory" in result.output and "--max-memory" in result.output
    assert "Traceback" not in result.output and not out.exists()
