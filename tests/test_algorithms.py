"""Accuracy algorithms: each one on a case made for it, FP32 equivalence, determinism and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from quantcli import api
from quantcli.cli.app import EXIT_BAD_INPUT, app
from quantcli.core.options import AlgorithmOptions, QuantConfig, QuantDType, WeightClipping
from quantcli.core.qmath import dequantize, quantize_weight
from quantcli.passes.equalization import equalize
from quantcli.passes.preprocess import preprocess
from quantcli.passes.smoothquant import smooth, smoothquant_targets
from quantcli.static.bias_correction import bias_correction_targets, correct_biases
from quantcli.static.lowering import apply_plan
from quantcli.static.planning import make_plan
from quantcli.stats.calibration import calibrate
from quantcli.stats.channel_stats import collect_channel_stats
from tests import helpers, models
from tests.conftest import CALIBRATION_DATA, SAMPLE_MODELS

runner = CliRunner()
CONFIG = QuantConfig(reduce_range=False)


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _quantized_output(model: onnx.ModelProto, calib: dict, test: dict, config: QuantConfig = CONFIG) -> np.ndarray:
    qmodel, _, _ = helpers.quantize(model, calib, config)
    return helpers.run(qmodel, test)[0]


def _assert_fp32_unchanged(before: onnx.ModelProto, after: onnx.ModelProto, feed: dict) -> None:
    ref = helpers.run(before, feed)[0]
    out = helpers.run(after, feed)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


# ---- cross-layer equalization -------------------------------------------------------------------


def conv_relu_conv(seed: int = 0, *, act: str = "Relu", depthwise: bool = False) -> onnx.ModelProto:
    """conv1's output channels span 100x in range; conv2's input channels compensate (FP32 balanced)."""
    rng = np.random.default_rng(seed)
    c = 8
    m = np.where(np.arange(c) % 2 == 0, 0.05, 5.0)
    w1 = rng.normal(size=(c, 3, 3, 3)) * m[:, None, None, None]
    b1 = rng.normal(size=c) * m * 0.1
    if depthwise:
        w2 = rng.normal(size=(c, 1, 3, 3)) / m[:, None, None, None]
    else:
        w2 = rng.normal(size=(4, c, 3, 3)) / m[None, :, None, None]
    inits = [_init("w1", w1), _init("b1", b1), _init("w2", w2), _init("b2", rng.normal(size=w2.shape[0]) * 0.1)]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1])]
    if act == "Clip":
        inits += [_init("lo", np.array(0.0)), _init("hi", np.array(6.0))]
        nodes.append(helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"], name="act"))
    else:
        nodes.append(helper.make_node(act, ["c1"], ["a1"], name="act"))
    extra = {"group": c} if depthwise else {}
    nodes.append(helper.make_node("Conv", ["a1", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1], **extra))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", None, None, None])
    return models.make_model(nodes, [x], [y], inits)


@pytest.mark.parametrize("depthwise", [False, True])
def test_cle_raises_sqnr_and_keeps_fp32(depthwise):
    model = conv_relu_conv(depthwise=depthwise)
    calib = {"x": models.structured_images(64, seed=1)}
    test = {"x": models.structured_images(32, seed=2)}
    equalized, report = equalize(model)
    assert report.pairs == 1 and report.skipped_bounded == 0
    _assert_fp32_unchanged(model, equalized, test)
    ref = helpers.run(model, test)[0]
    before = helpers.sqnr(ref, _quantized_output(model, calib, test))
    after = helpers.sqnr(ref, _quantized_output(equalized, calib, test))
    assert after > before + 6.0, (before, after)
    w1 = numpy_helper.to_array(next(t for t in equalized.graph.initializer if t.name == "w1"))
    ranges = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
    assert ranges.max() / ranges.min() < 10  # was 100x before


def test_cle_skips_bounded_activation_and_passes_leaky_relu():
    _, report = equalize(conv_relu_conv(act="Clip"))
    assert report.pairs == 0 and report.skipped_bounded == 1
    model = conv_relu_conv(act="LeakyRelu")
    equalized, report = equalize(model)
    assert report.pairs == 1
    _assert_fp32_unchanged(model, equalized, {"x": models.structured_images(8, seed=3)})


def test_cle_keeps_the_bundled_cnn_fp32_output():
    prepared, _ = preprocess(onnx.load(SAMPLE_MODELS / "digits_cnn.onnx"))
    equalized, report = equalize(prepared)
    assert report.pairs >= 1
    feed = {"input": np.load(CALIBRATION_DATA / "digits_cnn_eval.npz")["input"][:64]}
    _assert_fp32_unchanged(prepared, equalized, feed)


# ---- SmoothQuant --------------------------------------------------------------------------------


def layernorm_matmul(seed: int = 0, *, with_layernorm: bool = True) -> onnx.ModelProto:
    """Channel 3 of the MatMul input is an outlier (50x the others), as in transformer activations."""
    rng = np.random.default_rng(seed)
    k, n = 32, 16
    gamma = np.ones(k)
    gamma[3] = 50.0
    inits = [_init("w", rng.normal(size=(k, n)) * 0.2), _init("bias", rng.normal(size=n) * 0.1)]
    nodes = []
    src = "x"
    if with_layernorm:
        inits += [_init("gamma", gamma), _init("beta", rng.normal(size=k) * 0.1)]
        nodes.append(helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1))
        src = "ln"
    nodes += [
        helper.make_node("MatMul", [src, "w"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "bias"], ["y"], name="add"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 10, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10, 16])
    return models.make_model(nodes, [x], [y], inits)


def _tokens(n: int, seed: int, *, outlier: bool = False) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, 10, 32)).astype(np.float32)
    if outlier:
        x[..., 3] *= 50.0
    return x


def _smoothed(model: onnx.ModelProto, calib: dict, alpha: float = 0.5):
    prepared, _ = preprocess(model)
    stats = collect_channel_stats(prepared, helpers.dataset(model, calib), smoothquant_targets(prepared))
    return smooth(prepared, stats, alpha=alpha)


def test_smoothquant_folds_into_layernorm_raises_sqnr_and_keeps_fp32():
    model = layernorm_matmul()
    calib, test = {"x": _tokens(64, 1)}, {"x": _tokens(32, 2)}
    smoothed, report = _smoothed(model, calib)
    assert report.folded == {"LayerNormalization": 1} and report.inserted_muls == 0 and report.smoothed_nodes == 1
    assert len(smoothed.graph.node) == len(model.graph.node)  # nothing inserted: same speed
    _assert_fp32_unchanged(model, smoothed, test)
    ref = helpers.run(model, test)[0]
    before = helpers.sqnr(ref, _quantized_output(model, calib, test))
    after = helpers.sqnr(ref, _quantized_output(smoothed, calib, test))
    assert after > before + 3.0, (before, after)


def test_smoothquant_inserts_a_reported_mul_without_a_fold_target():
    model = layernorm_matmul(with_layernorm=False)
    calib, test = {"x": _tokens(64, 1, outlier=True)}, {"x": _tokens(32, 2, outlier=True)}
    smoothed, report = _smoothed(model, calib)
    assert report.inserted_muls == 1 and report.folded == {}
    assert [n.op_type for n in smoothed.graph.node] == ["Mul", "MatMul", "Add"]
    _assert_fp32_unchanged(model, smoothed, test)
    ref = helpers.run(model, test)[0]
    assert helpers.sqnr(ref, _quantized_output(smoothed, calib, test)) > helpers.sqnr(
        ref, _quantized_output(model, calib, test)
    )


def test_smoothquant_folds_into_a_layernorm_written_as_primitive_ops():
    """(x * (sigmoid(mean(x)) * gamma)) + beta -> MatMul: 1/s folds into gamma and beta, nothing inserted."""
    rng = np.random.default_rng(0)
    gamma = np.ones((1, 32))
    gamma[0, 3] = 50.0
    inits = [_init("gamma", gamma), _init("beta", rng.normal(size=(1, 32)) * 0.1)]
    inits += [_init("w", rng.normal(size=(32, 16)) * 0.2)]
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], name="mean", axes=[-1], keepdims=1),
        helper.make_node("Sigmoid", ["m"], ["r"], name="sig"),
        helper.make_node("Mul", ["r", "gamma"], ["f"], name="scale"),
        helper.make_node("Mul", ["x", "f"], ["xf"], name="apply"),
        helper.make_node("Add", ["xf", "beta"], ["ln"], name="shift"),
        helper.make_node("MatMul", ["ln", "w"], ["y"], name="mm"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 10, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10, 16])
    model = models.make_model(nodes, [x], [y], inits)
    smoothed, report = _smoothed(model, {"x": _tokens(32, 1)})
    assert report.folded == {"Mul": 1} and report.inserted_muls == 0
    _assert_fp32_unchanged(model, smoothed, {"x": _tokens(8, 2)})


def test_smoothquant_keeps_the_bundled_transformer_fp32_output():
    model = onnx.load(SAMPLE_MODELS / "digits_transformer.onnx")
    data = np.load(CALIBRATION_DATA / "digits_transformer_calib.npz")["input"][:64]
    smoothed, report = _smoothed(model, {"input": data})
    assert report.folded.get("LayerNormalization", 0) >= 3
    feed = {"input": np.load(CALIBRATION_DATA / "digits_transformer_eval.npz")["input"][:64]}
    _assert_fp32_unchanged(preprocess(model)[0], smoothed, feed)


# ---- bias correction ----------------------------------------------------------------------------


def shifted_conv(seed: int = 0, *, bias: bool = True) -> onnx.ModelProto:
    """1x1 conv on inputs with a large positive mean: weight rounding errors add up to a mean shift."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(16, 32, 1, 1)) * 0.3
    inits = [_init("w", w)] + ([_init("b", rng.normal(size=16) * 0.1)] if bias else [])
    node = helper.make_node("Conv", ["x", "w", "b"] if bias else ["x", "w"], ["y"], name="conv")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", None, None, None])
    return models.make_model([node], [x], [y], inits)


