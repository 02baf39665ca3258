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


def _audio_stem_model() -> onnx.ModelProto:
    """Raw samples ``[N, 1024]`` -> Pad -> Unsqueeze -> Conv1d (1 -> 1 channel, 64 taps, stride 2) -> Conv1d.

    The Conv1d form PyTorch exports (Silero VAD v6's STFT; tf2onnx writes Basic Pitch's low-pass with Reshapes).
    """
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array([0, 32, 0, 32], np.int64), "pads"),
        numpy_helper.from_array(np.array([1], np.int64), "axis"),
        numpy_helper.from_array((np.hanning(64) / 32).reshape(1, 1, 64).astype(np.float32), "w_lp"),
        numpy_helper.from_array((rng.normal(size=(8, 1, 5)) * 0.3).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["padded"], name="pad"),
        helper.make_node("Unsqueeze", ["padded", "axis"], ["x3"], name="unsqueeze"),
        helper.make_node("Conv", ["x3", "w_lp"], ["lp"], name="lowpass", strides=[2]),
        helper.make_node("Conv", ["lp", "w2"], ["y"], name="conv2", pads=[2, 2]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1024])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 513])
    return make_model(nodes, [x], [y], inits)


def test_audio_stem_behind_pad_and_unsqueeze_is_measured_as_a_conv1d() -> None:
    """A Conv1d over one channel that reads the model input through Pad/Unsqueeze is a stem: the oracle is
    asked for its height-1 kernel, and it stays float when measured slower (Basic Pitch's low-pass 0.30x)."""
    samples = np.sin(np.arange(8 * 1024).reshape(8, 1024) * 0.05).astype(np.float32)
    oracle = FakeOracle(0.3)
    plan = _plan(_audio_stem_model(), {"x": samples}, oracle)
    skip = next(s for s in plan.skipped if s.node == "lowpass")
    assert skip.code == SkipCode.SLOW_STEM
    assert "a 64 Conv over 1 input channel(s) reading the model input" in skip.reason
    # height 1, 64 taps, width stride 2; the padded length is unknown to shape inference here (0: measured at 224)
    assert oracle.asked == [KernelShape(KernelKind.STEM_CONV, (1, 1, 1, 64, 1, 1, 0), 2)]
    assert "conv2" in dict(plan.quantized_nodes)  # reads the low-pass output, not the model input
    assert "lowpass" in dict(_plan(_audio_stem_model(), {"x": samples}, FakeOracle(1.6)).quantized_nodes)


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


def test_shapes_are_measured_as_they_are() -> None:
    """Exact channels, strides and sides (a power-of-two bucket measured 1.03x where 88 channels run 0.76x);
    an unknown side at 224, MatMul rows rounded up to a power of two."""
    a = KernelShape(KernelKind.STEM_CONV, (3, 16, 3, 3, 2, 224, 224))
    b = KernelShape(KernelKind.STEM_CONV, (3, 12, 3, 3, 2, 240, 232))
    assert bucket(a) == a and bucket(b) == b and cache_key(a, threads=1) != cache_key(b, threads=1)
    assert cpu_model() in cache_key(a, threads=1)
    dw = KernelShape(KernelKind.DEPTHWISE_ISLAND, (88, 88, 5, 5, 1, 3, 96))
    assert bucket(dw) == dw
    unknown = KernelShape(KernelKind.STEM_CONV, (1, 8, 3, 3, 1, 0, 0))
    assert bucket(unknown).dims[5:] == (224, 224)
    assert bucket(KernelShape(KernelKind.MATMUL, (77, 384, 1536))).dims == (128, 384, 1536)


def test_a_width_stride_of_its_own_is_measured_and_keyed() -> None:
    """PP-OCR's depthwise strides (2, 1): timed as (2, 2) the island ran 0.98x, as (2, 1) 0.84x."""
    tall = KernelShape(KernelKind.DEPTHWISE_ISLAND, (104, 104, 5, 5, 2, 3, 96), 1)
    square = KernelShape(KernelKind.DEPTHWISE_ISLAND, (104, 104, 5, 5, 2, 3, 96))
    assert tall.strides == (2, 1) and square.strides == (2, 2) and square.stride_w == 0
    assert KernelShape(KernelKind.DEPTHWISE_ISLAND, (104, 104, 5, 5, 2, 3, 96), 2) == square
    assert cache_key(tall, threads=1) != cache_key(square, threads=1)
    assert tall.describe() == "1x104x3x96 -> 5x5x104/2x1" and square.describe().endswith("/2")
    reference, candidate, feed = kernel_speed.kernel_models(tall)
    for model in (reference, candidate):
        attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in model.graph.node]
        assert [a["strides"] for a in attrs if a.get("group", 1) > 1] == [[2, 1]]
    from tests.helpers import run

    assert run(reference, feed)[0].shape == run(candidate, feed)[0].shape == (1, 104, 2, 96)


