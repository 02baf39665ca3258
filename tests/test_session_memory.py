"""Model copies calibration does not make: the checker reads the file, sessions expose outputs without a copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantcli.api import calibrate_model
from quantcli.graph.editor import ModelEditor
from quantcli.graph.model_io import (
    external_base,
    holds_spillable_weights,
    left_in_file,
    load_model,
    save_model,
    upgrade_opset,
)
from quantcli.graph.session import augmented, make_session
from quantcli.passes.preprocess import preprocess
from quantcli.stats.calibration import calibrate
from tests import models
from tests.helpers import dataset

REPO = Path(__file__).resolve().parent.parent


def _matmul_chain(layers: int, width: int, *, batch: int | str = 1, opset: int = 17) -> onnx.ModelProto:
    """``layers`` MatMuls by ``width`` x ``width`` float weights (random, so nothing folds)."""
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array(rng.standard_normal((width, width), dtype=np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        x = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, width])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [batch, width])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_session_outputs_match_an_augmented_copy_and_leave_the_model_alone() -> None:
    model = _matmul_chain(3, 8)
    before = model.SerializeToString()
    feed = {"x": np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8)}
    wanted = ["h0", "h2", "h1", "h0", "x"]  # a repeat, a graph output (h2) and the graph input
    session = make_session(model, outputs=wanted)
    assert model.SerializeToString() == before
    assert [o.name for o in session.get_outputs()] == ["h2", "h0", "h1", "x"]
    reference = make_session(augmented(model, wanted))
    names = ["h0", "h1", "h2", "x"]
    for got, expected in zip(session.run(names, feed), reference.run(names, feed), strict=True):
        np.testing.assert_array_equal(got, expected)
    assert [o.name for o in make_session(model).get_outputs()] == ["h2"]  # no outputs asked: the model's


def test_load_model_checks_the_file_not_a_serialized_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "chain.onnx"
    onnx.save(_matmul_chain(2, 8), path)
    given: list[object] = []
    check = onnx.checker.check_model

    def spy(model: object, *args: object, **kwargs: object) -> None:
        given.append(model)
        check(model, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx.checker, "check_model", spy)
    load_model(path)
    assert given and all(isinstance(g, str) for g in given)  # a proto would be serialized: 3 copies at once


def test_calibration_makes_no_augmented_copy_of_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    prepared = preprocess(models.small_cnn())[0]
    ds = dataset(prepared, {"x": models.structured_images(8, seed=3)})
    expected = calibrate(prepared, ds, model_sha256="0" * 64)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("calibration copied the model (ModelEditor) to expose its activations")

    monkeypatch.setattr(ModelEditor, "__init__", refuse)
    assert calibrate(prepared, ds, model_sha256="0" * 64).ranges == expected.ranges


#: a child's start: RSS after its imports, and the peak counter restarted from there (``rss_kb("VmHWM") - start``)
_PEAK_FROM_HERE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from quantcli.core.process import tune_malloc

    def rss_kb(key):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))

    tune_malloc()  # as `quantcli calibrate` does
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # the peak (VmHWM) restarts from the current RSS
    """
)
_CHILD = (
    textwrap.dedent(
        """
    from quantcli.graph.model_io import load_model
    from quantcli.graph.session import make_session
    """
    )
    + _PEAK_FROM_HERE
    + textwrap.dedent(
        """
    start = rss_kb("VmRSS")
    model = load_model(Path(sys.argv[1]))
    session = make_session(model, outputs=[n.output[0] for n in model.graph.node])
    print((rss_kb("VmHWM") - start) * 1024)
    """
    )
)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_loading_and_exposing_peak_at_a_few_copies_of_the_weights(tmp_path: Path) -> None:
    """Load, check and a session exposing every activation, in a fresh process: peak RSS in weight bytes.

    48 MiB of weights: 3.3x with the file-based checker and the session read from a file; 5.6x when the
    checker got the proto (serialized: 3 copies at once) and the session an augmented copy's bytes.
    """
    path = tmp_path / "chain.onnx"
    model = _matmul_chain(12, 1024)
    weights = sum(t.ByteSize() for t in model.graph.initializer)
    onnx.save(model, path)
    del model
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, env=env, check=True
    )
    peak = int(child.stdout.split()[-1])
    assert peak < 4.5 * weights, f"peak {peak / weights:.1f}x the weights"


def _opset12_model() -> onnx.ModelProto:
    """Opset 12: Unsqueeze/Squeeze axes as attributes (inputs from 13), a large weight and a small one."""
    rng = np.random.default_rng(1)
    weight = numpy_helper.from_array(rng.standard_normal((128, 256), dtype=np.float32), "w")  # 128 KiB
    bias = numpy_helper.from_array(rng.standard_normal(256, dtype=np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["a"]),
        helper.make_node("Unsqueeze", ["a"], ["u"], axes=[0]),
        helper.make_node("Squeeze", ["u"], ["y"], axes=[0]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 256])],
        [weight, bias],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])


def test_opset_upgrade_converts_the_graph_without_its_large_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx.version_converter

    model = _opset12_model()
    before = model.SerializeToString()
    expected = onnx.version_converter.convert_version(model, 13).SerializeToString()
    sizes: list[int] = []
    convert = onnx.version_converter.convert_version

    def spy(given: onnx.ModelProto, version: int) -> onnx.ModelProto:
        sizes.append(given.ByteSize())
        return convert(given, version)

    monkeypatch.setattr(onnx.version_converter, "convert_version", spy)
    upgraded = upgrade_opset(model, 13)
    assert upgraded.SerializeToString() == expected  # the same model as converting it whole
    assert model.SerializeToString() == before
    assert sizes and max(sizes) < 128 * 256 * 4  # the 128 KiB weight never went through the converter