def _shifted_inputs(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (4.0 + rng.uniform(0.0, 1.0, size=(n, 32, 8, 8))).astype(np.float32)


@pytest.mark.parametrize("bias", [True, False])
def test_bias_correction_shrinks_the_mean_output_error(bias):
    model = shifted_conv(bias=bias)
    calib, test = {"x": _shifted_inputs(64, 1)}, {"x": _shifted_inputs(32, 2)}
    config = QuantConfig(reduce_range=True)  # 7-bit weights: a larger, clearer shift
    prepared, _ = preprocess(model)
    result = calibrate(prepared, helpers.dataset(model, calib), model_sha256="test")
    plan = make_plan(prepared, result.ranges, config)
    stats = collect_channel_stats(prepared, helpers.dataset(model, calib), bias_correction_targets(prepared, plan))
    corrected, report = correct_biases(prepared, plan, stats)
    assert report.corrected == {"Conv": 1} and report.created == (0 if bias else 1)
    ref = helpers.run(model, test)[0]
    plain = helpers.run(apply_plan(prepared, plan), test)[0]
    fixed = helpers.run(apply_plan(corrected, make_plan(corrected, result.ranges, config)), test)[0]
    mean_error_before = np.abs((plain - ref).mean(axis=(0, 2, 3))).mean()
    mean_error_after = np.abs((fixed - ref).mean(axis=(0, 2, 3))).mean()
    assert mean_error_after < 0.5 * mean_error_before, (mean_error_before, mean_error_after)


# ---- weight clipping ----------------------------------------------------------------------------


def test_mse_weight_clipping_lowers_weight_error_on_heavy_tails():
    # Student-t (df=3) channels of 1024 weights, 7-bit as on AVX2 hosts without VNNI; at 8 bits the
    # MSE-optimal clip of such channels is close to abs-max and the gain is ~1% (measured)
    w = np.random.default_rng(0).standard_t(df=3, size=(16, 1024)).astype(np.float32)
    errors = {}
    for clip in (False, True):
        q = quantize_weight(w, QuantDType.INT8, axis=0, mse_clip=clip, reduce_range=True)
        errors[clip] = ((dequantize(q.values, q.params) - w) ** 2).mean(axis=1)
    assert np.all(errors[True] <= errors[False] * (1 + 1e-6))
    assert errors[True].mean() < 0.97 * errors[False].mean()


def test_mse_weight_clipping_keeps_absmax_on_uniform_weights():
    w = np.random.default_rng(0).uniform(-1, 1, size=(4, 512)).astype(np.float32)
    plain = quantize_weight(w, QuantDType.INT8, axis=0)
    clipped = quantize_weight(w, QuantDType.INT8, axis=0, mse_clip=True)
    np.testing.assert_allclose(clipped.params.scale, plain.params.scale, rtol=0.05)


# ---- API, determinism, CLI ----------------------------------------------------------------------

ALL = AlgorithmOptions(cle=True, smoothquant=0.5, bias_correction=True)


def test_convert_with_all_algorithms_is_deterministic(tmp_path, cnn_path, cnn_data):
    config = QuantConfig(weight_clipping=WeightClipping.MSE)
    paths = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    results = [api.convert_model(cnn_path, p, data_path=cnn_data, config=config, algorithms=ALL) for p in paths]
    assert paths[0].read_bytes() == paths[1].read_bytes()
    kinds = {type(r).__name__ for r in results[0].algorithms}
    assert kinds == {"EqualizationReport", "SmoothQuantReport", "BiasCorrectionReport"}


def test_graph_changing_algorithms_refuse_a_calibration_file(tmp_path, cnn_path, cnn_data):
    calib = tmp_path / "c.json"
    assert runner.invoke(app, ["calibrate", str(cnn_path), "-d", str(cnn_data), "-o", str(calib)]).exit_code == 0
    result = runner.invoke(app, ["convert", str(cnn_path), "-c", str(calib), "-o", str(tmp_path / "q.onnx"), "--cle"])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "--cle changes the FP32 graph" in result.output and "--data" in result.output
    result = runner.invoke(
        app, ["convert", str(cnn_path), "-c", str(calib), "-o", str(tmp_path / "q.onnx"), "--bias-correction"]
    )
    assert result.exit_code == EXIT_BAD_INPUT and "per-channel input means" in result.output
    # weight clipping needs no data: a calibration file is enough
    result = runner.invoke(
        app, ["convert", str(cnn_path), "-c", str(calib), "-o", str(tmp_path / "q.onnx"), "--weight-clipping", "mse"]
    )
    assert result.exit_code == 0, result.output
    assert "weight clipping" in result.output


def test_cli_convert_reports_each_algorithm(tmp_path, cnn_path, cnn_data):
    out = tmp_path / "q.onnx"
    args = ["convert", str(cnn_path), "-d", str(cnn_data), "-o", str(out), "--cle", "--smoothquant"]
    args += ["--smoothquant-alpha", "0.6", "--bias-correction", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "CLE: 0 conv pairs equalized" in result.output  # small_cnn's Relu output also feeds a residual Add
    assert "SmoothQuant (alpha 0.6): 1 MatMul/Gemm smoothed on 1 inputs" in result.output
    assert "a float Mul by 1/s was inserted" in result.output  # the Gemm reads Flatten(GlobalAveragePool)
    assert "bias correction: 3 biases corrected (Conv 2, Gemm 1)" in result.output
    assert out.exists()


def test_algorithms_leave_the_input_model_untouched(tmp_path):
    model = conv_relu_conv()
    before = model.SerializeToString()
    equalize(model)
    assert model.SerializeToString() == before
    path = tmp_path / "m.onnx"
    path.write_bytes(before)
    data = tmp_path / "d.npz"
    np.savez(data, x=models.structured_images(16, seed=0))
    api.convert_model(path, tmp_path / "q.onnx", data_path=data, algorithms=ALL)
    assert Path(path).read_bytes() == before


# ---- one data pass for every algorithm ------------------------------------------------------------


def _folding_chain(seed: int = 0, d: int = 16) -> onnx.ModelProto:
    """x @ W0 + b -> @ W1: SmoothQuant folds 1/s into b and W0's columns (two tensors divided)."""
    rng = np.random.default_rng(seed)
    scale = np.where(np.arange(d) % 4 == 0, 20.0, 1.0)  # outlier channels in the smoothed input
    w0 = rng.normal(size=(d, d)) * scale[None, :]
    inits = [_init("w0", w0), _init("b", rng.normal(size=d) * scale), _init("w1", rng.normal(size=(d, 4)))]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["m0"], name="mm0"),
        helper.make_node("Add", ["m0", "b"], ["h"], name="bias"),
        helper.make_node("MatMul", ["h", "w1"], ["y"], name="mm1"),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("build", [_folding_chain, models.matmul_chain])
def test_statistics_from_one_pass_equal_those_of_the_smoothed_model(build):
    """Ranges and layer input means derived from the equalized model's per-channel statistics equal
    (up to float rounding) a calibration and a channel pass run on the smoothed model itself."""
    from quantcli.passes.algorithms import transform_and_observe
    from quantcli.static.bias_correction import bias_correction_candidates
    from quantcli.stats.calibration import CalibrationOptions

    prepared = preprocess(build())[0]
    x = np.random.default_rng(3).normal(size=(40, 3, 16) if build is _folding_chain else (40, 4, 32))
    ds = helpers.dataset(prepared, {"x": x.astype(np.float32)})
    algorithms = AlgorithmOptions(smoothquant=0.5, bias_correction=True)
    done = transform_and_observe(prepared, ds, algorithms, CalibrationOptions(batch_size=16), model_sha256="-")
    assert done.passes == 1 and done.reports[0].smoothed_nodes == 2
    direct = calibrate(done.model, ds, model_sha256="-", batch_size=16)
    assert done.calibration.ranges.keys() == direct.ranges.keys()
    for name, r in direct.ranges.items():
        got = done.calibration.ranges[name]
        np.testing.assert_allclose([got.min, got.max], [r.min, r.max], rtol=1e-5, atol=1e-6, err_msg=name)
    means = collect_channel_stats(done.model, ds, bias_correction_candidates(done.model))
    assert done.input_stats.keys() == means.keys()
    for name, st in means.items():
        np.testing.assert_allclose(done.input_stats[name].mean, st.mean, rtol=1e-5, atol=1e-6, err_msg=name)


def test_convert_with_every_algorithm_reads_the_data_once(tmp_path, monkeypatch):
    """convert --cle --smoothquant --bias-correction --data D: one full pass over D (three before the
    collector: SmoothQuant statistics, calibration, bias-correction means), one session streaming it."""
    import onnxruntime as ort

    from quantcli.data.datasets import Dataset

    counts = {"passes": 0, "streaming_sessions": set()}
    real_batches, real_run = Dataset.batches, ort.InferenceSession.run

    def batches(self, size, **kwargs):
        seen = 0
        for feed in real_batches(self, size, **kwargs):
            seen += self.batch_length(feed)
            yield feed
        counts["passes"] += seen == self.num_samples and size > 1

    def run(self, outputs, feed, *args, **kwargs):
        if next(iter(feed.values())).shape[0] > 1:
            counts["streaming_sessions"].add(id(self))
        return real_run(self, outputs, feed, *args, **kwargs)

    monkeypatch.setattr(Dataset, "batches", batches)
    monkeypatch.setattr(ort.InferenceSession, "run", run)
    model, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    model.write_bytes(models.small_cnn().SerializeToString())
    np.savez(data, x=models.structured_images(48, seed=7))
    args = ["convert", str(model), "-o", str(tmp_path / "q.onnx"), "--data", str(data), "-q"]
    result = runner.invoke(app, [*args, "--cle", "--smoothquant", "--bias-correction"])
    assert result.exit_code == 0, result.output
    assert counts["passes"] == 1
    assert len(counts["streaming_sessions"]) == 1


def test_histogram_methods_observe_only_the_divided_tensors_again():
    """Per-channel statistics give no histogram of x / s: with percentile, the tensors SmoothQuant
    divided are observed in a second pass over the smoothed model (and only they)."""
    from quantcli.core.options import CalibrationMethod
    from quantcli.passes.algorithms import transform_and_observe
    from quantcli.stats.calibration import CalibrationOptions

    prepared = preprocess(_folding_chain())[0]
    ds = helpers.dataset(prepared, {"x": np.random.default_rng(3).normal(size=(40, 3, 16)).astype(np.float32)})
    options = CalibrationOptions(method=CalibrationMethod.PERCENTILE, batch_size=16)
    done = transform_and_observe(prepared, ds, AlgorithmOptions(smoothquant=0.5), options, model_sha256="-")
    assert done.passes == 2
    direct = calibrate(done.model, ds, options, model_sha256="-")
    assert done.calibration.ranges.keys() == direct.ranges.keys()
    for name in ("m0", "h"):  # the divided tensors: observed on the smoothed model itself
        assert done.calibration.ranges[name] == direct.ranges[name]
        assert np.array_equal(done.calibration.histograms[name].counts, direct.histograms[name].counts)
