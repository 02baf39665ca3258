"""Calibration: results independent of batching and grouping, deterministic, dynamic shapes."""

from __future__ import annotations

import numpy as np
import pytest

from quantcli.core.options import CalibrationMethod
from quantcli.data.datasets import model_input_specs, open_dataset
from quantcli.passes.preprocess import preprocess
from quantcli.stats.artifact import write_calibration
from quantcli.stats.calibration import calibrate, plan_groups
from tests import models
from tests.helpers import dataset, quantize

METHODS = [m for m in CalibrationMethod if m != CalibrationMethod.MOVING_AVERAGE]


@pytest.fixture(scope="module")
def prepared():
    return preprocess(models.small_cnn())[0]


@pytest.fixture(scope="module")
def images():
    return {"x": models.structured_images(64, seed=11)}


def _ranges(result):
    return {k: (r.min, r.max, r.observed_min, r.observed_max) for k, r in result.ranges.items()}


def _assert_close(a, b, rel=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=rel, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_batch_size_does_not_change_ranges(prepared, images, method):
    ds = dataset(prepared, images)
    results = [_ranges(calibrate(prepared, ds, model_sha256="-", method=method, batch_size=b)) for b in (1, 8, 32)]
    # onnxruntime may pick other float kernels per batch size: equal up to float rounding
    _assert_close(results[0], results[1])
    _assert_close(results[0], results[2])


@pytest.mark.parametrize("method", [CalibrationMethod.MINMAX, CalibrationMethod.PERCENTILE])
def test_memory_budget_shrinks_the_batch_without_changing_ranges(prepared, images, method):
    ds = dataset(prepared, images)
    whole = calibrate(prepared, ds, model_sha256="-", method=method)
    # below one sample's activations (about 87 KiB): batch 1, one pass (measuring sizes held that much anyway)
    small = calibrate(prepared, ds, model_sha256="-", method=method, max_memory=16 * 1024)
    assert whole.params["passes"] == small.params["passes"] == 1
    _assert_close(_ranges(whole), _ranges(small))


def test_memory_budget_splits_moving_average_into_passes_at_its_batch(prepared, images):
    ds = dataset(prepared, images)
    method = CalibrationMethod.MOVING_AVERAGE
    whole = calibrate(prepared, ds, model_sha256="-", method=method)
    grouped = calibrate(prepared, ds, model_sha256="-", method=method, max_memory=256 * 1024)
    assert whole.params["passes"] == 1 and grouped.params["passes"] > 3
    _assert_close(_ranges(whole), _ranges(grouped))


def test_plan_groups_respects_budget():
    sizes = {"a": 400, "b": 300, "c": 500, "d": 100}
    groups = plan_groups(sizes, batch_size=2, budget=1600)  # 800 bytes per sample
    assert groups == [["a", "b"], ["c", "d"]]
    assert plan_groups(sizes, batch_size=1, budget=10) == [["a"], ["b"], ["c"], ["d"]]  # one tensor over budget


def test_same_data_same_bytes(tmp_path, prepared, images):
    ds = dataset(prepared, images)
    for i in range(2):
        result = calibrate(prepared, ds, model_sha256="-", method=CalibrationMethod.ENTROPY)
        write_calibration(result, tmp_path / f"{i}.json", model_path="m.onnx")
    assert (tmp_path / "0.json").read_bytes() == (tmp_path / "1.json").read_bytes()
    assert (tmp_path / "0.json.hist.npz").is_file()


def test_streaming_minmax_equals_numpy_on_the_input(prepared, images):
    result = calibrate(prepared, dataset(prepared, images), model_sha256="-", batch_size=7)
    x = images["x"]
    assert result.ranges["x"].observed_min == float(x.min()) and result.ranges["x"].observed_max == float(x.max())


@pytest.mark.parametrize("method", list(CalibrationMethod))
def test_dynamic_spatial_shapes_calibrate(tmp_path, method):
    model = models.small_cnn(dynamic_spatial=True)
    folder = tmp_path / "data"
    folder.mkdir()
    np.savez(folder / "a.npz", x=models.structured_images(10, seed=1, size=16))
    np.savez(folder / "b.npz", x=models.structured_images(6, seed=2, size=24))
    ds = open_dataset(folder, model_input_specs(model))
    result = calibrate(preprocess(model)[0], ds, model_sha256="-", method=method, batch_size=4)
    assert result.num_samples == 16
    assert all(np.isfinite([r.min, r.max]).all() and r.min <= r.max for r in result.ranges.values())


def test_convert_can_switch_method_from_stored_histograms(tmp_path, prepared, images):
    from quantcli.stats.artifact import read_calibration
    from quantcli.stats.calibration import rechoose

    ds = dataset(prepared, images)
    entropy = calibrate(prepared, ds, model_sha256="-", method=CalibrationMethod.ENTROPY)
    write_calibration(entropy, tmp_path / "c.json", model_path="m.onnx")
    stored = read_calibration(tmp_path / "c.json")
    direct = calibrate(prepared, ds, model_sha256="-", method=CalibrationMethod.PERCENTILE, percentile=99.9)
    switched = rechoose(stored, CalibrationMethod.PERCENTILE, percentile=99.9)
    _assert_close(_ranges(direct), _ranges(switched))
    minmax = calibrate(prepared, ds, model_sha256="-")
    with pytest.raises(Exception, match="without its histograms"):
        rechoose(minmax, CalibrationMethod.MSE)


def test_available_memory_respects_the_address_space_limit():
    """Under ``ulimit -v`` (or a cgroup limit) the default memory budget must shrink with it."""
    import subprocess
    import sys

    code = (
        "import resource; from quantcli.graph.model_io import available_memory; "
        "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, resource.RLIM_INFINITY)); "
        "print(available_memory())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 0 < int(out.stdout.strip()) < 3 << 30


def test_out_of_memory_on_a_batch_is_not_called_bad_data(monkeypatch):
    """An allocation failure says so and names the options that help (not 'bad data')."""
    import onnxruntime as ort

    from quantcli.core.errors import CalibrationDataError, QuantCliError

    model = models.small_cnn()
    x = models.structured_images(8, seed=1)
    real_run = ort.InferenceSession.run
    calls = {"n": 0}

    def failing_run(self, outputs, feed, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:  # the probe on one sample passes, the first full batch fails
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : bfc_arena.cc:359 AllocateRawInternal")
        return real_run(self, outputs, feed, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", failing_run)
    with pytest.raises(QuantCliError, match="ran out of memory") as info:
        quantize(model, {"x": x})
    assert not isinstance(info.value, CalibrationDataError)
    assert "--max-memory" in str(info.value)


@pytest.mark.parametrize("method", [CalibrationMethod.MINMAX, CalibrationMethod.PERCENTILE])
def test_permutation_outputs_share_their_source_observation(monkeypatch, method):
    """On the bundled transformer, observing each Reshape/Transpose source once gives exactly the
    ranges and histograms that observing every tensor gives, with fewer tensors fetched."""
    import onnx

    from quantcli.stats import calibration
    from tests.conftest import CALIBRATION_DATA, SAMPLE_MODELS

    model = preprocess(onnx.load(str(SAMPLE_MODELS / "digits_transformer.onnx")))[0]
    ds = open_dataset(CALIBRATION_DATA / "digits_transformer_calib.npz", model_input_specs(model), max_samples=48)
    shared = calibrate(model, ds, model_sha256="-", method=method, batch_size=16)
    aliases = calibration.permutation_aliases(model.graph, set(shared.ranges))
    assert len(aliases) >= 10  # the attention's Reshape/Transpose outputs
    assert {model.graph.node[i].op_type for i, n in enumerate(model.graph.node) if n.output[0] in aliases} <= (
        calibration.PERMUTATION_OPS
    )
    monkeypatch.setattr(calibration, "permutation_aliases", lambda graph, tracked: {})
    every = calibrate(model, ds, model_sha256="-", method=method, batch_size=16)
    assert shared.ranges == every.ranges
    assert shared.histograms.keys() == every.histograms.keys()
    for name, hist in every.histograms.items():
        assert np.array_equal(hist.counts, shared.histograms[name].counts), name


def test_histogram_ranges_are_chosen_for_the_activation_type(prepared, images):
    """Entropy clips recorded for 256 levels are re-chosen for 16-bit types from the kept histograms;
    8-bit types get the recorded ranges untouched, and methods that do not depend on levels too."""
    from quantcli.core.options import QuantDType
    from quantcli.stats.calibration import activation_levels, ranges_for_levels
    from quantcli.stats.observers import choose_range

    assert [activation_levels(t) for t in (QuantDType.UINT8, QuantDType.INT8, QuantDType.INT16)] == [256, 256, 65536]
    ds = dataset(prepared, images)
    entropy = calibrate(prepared, ds, model_sha256="-", method=CalibrationMethod.ENTROPY)
    assert ranges_for_levels(entropy, 256) is entropy.ranges
    wide = ranges_for_levels(entropy, 65536)
    assert wide.keys() == entropy.ranges.keys()
    widened = 0
    for name, r8 in entropy.ranges.items():
        r16 = wide[name]
        assert (r16.observed_min, r16.observed_max) == (r8.observed_min, r8.observed_max)
        lo, hi = choose_range(entropy.histograms[name], "entropy", levels=65536)
        assert (r16.min, r16.max) == (max(lo, r8.observed_min), min(hi, r8.observed_max))
        assert r16.min <= r8.min and r16.max >= r8.max, name  # more levels: never a tighter clip here
        widened += (r16.min, r16.max) != (r8.min, r8.max)
    assert widened > 0
    percentile = calibrate(prepared, ds, model_sha256="-", method=CalibrationMethod.PERCENTILE)
    assert ranges_for_levels(percentile, 65536) is percentile.ranges


def test_library_code_leaves_malloc_alone_until_the_cli_tunes_it():
    """Calibrating through the library does not tune glibc malloc; ``tune_malloc`` (the CLI's start-up
    call) does, once, and enables the periodic trim the collector asks for."""
    import subprocess
    import sys

    code = (
        "from quantcli.core import process; from quantcli.passes.preprocess import preprocess; "
        "from quantcli.stats.calibration import calibrate; from tests import models; "
        "from tests.helpers import dataset; "
        "m = preprocess(models.small_cnn())[0]; "
        "calibrate(m, dataset(m, {'x': models.structured_images(4, seed=1)}), model_sha256='-'); "
        "before = process._State.tuned; tuned = process.tune_malloc(); "
        "print(before, tuned == (process._State.trim is not None), process.tune_malloc() == tuned)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "True"]


def test_search_candidates_use_ranges_chosen_for_their_activation_type(prepared, images):
    """A 16-bit search builds every candidate (the calibration's own method and the ones re-chosen from
    its histograms) on clips chosen for 65,536 levels, as convert without a search does; 8-bit on 256."""
    from quantcli.core.options import QuantConfig, QuantDType
    from quantcli.graph.model_io import upgrade_opset
    from quantcli.search.accuracy_search import Candidate, SearchBase, build_candidate
    from quantcli.static.lowering import apply_plan
    from quantcli.static.planning import make_plan
    from quantcli.stats.calibration import ranges_for_levels, rechoose

    prepared = upgrade_opset(prepared, 21)  # 16-bit QuantizeLinear
    entropy = calibrate(prepared, dataset(prepared, images), model_sha256="-", method=CalibrationMethod.ENTROPY)
    minmax = rechoose(entropy, CalibrationMethod.MINMAX)
    mse8 = rechoose(minmax, CalibrationMethod.MSE)
    mse16 = rechoose(minmax, CalibrationMethod.MSE, levels=65536)
    assert mse16.params["levels"] == 65536 and mse16.ranges != mse8.ranges
    assert ranges_for_levels(mse8, 65536) == mse16.ranges
    for dtype, levels in ((QuantDType.UINT16, 65536), (QuantDType.UINT8, 256)):
        config = QuantConfig(activation_type=dtype, reduce_range=False)
        base = SearchBase(prepared, entropy, config)
        for method, expected in (
            (CalibrationMethod.ENTROPY, ranges_for_levels(entropy, levels)),
            (CalibrationMethod.MSE, mse16.ranges if levels == 65536 else mse8.ranges),
        ):
            model, _, _ = build_candidate(base, Candidate(method))
            wanted = apply_plan(prepared, make_plan(prepared, expected, config))
            assert model.SerializeToString() == wanted.SerializeToString(), (dtype, method)


def test_sixteen_bit_ranges_without_histograms_warn(prepared, images, caplog):
    """Entropy ranges recorded for 256 levels and no histograms (a calibration file without its
    sidecar) cannot be re-chosen for a 16-bit type: they are used as they are, with a warning."""
    import dataclasses
    import logging

    from quantcli.stats.calibration import ranges_for_levels

    entropy = calibrate(prepared, dataset(prepared, images), model_sha256="-", method=CalibrationMethod.ENTROPY)
    bare = dataclasses.replace(entropy, histograms={})
    with caplog.at_level(logging.WARNING, logger="quantcli.stats.calibration"):
        assert ranges_for_levels(bare, 256) is bare.ranges
        assert not caplog.records
        assert ranges_for_levels(bare, 65536) is bare.ranges
    assert len(caplog.records) == 1 and "65536 levels" in caplog.records[0].getMessage()


def _fixed_batch_model():
    """y = Relu(x @ W) with x fixed at [1, 8]: a model run one small sample at a time (as Silero VAD)."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    return models.make_model(nodes, [x], [y], [w])


def test_a_model_run_a_small_sample_at_a_time_is_calibrated_on_one_thread(monkeypatch):
    """Its probe is built on one onnxruntime thread and serves the pass (no second session); threads
    asked for are kept, and the ranges do not depend on it."""
    from quantcli.stats import collector
    from quantcli.stats.calibration import CalibrationOptions, expose

    model = _fixed_batch_model()
    ds = dataset(model, {"x": np.random.default_rng(1).standard_normal((20, 8)).astype(np.float32)})
    probe = expose(model, ds, CalibrationOptions()).probe
    assert probe.get_session_options().intra_op_num_threads == 1
    asked = expose(model, ds, CalibrationOptions(threads=2)).probe
    assert asked.get_session_options().intra_op_num_threads == 2
    built = []
    real = collector.make_session
    monkeypatch.setattr(collector, "make_session", lambda *a, **k: built.append(k) or real(*a, **k))
    one = calibrate(model, ds, model_sha256="0", method=CalibrationMethod.PERCENTILE)
    assert built == []  # the probe ran the pass
    two = calibrate(model, ds, model_sha256="0", method=CalibrationMethod.PERCENTILE, threads=2)
    assert built == []
    assert one.ranges == two.ranges
    assert all(np.array_equal(one.histograms[n].counts, two.histograms[n].counts) for n in one.histograms)


def test_a_range_is_chosen_once_per_observed_tensor_not_per_alias(monkeypatch):
    """Reshape/Transpose outputs share their source's observers, so its clip range too: the entropy
    search runs once per observed tensor (the ranges are those of observing every tensor, above)."""
    import onnx

    from quantcli.stats import calibration
    from tests.conftest import CALIBRATION_DATA, SAMPLE_MODELS

    model = preprocess(onnx.load(str(SAMPLE_MODELS / "digits_transformer.onnx")))[0]
    ds = open_dataset(CALIBRATION_DATA / "digits_transformer_calib.npz", model_input_specs(model), max_samples=16)
    calls = []
    real = calibration.choose_range
    monkeypatch.setattr(calibration, "choose_range", lambda hist, *a, **k: calls.append(hist) or real(hist, *a, **k))
    result = calibrate(model, ds, model_sha256="-", method=CalibrationMethod.ENTROPY, batch_size=16)
    aliases = calibration.permutation_aliases(model.graph, set(result.ranges))
    assert aliases and len(calls) == len(result.histograms) - len(aliases)
    for alias, root in aliases.items():
        assert result.ranges[alias] == result.ranges[root]
