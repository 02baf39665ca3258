"""Dynamic input dims are planned at the data's sample sizes, so host-measured rules time the real maps."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantcli.api import convert_model
from quantcli.core.host import KernelKind, KernelShape, KernelSpeed
from quantcli.core.options import AlgorithmOptions, CalibrationMethod, QuantConfig
from quantcli.graph.pinning import dynamic_input_dims, pinned_shapes
from quantcli.passes.preprocess import preprocess
from quantcli.search.accuracy_search import Candidate, SearchBase, build_candidate
from quantcli.static.planning import make_plan
from quantcli.stats.calibration import calibrate
from quantcli.verify import kernel_speed
from quantcli.verify.kernel_speed import bucket
from tests.helpers import dataset
from tests.models import make_model

C = 16
H, W = 3, 40  # a text line's feature map: a few pixels high


@dataclass
class RecordingOracle:
    """Answers every shape 1.2x (integer stays); records the depthwise islands asked."""

    asked: list[KernelShape] = field(default_factory=list)

    def speed(self, shape: KernelShape) -> KernelSpeed | None:
        if shape.kind == KernelKind.DEPTHWISE_ISLAND:
            self.asked.append(shape)
        return KernelSpeed(shape, 1.2, "on this host")


def dynamic_block() -> onnx.ModelProto:
    """1x1 Conv -> Relu -> depthwise 5x5 Conv -> Relu -> 1x1 Conv, input N x 8 x H x W (H, W symbols, N = -1)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.normal(size=(C, 8, 1, 1)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.normal(size=(C, 1, 5, 5)) * 0.3).astype(np.float32), "wd"),
        numpy_helper.from_array((rng.normal(size=(8, C, 1, 1)) * 0.3).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["p1"], name="expand"),
        helper.make_node("Relu", ["p1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "wd"], ["d"], name="depthwise", group=C, pads=[2, 2, 2, 2]),
        helper.make_node("Relu", ["d"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w2"], ["y"], name="project"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 8, "H", "W"])  # Paddle writes -1 for N
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 8, "H", "W"])
    return make_model(nodes, [x], [y], inits)


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(n, 8, H, W)).astype(np.float32)


def test_pinned_shapes_are_concrete_and_the_model_keeps_its_symbols() -> None:
    model, _ = preprocess(dynamic_block())
    before = model.SerializeToString()
    assert dynamic_input_dims(model, {"x": (1, 8, H, W)}) == {"x": {0: 1, 2: H, 3: W}}
    shapes = pinned_shapes(model, {"x": (1, 8, H, W)})
    assert shapes["x"] == (1, 8, H, W) and shapes["r1"] == (1, C, H, W) and shapes["y"] == (1, 8, H, W)
    assert model.SerializeToString() == before  # inferred on a skeleton, never on the model


def test_nothing_to_pin_gives_no_shapes() -> None:
    model = dynamic_block()
    assert pinned_shapes(model, {}) == {}
    assert pinned_shapes(model, {"x": (1, 8, H)}) == {}  # another rank: not this input's sample
    assert pinned_shapes(model, {"other": (1, 8, H, W)}) == {}


@pytest.mark.parametrize(("shapes", "sides"), [({"x": (1, 8, H, W)}, (H, W)), (None, (0, 0))])
def test_depthwise_rule_asks_the_oracle_at_the_sample_side(
    shapes: dict[str, tuple[int, ...]] | None, sides: tuple[int, int]
) -> None:
    model = dynamic_block()
    prepared, _ = preprocess(model)
    ranges = calibrate(prepared, dataset(model, {"x": _images(8)}), model_sha256="test").ranges
    oracle = RecordingOracle()
    plan = make_plan(prepared, ranges, QuantConfig(), speed=oracle, input_shapes=shapes)
    assert {s.dims for s in oracle.asked} == {(C, C, 5, 5, 1, *sides)}  # the scan and the check ask
    assert "depthwise" in dict(plan.quantized_nodes)


def test_small_sides_are_measured_as_they_are() -> None:
    """A 5x5 depthwise Conv over 3x96 (PP-OCR's classifier) is measured at 3x96 and its 88 channels."""
    shape = KernelShape(KernelKind.DEPTHWISE_ISLAND, (88, 88, 5, 5, 1, 3, 96))
    assert bucket(shape).dims == (88, 88, 5, 5, 1, 3, 96)
    assert bucket(KernelShape(KernelKind.MAX_POOL_ISLAND, (200, 200, 2, 2, 2, 2, 96))).dims[5:] == (2, 96)


@pytest.mark.parametrize("algorithms", [AlgorithmOptions(), AlgorithmOptions(cle=True, bias_correction=True)])
def test_convert_plans_at_the_data_size_and_writes_dynamic_dims(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, algorithms: AlgorithmOptions
) -> None:
    model_path, data_path, out = tmp_path / "m.onnx", tmp_path / "calib.npz", tmp_path / "q.onnx"
    onnx.save(dynamic_block(), model_path)
    np.savez(data_path, x=_images(10))
    oracle = RecordingOracle()
    monkeypatch.setattr(kernel_speed, "host_oracle", lambda: oracle)
    convert_model(model_path, out, data_path=data_path, verdict=False, algorithms=algorithms)
    assert {s.dims[5:] for s in oracle.asked} == {(H, W)}
    dims = onnx.load(out).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[2:]] == ["H", "W"]


def test_search_candidates_are_planned_at_the_base_sizes() -> None:
    model = dynamic_block()
    prepared, _ = preprocess(model)
    data = dataset(model, {"x": _images(8)})
    calibration = calibrate(prepared, data, model_sha256="test", method=CalibrationMethod.PERCENTILE)
    oracle = RecordingOracle()
    base = SearchBase(prepared, calibration, QuantConfig(), speed=oracle, input_shapes={"x": (1, 8, H, W)})
    build_candidate(base, Candidate(CalibrationMethod.MINMAX))
    assert {s.dims[5:] for s in oracle.asked} == {(H, W)}