def test_each_round_times_sessions_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """One pair of sessions keeps its speed (0.975-1.010x across pairs, within 0.009 inside one): rounds on
    one pair would agree on a figure another pair contradicts, so each round builds its own."""
    built: list[str] = []
    real = kernel_speed.make_session

    def counting(model: onnx.ModelProto, *, threads: int, source: str):  # type: ignore[no-untyped-def]
        built.append(source)
        return real(model, threads=threads, source=source)

    monkeypatch.setattr(kernel_speed, "make_session", counting)
    rounds = kernel_speed.measure_rounds(KernelShape(KernelKind.MATMUL, (4, 16, 16)), rounds=3, budget_s=0.01)
    assert len(rounds) == 3 and all(r > 0 for r in rounds)
    assert built == ["float kernel", "integer kernel"] * 3


def _scripted(monkeypatch: pytest.MonkeyPatch, figures: list[float]) -> list[int]:
    """Make ``measure_rounds`` hand out ``figures`` in order; returns the list of round counts asked for."""
    asked: list[int] = []

    def fake(shape: KernelShape, *, threads: int = 1, rounds: int = 3, budget_s: float = 0.12) -> list[float]:
        asked.append(rounds)
        return [figures.pop(0) for _ in range(rounds)]

    monkeypatch.setattr(kernel_speed, "measure_rounds", fake)
    return asked


def test_an_outlier_round_is_outvoted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Rounds whose middle half spans 1.0 get more rounds; the cache keeps them all, the reason shows the spread."""
    asked = _scripted(monkeypatch, [0.8, 1.2, 0.85, 0.8, 0.82])
    cache = tmp_path / "kernel_speed.json"
    shape = KernelShape(KernelKind.DEPTHWISE_ISLAND, (40, 40, 5, 5, 1, 3, 96))
    speed = MeasuredSpeedOracle(cache_path=cache).speed(shape)
    assert asked == [kernel_speed.FIRST_ROUNDS, 2]  # 0.8, 1.2, 0.85: the middle half spans 1.0
    assert speed is not None and speed.ratio == pytest.approx(0.82) and speed.spread == (0.8, 0.85)
    assert speed.slower(0.0) and not speed.slower(0.2)
    assert "0.82x (0.80-0.85) float on this host" in speed.describe("QLinearConv")
    entry = json.loads(cache.read_text())["entries"][cache_key(shape, threads=1)]
    assert entry["rounds"] == [0.8, 1.2, 0.85, 0.8, 0.82] and entry["ratio"] == pytest.approx(0.82)


def test_rounds_that_keep_disagreeing_stop_at_max_rounds_and_decide_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    asked = _scripted(monkeypatch, [0.9, 1.1, 1.05, 0.95, 0.9, 1.1, 1.05, 0.95, 1.0])
    speed = MeasuredSpeedOracle(cache_path=tmp_path / "k.json").speed(
        KernelShape(KernelKind.DEPTHWISE_ISLAND, (40, 40, 5, 5, 1, 3, 96))
    )
    assert sum(asked) == kernel_speed.MAX_ROUNDS and asked[0] == kernel_speed.FIRST_ROUNDS
    assert speed is not None and not speed.slower(0.0)  # not sure: the rule keeps its integer default


def test_rounds_that_agree_are_not_measured_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    asked = _scripted(monkeypatch, [0.8, 0.82, 0.79])
    speed = MeasuredSpeedOracle(cache_path=tmp_path / "k.json").speed(
        KernelShape(KernelKind.DEPTHWISE_ISLAND, (40, 40, 5, 5, 1, 3, 96))
    )
    assert asked == [kernel_speed.FIRST_ROUNDS] and speed is not None and speed.slower(0.0)


def test_an_uncertain_cached_figure_is_measured_again_by_the_next_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A figure taken under load (rounds on both sides of 1.0) is not kept as it is: a later oracle adds rounds."""
    cache = tmp_path / "kernel_speed.json"
    shape = KernelShape(KernelKind.DEPTHWISE_ISLAND, (40, 40, 5, 5, 1, 3, 96))
    monkeypatch.setattr(kernel_speed, "MAX_ROUNDS", 3)
    _scripted(monkeypatch, [1.3, 0.7, 0.75])
    first = MeasuredSpeedOracle(cache_path=cache).speed(shape)
    assert first is not None and first.spread is not None and first.spread[0] < 1.0 < first.spread[1]
    monkeypatch.setattr(kernel_speed, "MAX_ROUNDS", 9)
    asked = _scripted(monkeypatch, [0.72, 0.74])
    second = MeasuredSpeedOracle(cache_path=cache)
    again = second.speed(shape)
    assert asked == [2] and second.measured == [shape]
    assert again is not None and again.ratio == pytest.approx(0.74) and again.slower(0.0)
    third = MeasuredSpeedOracle(cache_path=cache)
    assert third.speed(shape) == again and third.measured == []  # settled: read, not measured


def test_the_real_micro_benchmark_measures_and_caches(tmp_path: Path) -> None:
    """No timing assertion: a positive ratio, a cache entry, and a second oracle that reads it instead of timing."""
    cache = tmp_path / "kernel_speed.json"
    shape = KernelShape(KernelKind.STEM_CONV, (1, 8, 3, 3, 1, 16, 16))
    first = MeasuredSpeedOracle(cache_path=cache)
    speed = first.speed(shape)
    assert speed is not None and speed.ratio > 0 and first.measured == [bucket(shape)]
    assert speed.spread is not None and speed.spread[0] <= speed.ratio <= speed.spread[1]
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