def test_preprocess_in_place_cleans_the_model_itself_as_it_would_clean_a_copy() -> None:
    model = models.small_cnn()  # a BatchNormalization to fold
    before = model.SerializeToString()
    expected, report = preprocess(model)
    assert model.SerializeToString() == before and report.folded_batchnorms
    cleaned, again = preprocess(model, in_place=True)
    assert cleaned is model
    assert cleaned.SerializeToString() == expected.SerializeToString() and again == report


def test_calibrate_hands_the_sessions_weights_waiting_in_a_file_it_removes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import quantcli.api

    path, data = tmp_path / "chain.onnx", tmp_path / "data.npz"
    onnx.save(_matmul_chain(2, 512, batch="N"), path)  # 1 MiB weights: spilled
    np.savez(data, x=np.random.default_rng(2).standard_normal((8, 512), dtype=np.float32))
    given: list[onnx.ModelProto] = []
    real = quantcli.api.calibrate_prepared

    def spy(prepared: onnx.ModelProto, *args: Any, **kwargs: Any) -> Any:
        given.append(prepared)
        return real(prepared, *args, **kwargs)

    monkeypatch.setattr(quantcli.api, "calibrate_prepared", spy)
    result = calibrate_model(path, data)
    (prepared,) = given
    folder = external_base(prepared)
    assert folder is not None and not folder.exists()  # the weights were in a file, gone afterwards
    assert all(left_in_file(t) for t in prepared.graph.initializer)
    unspilled = preprocess(load_model(path))[0]
    expected = real(unspilled, dataset(unspilled, dict(np.load(data))), model_sha256=result.model_sha256)
    assert result.ranges == expected.ranges


def test_only_weights_held_in_memory_are_worth_spilling(tmp_path: Path) -> None:
    assert holds_spillable_weights(_matmul_chain(1, 512))
    assert not holds_spillable_weights(_matmul_chain(3, 256))  # each under 1 MiB
    save_model(_matmul_chain(1, 512), tmp_path / "ext.onnx", external_data=True)
    assert not holds_spillable_weights(load_model(tmp_path / "ext.onnx", weights=False))  # already in a file


_CALIBRATE_CHILD = (
    textwrap.dedent(
        """
    from quantcli.api import calibrate_model
    """
    )
    + _PEAK_FROM_HERE
    + textwrap.dedent(
        """
    start = rss_kb("VmRSS")
    calibrate_model(Path(sys.argv[1]), Path(sys.argv[2]), upgrade_opset=True)
    print((rss_kb("VmHWM") - start) * 1024)
    """
    )
)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_calibrating_an_old_opset_model_peaks_near_two_copies_of_its_weights(tmp_path: Path) -> None:
    """``calibrate_model`` on an opset-12 model (upgraded in memory) in a fresh process: peak RSS in weight bytes.

    48 MiB of weights: 2.2x (reading the file is 2x: its bytes and the model parsed). 3.2x when
    preprocess copied the upgraded model while the one read was alive; 4.1x when, besides, quantcli
    held the weights while onnxruntime built its session from them (not spilled to a file).
    """
    path, data = tmp_path / "chain.onnx", tmp_path / "data.npz"
    model = _matmul_chain(12, 1024, batch="N", opset=12)
    weights = sum(t.ByteSize() for t in model.graph.initializer)
    onnx.save(model, path)
    del model
    np.savez(data, x=np.random.default_rng(3).standard_normal((16, 1024), dtype=np.float32))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.run(
        [sys.executable, "-c", _CALIBRATE_CHILD, str(path), str(data)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=REPO,
    )
    peak = int(child.stdout.split()[-1])
    assert peak < 2.6 * weights, f"peak {peak / weights:.1f}x the weights"


def test_sessions_share_one_directory_and_leave_no_file_in_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Removing a directory per session cost a quarter of a small model's session (see ``_session_folder``)."""
    import tempfile

    from quantcli.graph import session

    made: list[str] = []
    mkdtemp = tempfile.mkdtemp

    def spy(*args: Any, **kwargs: Any) -> str:
        made.append(mkdtemp(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    monkeypatch.setattr(session._SessionFolder, "path", None)
    model = _matmul_chain(2, 8)
    feed = {"x": np.ones((1, 8), dtype=np.float32)}
    for outputs in ([], ["h0"], ["h0"]):
        assert make_session(model, outputs=outputs).run(None, feed)[0].shape == (1, 8)
    assert len(made) == 1 and [p.name for p in Path(made[0]).iterdir()] == ["owner.lock"]  # its scratch lock
    shutil.rmtree(made[0])  # removed behind its back (a temporary-file cleaner): made again
    make_session(model)
    assert len(made) == 2 and [p.name for p in Path(made[1]).iterdir()] == ["owner.lock"]


def test_sessions_stop_spinning_when_a_run_returns() -> None:
    """quantcli runs two sessions in turn (timed or scored): an idle one's spinning workers took the CPUs
    of the other (FP32 median 7.65 vs 3.12 ms at 2 threads, see ``make_session``), so every session's
    workers stop spinning when its run returns; ``spin=False`` still turns spinning off inside runs too."""
    model = _matmul_chain(2, 8)
    spinning = make_session(model, threads=2).get_session_options()
    assert spinning.get_session_config_entry("session.force_spinning_stop") == "1"
    with pytest.raises(RuntimeError, match="allow_spinning"):  # not set: onnxruntime's default, spinning
        spinning.get_session_config_entry("session.intra_op.allow_spinning")
    sleeping = make_session(model, threads=2, spin=False).get_session_options()
    assert sleeping.get_session_config_entry("session.force_spinning_stop") == "1"
    assert sleeping.get_session_config_entry("session.intra_op.allow_spinning") == "0"
