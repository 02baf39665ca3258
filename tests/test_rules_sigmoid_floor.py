"""Detector cause found on ddddocr's YOLOX det (issue 15 item 4), as a tiny graph: the failure and the fix.

``sigmoid-floor``: a Conv output read only by a SiLU (``x * Sigmoid(x)``) reaches far below the
point where the quantized Sigmoid rounds to 0 (``logit(s / 2)`` = -6.23 on a [0, 1] grid); min-max
spent its grid on that dead range. The rule starts the grid there; the model with the rule disabled
is the failure it repairs.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantcli.core.options import QuantConfig, QuantDType
from quantcli.static.plan import QuantPlan
from quantcli.static.rules import RULE_NAMES
from tests.helpers import quantize, run, sqnr
from tests.models import make_model

C = 8
OFF = frozenset({"sigmoid-floor"})
FLOOR = math.log((0.5 / 255) / (1 - 0.5 / 255))  # -6.23: below it a [0, 1] uint8 Sigmoid writes 0


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def silu_model(seed: int = 0, *, gate: str = "sig", extra_reader: bool = False) -> onnx.ModelProto:
    """Conv (outputs in about [-25, 6], as before YOLOX's SiLUs) -> x * Sigmoid(x) -> Conv -> y.

    ``gate="x"`` makes the Mul a square ``x * x`` (no SiLU); ``extra_reader`` adds a Conv reading ``x``.
    """
    rng = np.random.default_rng(seed)
    inits = [
        _init("w1", rng.normal(size=(C, 3, 3, 3)) * 0.4),
        _init("b1", np.linspace(-20.0, 1.0, C)),
        _init("w2", rng.normal(size=(4, C, 1, 1)) * 0.5),
        _init("w3", rng.normal(size=(4, C, 1, 1)) * 0.5),
    ]
    nodes = [
        helper.make_node("Conv", ["img", "w1", "b1"], ["x"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["x"], ["sig"], name="sigmoid"),
        helper.make_node("Mul", ["x", gate], ["silu"], name="mul"),
        helper.make_node("Conv", ["silu", "w2"], ["y"], name="head"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16, 16])]
    if gate != "sig":  # keep the Sigmoid alive: a second output reads it through a Conv
        nodes.append(helper.make_node("Conv", ["sig", "w3"], ["z"], name="sig_head"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4, 16, 16]))
    elif extra_reader:
        nodes.append(helper.make_node("Conv", ["x", "w3"], ["z"], name="side"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4, 16, 16]))
    return make_model(
        nodes, [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3, 16, 16])], outputs, inits
    )


def _images(n: int, seed: int) -> dict[str, np.ndarray]:
    return {"img": np.random.default_rng(seed).normal(size=(n, 3, 16, 16)).astype(np.float32)}


def _grid_start(plan: QuantPlan, tensor: str) -> float:
    p = next(a.params for a in plan.activations if a.tensor == tensor)
    return float((np.iinfo(p.zero_point.dtype).min - int(p.zero_point)) * float(p.scale))


def test_silu_input_grid_starts_where_the_quantized_sigmoid_reads_zero() -> None:
    model, calib, held = silu_model(), _images(64, 1), _images(64, 2)
    qmodel, plan, result = quantize(model, calib)
    assert result.ranges["x"].min < 4 * FLOOR  # the dead range min-max would cover
    start = _grid_start(plan, "x")
    assert FLOOR - 0.2 < start <= FLOOR  # at or just below the floor: nothing below it changes
    decision = next(d for d in plan.range_decisions if d.tensor == "x")
    assert decision.rule == "sigmoid-floor" and "'sigmoid'" in decision.decision
    assert decision.observed_min == result.ranges["x"].observed_min
    # the failure: with the rule disabled the grid starts at the observed minimum, with 3x coarser steps
    qoff, off, _ = quantize(model, calib, QuantConfig(disabled_rules=OFF))
    assert _grid_start(off, "x") < 4 * FLOOR
    assert not any(d.rule for d in off.range_decisions)
    ref = run(model, held)[0]
    with_rule, without = sqnr(ref, run(qmodel, held)[0]), sqnr(ref, run(qoff, held)[0])
    assert with_rule > without + 2.0, (with_rule, without)  # 35.8 vs 32.7 dB


def test_floor_changes_nothing_below_it() -> None:
    """Inputs all below the floor: the quantized SiLU reads 0 with the rule and without it."""
    model = silu_model()
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("silu", TensorProto.FLOAT, None))
    calib = _images(64, 1)
    blank = {"img": np.zeros((2, 3, 16, 16), np.float32)}  # each channel of x is its bias
    qmodel, plan, _ = quantize(model, calib)
    assert any(d.rule == "sigmoid-floor" for d in plan.range_decisions)
    qoff, _, _ = quantize(model, calib, QuantConfig(disabled_rules=OFF))
    on, off = run(qmodel, blank)[0], run(qoff, blank)[0]
    dead = np.linspace(-20.0, 1.0, C) < FLOOR
    assert dead.any() and not dead.all()
    np.testing.assert_array_equal(on[:, dead], 0.0)
    np.testing.assert_array_equal(off[:, dead], 0.0)


def test_no_floor_when_another_op_reads_the_tensor() -> None:
    _, plan, result = quantize(silu_model(extra_reader=True), _images(64, 1))
    assert abs(_grid_start(plan, "x") - result.ranges["x"].min) < 0.2
    assert not any(d.rule for d in plan.range_decisions)


def test_no_floor_for_a_square() -> None:
    """``x * x`` next to a Sigmoid of x is no SiLU: the values below the floor still matter."""
    _, plan, result = quantize(silu_model(gate="x"), _images(64, 1))
    assert abs(_grid_start(plan, "x") - result.ranges["x"].min) < 0.2
    assert not any(d.rule for d in plan.range_decisions)


def test_symmetric_activations_decline_the_floor() -> None:
    """A Sigmoid grid centred on 0 never rounds to 0 below the floor: the rule declines, as data."""
    config = QuantConfig(symmetric_activations=True, activation_type=QuantDType.INT8)
    _, plan, _ = quantize(silu_model(), _images(64, 1), config)
    assert not any(d.rule for d in plan.range_decisions)
    declined = [d for d in plan.declined if d.rule == "sigmoid-floor"]
    assert [d.node for d in declined] == ["conv"] and "does not start at 0" in declined[0].rejection.reason


def test_rule_name_is_switchable() -> None:
    assert "sigmoid-floor" in RULE_NAMES


def test_per_layer_compares_a_floored_tensor_above_its_floor() -> None:
    """``compare --per-layer`` on the floor's tensor: below the grid's bottom both Sigmoids read 0, so the
    values there are no error. Measured on all of them, the SiLU input read as a layer that loses precision
    itself (NudeNet's first SiLU inputs: 6 dB, and the hint said to keep their Convs float)."""
    from quantcli.compare.layers import per_layer_errors
    from tests.helpers import dataset

    model, calib, held = silu_model(), _images(64, 1), _images(32, 2)
    qmodel, plan, _ = quantize(model, calib)
    bottom = _grid_start(plan, "x")
    errors = {e.tensor: e for e in per_layer_errors(model, qmodel, dataset(model, held), batch_size=8)}
    x = errors["x"]
    assert x.floor == bottom and x.observed_min < 2 * bottom  # far below the floor, as YOLO's convs
    # the failure: measured on all values, the floored tensor reads as its own loss
    exposed = onnx.ModelProto()
    exposed.CopyFrom(qmodel)
    dq = next(n.output[0] for n in exposed.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("x"))
    exposed.graph.output.append(helper.make_tensor_value_info(dq, TensorProto.FLOAT, None))
    fp32 = onnx.ModelProto()
    fp32.CopyFrom(model)
    fp32.graph.output.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, None))
    raw_x, got_x = run(fp32, held)[-1], run(exposed, held)[-1]
    assert sqnr(raw_x, got_x) < 15.0
    # the fix: above the floor the layer is fine, and the hints do not ask to keep it float
    assert x.local_sqnr_db is not None and x.local_sqnr_db > 30.0 and x.sqnr_db > 30.0
    assert "loses precision" not in x.hint and "clipped" not in x.hint
    assert sqnr(np.maximum(raw_x, bottom), np.maximum(got_x, bottom)) == pytest.approx(x.sqnr_db, abs=0.5)
