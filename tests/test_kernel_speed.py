"""Speed decisions from a measurement on the host: the stem rule asks an oracle, the real one times and caches."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantcli.core.host import ConstantSpeedOracle, KernelKind, KernelShape, KernelSpeed, cpu_model
from quantcli.core.options import QuantConfig
from quantcli.passes.preprocess import preprocess
from quantcli.static.plan import SkipCode
from quantcli.static.planning import make_plan
from quantcli.stats.calibration import calibrate
from quantcli.verify import kernel_speed
from quantcli.verify.kernel_speed import MeasuredSpeedOracle, bucket, cache_key
from quantcli.verify.kernel_speed import host_oracle as real_host_oracle  # before the autouse fixture patches it
from tests.conftest import SAMPLE_MODELS
from tests.helpers import dataset
from tests.models import make_model, structured_images


@dataclass
class FakeOracle:
    """Answers every shape with one ratio and records what it was asked."""

    ratio: float
    asked: list[KernelShape] = field(default_factory=list)

    def speed(self, shape: KernelShape) -> KernelSpeed | None:
        self.asked.append(shape)
        return KernelSpeed(shape, self.ratio, "on this host")


def _stem_model(side: int | str = "H") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.normal(size=(16, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.normal(size=(8, 16, 3, 3)) * 0.2).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, side, side])
    return make_model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, side, side])], inits)


def _plan(model: onnx.ModelProto, arrays: dict[str, np.ndarray], speed: object = None):  # type: ignore[no-untyped-def]
    prepared, _ = preprocess(model)
    ranges = calibrate(prepared, dataset(model, arrays), model_sha256="test").ranges
    return make_plan(prepared, ranges, QuantConfig(), speed=speed)  # type: ignore[arg-type]


def test_stem_stays_float_when_measured_slower_and_the_reason_shows_the_ratio() -> None:
    oracle = FakeOracle(0.45)
    plan = _plan(_stem_model(16), {"x": structured_images(8, seed=1)}, oracle)
    skip = next(s for s in plan.skipped if s.node == "stem")
    assert skip.code == SkipCode.SLOW_STEM
    assert "QLinearConv measured 0.45x float on this host for 1x3x16x16 -> 3x3x16" in skip.reason
    assert "conv2" in dict(plan.quantized_nodes)
    assert oracle.asked == [KernelShape(KernelKind.STEM_CONV, (3, 16, 3, 3, 1, 16, 16))]


@pytest.mark.parametrize("ratio", [0.95, 1.6])
def test_stem_is_integer_when_not_measured_slower_than_the_margin(ratio: float) -> None:
    plan = _plan(_stem_model(16), {"x": structured_images(8, seed=1)}, FakeOracle(ratio))
    assert "stem" in dict(plan.quantized_nodes)
    assert not any(s.code == SkipCode.SLOW_STEM for s in plan.skipped)


def test_planning_never_measures_and_convert_passes_the_host_oracle(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """static/ sits above verify/: make_plan without ``speed`` takes the constants; convert (pipeline/) passes
    ``kernel_speed.host_oracle()`` in (the autouse fixture's constants, replaced here)."""
    from quantcli import api

    fast = FakeOracle(2.0)
    monkeypatch.setattr(kernel_speed, "host_oracle", lambda: fast)
    plan = _plan(_stem_model(), {"x": structured_images(8, seed=1)})
    assert not fast.asked and "stem" not in dict(plan.quantized_nodes)  # 0.45x: the constant stem rule
    model, data = tmp_path / "stem.onnx", tmp_path / "x.npz"
    onnx.save(_stem_model(), model)
    np.savez(data, x=structured_images(8, seed=1))
    result = api.convert_model(model, tmp_path / "q.onnx", data_path=data, verdict=False)
    assert fast.asked and "stem" in dict(result.plan.quantized_nodes)


def test_constant_oracle_reproduces_the_decisions_taken_before_measuring() -> None:
    """Unknown or large images: float stem (0.45x); the bundled 1-channel 16x16 digits stem: integer."""
    images = {"x": structured_images(8, seed=1)}
    plan = _plan(_stem_model(), images, ConstantSpeedOracle())
    assert "0.45x float on an AVX2 CPU" in next(s.reason for s in plan.skipped if s.node == "stem")
    model = onnx.load(SAMPLE_MODELS / "digits_cnn.onnx")
    data = np.load(Path(__file__).parent.parent / "calibration_data" / "digits_cnn_calib.npz")
    arrays = {"input": data[data.files[0]][:16]}
    plan = _plan(model, arrays, ConstantSpeedOracle())
    stem = model.graph.node[0].name
    assert model.graph.node[0].op_type == "Conv" and stem in dict(plan.quantized_nodes)


def test_stems_of_one_model_share_a_bucket() -> None:
    a = KernelShape(KernelKind.STEM_CONV, (3, 16, 3, 3, 2, 224, 224))
    b = KernelShape(KernelKind.STEM_CONV, (3, 12, 3, 3, 2, 240, 232))
    c = KernelShape(KernelKind.STEM_CONV, (3, 16, 3, 3, 2, 32, 32))
    assert cache_key(a, threads=1) == cache_key(b, threads=1) != cache_key(c, threads=1)
    assert bucket(a).dims == (3, 16, 3, 3, 2, 256, 256)
    assert cpu_model() in cache_key(a, threads=1)
    unknown = KernelShape(KernelKind.STEM_CONV, (1, 8, 3, 3, 1, 0, 0))
    assert bucket(unknown).dims[5:] == (224, 224)


def test_the_real_micro_benchmark_measures_and_caches(tmp_path: Path) -> None:
    """No timing assertion: a positive ratio, a cache entry, and a second oracle that reads it instead of timing."""
    cache = tmp_path / "kernel_speed.json"
    shape = KernelShape(KernelKind.STEM_CONV, (1, 8, 3, 3, 1, 16, 16))
    first = MeasuredSpeedOracle(cache_path=cache)
    speed = first.speed(shape)
    assert speed is not None and speed.ratio > 0 and first.measured == [bucket(shape)]
    doc = json.loads(cache.read_text())
    assert doc["schema"] == kernel_speed.SCHEMA and cache_key(shape, threads=1) in doc["entries"]
    second = MeasuredSpeedOracle(cache_path=cache)
    again = second.speed(shape)
    assert again is not None and again.ratio == pytest.approx(speed.ratio, abs=1e-4) and second.measured == []
    assert "on this host" in again.describe("QLinearConv")


def test_no_speed_cache_env_measures_without_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(kernel_speed.MODE_ENV)
    monkeypatch.setenv(kernel_speed.CACHE_ENV, "1")
    real_host_oracle.cache_clear()
    try:
        oracle = real_host_oracle()
        assert isinstance(oracle, MeasuredSpeedOracle) and oracle.cache_path is None
        monkeypatch.delenv(kernel_speed.CACHE_ENV)
        real_host_oracle.cache_clear()
        oracle = real_host_oracle()
        assert isinstance(oracle, MeasuredSpeedOracle)
        assert oracle.cache_path == tmp_path / "quantcli" / "kernel_speed.json"
        monkeypatch.setenv(kernel_speed.MODE_ENV, "constant")
        real_host_oracle.cache_clear()
        assert isinstance(real_host_oracle(), ConstantSpeedOracle)
    finally:
        real_host_oracle.cache_clear()


@pytest.mark.parametrize(
    "shape",
    [
        KernelShape(KernelKind.DEPTHWISE_CONV, (8, 8, 3, 3, 1, 16, 16)),
        KernelShape(KernelKind.MATMUL, (4, 16, 16)),
        KernelShape(KernelKind.DYNAMIC_MATMUL, (4, 16, 16)),
    ],
)
def test_each_kernel_form_runs_and_agrees_with_float(shape: KernelShape) -> None:
    """The integer form computes what the float form does (within quantization error): it is the same kernel."""
    from tests.helpers import run

    reference, candidate, feed = kernel_speed.kernel_models(shape)
    ref, cand = run(reference, feed)[0], run(candidate, feed)[0]
    assert ref.shape == cand.shape and ref.dtype == cand.dtype
    assert np.abs(ref.astype(np.float32) - cand.astype(np.float32)).mean() < 8


@pytest.mark.parametrize(
    ("shape", "kernel"),
    [
        (KernelShape(KernelKind.STEM_CONV, (3, 8, 3, 3, 2, 32, 32)), "QLinearConv"),
        (KernelShape(KernelKind.DEPTHWISE_CONV, (8, 8, 3, 3, 1, 16, 16)), "QLinearConv"),
        (KernelShape(KernelKind.MATMUL, (4, 16, 16)), "QLinearMatMul"),
        (KernelShape(KernelKind.DYNAMIC_MATMUL, (4, 16, 16)), "DynamicQuantizeMatMul"),
    ],
)
def test_the_integer_form_runs_the_integer_kernel_and_the_float_form_none(shape: KernelShape, kernel: str) -> None:
    """What is timed is what the rule decides about: the fused integer kernel against a float kernel."""
    from quantcli.verify.audit import audit_fusion

    reference, candidate, feed = kernel_speed.kernel_models(shape)
    assert audit_fusion(candidate, feed=feed).op_counts.get(kernel) == 1
    assert audit_fusion(reference, feed=feed).integer_kernel_count == 0
