"""Detector cause found on NudeNet (YOLOv8n) with a percentile search, as a tiny graph: the failure and the fix.

``score-top``: class logits are mostly far below 0 and rarely above it (a detection). Percentile 99.99
clips exactly those rare values, so the quantized Sigmoid can never write a confident score: NudeNet's
class scores were capped at 0.111 (its threshold is 0.25), none of FP32's boxes survived, and its pooled
SQNR still read 35.5 dB. The rule keeps the observed maximum as the top of a score's grid: the tensor a
Sigmoid alone reads, the tensors its values come from through ops that only move them, and the
Sigmoid's output. The model with the rule disabled is the failure it repairs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantcli.core.options import CalibrationMethod, QuantConfig
from quantcli.static.plan import QuantPlan
from quantcli.static.rules import RULE_NAMES
from tests.helpers import quantize, run
from tests.models import make_model

OFF = frozenset({"score-top"})
POSITIONS = 2048  # anchors per image: 8192 class scores, a detection in every second image (0.006%)
GAIN = 15.0 / 14.0  # four features at 3.5 lift a logit by 15


def detector_head(*, silu: bool = False) -> onnx.ModelProto:
    """x [N, 16, 2048] -> per-anchor class logits (1x1 Conv, class k sums features 4k..4k+3, bias -12) ->
    Reshape -> Sigmoid -> Concat -> scores.

    ``silu=True`` reads the logits by a SiLU instead (``x * Sigmoid(x)``): a feature, not a score.
    """
    inits = [
        numpy_helper.from_array(np.kron(np.eye(4), np.ones(4)).astype(np.float32)[:, :, None] * GAIN, "w"),
        numpy_helper.from_array(np.full(4, -12.0, dtype=np.float32), "b"),
        numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["logits"], name="cls_conv"),
        helper.make_node("Reshape", ["logits", "shape"], ["flat"], name="flatten"),
        helper.make_node("Sigmoid", ["flat"], ["sig"], name="score"),
    ]
    out = "sig"
    if silu:
        nodes.append(helper.make_node("Mul", ["flat", "sig"], ["silu"], name="silu"))
        out = "silu"
    # joined to a second head as YOLOv8 joins boxes and scores (a Sigmoid read by outputs alone stays float)
    nodes.append(helper.make_node("Concat", [out, out], ["scores"], name="join", axis=1))
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, POSITIONS])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 8 * POSITIONS])],
        inits,
    )


def _features(n: int, seed: int) -> np.ndarray:
    """Features N(0, 1), so logits about -12 +- 2; in every second image one anchor's features 0..3 at
    3.2-3.8 (ordinary feature values), so its class 0 logit reads +1.7 to +4.3: a detection."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16, POSITIONS)).astype(np.float32)
    for i in range(0, n, 2):
        x[i, :4, rng.integers(POSITIONS)] = rng.uniform(3.2, 3.8)
    return x


def _top(plan: QuantPlan, tensor: str) -> float:
    p = next(a.params for a in plan.activations if a.tensor == tensor)
    return float((np.iinfo(p.zero_point.dtype).max - int(p.zero_point)) * float(p.scale))


def _bottom(plan: QuantPlan, tensor: str) -> float:
    p = next(a.params for a in plan.activations if a.tensor == tensor)
    return float((np.iinfo(p.zero_point.dtype).min - int(p.zero_point)) * float(p.scale))


def _detections(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return run(model, {"x": x})[0][:, : 4 * POSITIONS] > 0.5


def test_a_score_keeps_its_observed_maximum_under_a_clipping_method() -> None:
    model, calib, held = detector_head(), _features(48, 1), _features(48, 2)
    percentile = {"method": CalibrationMethod.PERCENTILE, "percentile": 99.99}
    fp32 = _detections(model, held)
    assert fp32.sum() == len(held) // 2  # one detection in every second image
    # the failure: percentile clips the rare positive logits, so no quantized score reaches 0.5
    broken, plan_off, result = quantize(model, {"x": calib}, QuantConfig(disabled_rules=OFF), **percentile)
    r = result.ranges["logits"]
    assert r.observed_max > 2.0 and r.max < 0.0  # the method's top sits below every detection's logit
    assert not _detections(broken, held).any()
    # the fix: the logits (through the Reshape) and the Sigmoid's output end at their observed maximum
    fixed, plan, _ = quantize(model, {"x": calib}, **percentile)
    for tensor in ("logits", "sig"):
        assert abs(_top(plan, tensor) - result.ranges[tensor].observed_max) < 0.05
        decision = next(d for d in plan.range_decisions if d.tensor == tensor)
        assert decision.rule == "score-top" and "'score'" in decision.decision
    assert np.array_equal(_detections(fixed, held), fp32)
    # the bottom stays where it was (the method's, raised by sigmoid-floor): only the top moved
    assert abs(_bottom(plan, "logits") - _bottom(plan_off, "logits")) < 0.1


def test_min_max_and_a_silu_are_left_alone() -> None:
    calib = _features(48, 1)
    # min-max already ends at the observed maximum: the default plan does not change
    model = detector_head()
    _, plan, _ = quantize(model, {"x": calib})
    _, plan_off, _ = quantize(model, {"x": calib}, QuantConfig(disabled_rules=OFF))
    assert plan.activations == plan_off.activations
    assert not [d for d in plan.range_decisions if d.rule == "score-top"]
    # a SiLU's input is a feature (its Mul reads it too): its top is the method's
    _, plan, result = quantize(
        detector_head(silu=True), {"x": calib}, method=CalibrationMethod.PERCENTILE, percentile=99.99
    )
    assert _top(plan, "logits") < result.ranges["logits"].observed_max - 0.5
    assert not [d for d in plan.range_decisions if d.rule == "score-top"]


def test_the_rule_has_a_name_to_disable() -> None:
    assert "score-top" in RULE_NAMES
