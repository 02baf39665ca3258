"""Transformer-encoder rules (``rules/residual.py``, ``rules/encoder.py``) on a tiny encoder block.

The block is BERT's: LayerNorm -> q/k/v (+ bias) -> softmax(q.kT * s) . v -> output projection
(+ bias) -> residual Add -> LayerNorm -> up projection -> Relu -> down projection (+ bias) ->
residual Add -> LayerNorm. Its down projection writes one outlier channel into the residual
stream (a weight column scaled 60x), as the down projections of real encoders do. Without the
rules (today's plan: ``disabled_rules``) every Add is a QLinearAdd over the outlier-stretched range;
with them the residual and bias Adds stay float and the two linear layers that read unnormalized
tensors take run-time activation ranges.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
from onnx import TensorProto, helper

from quantcli.core.host import default_config
from quantcli.core.options import QuantConfig
from quantcli.graph.index import GraphIndex
from quantcli.modes.dynamic import lower_dynamic_nodes
from quantcli.passes.preprocess import preprocess
from quantcli.static.lowering import apply_plan
from quantcli.static.plan import QuantPlan, SkipCode
from quantcli.static.planning import make_plan
from quantcli.static.rules.encoder import attention_context_matmuls, attention_score_matmuls, self_attention
from quantcli.stats.calibration import calibrate
from quantcli.verify.audit import audit_fusion
from tests import helpers, models

D, T = 32, 8
# the host's own choices, as convert makes them: 7-bit weights without VNNI, where u8*s8 kernels saturate
HOST = default_config()
TODAY = replace(HOST, disabled_rules=frozenset({"residual", "encoder-linear", "attention"}))


def _mm(a: str, b: str, out: str) -> onnx.NodeProto:
    return helper.make_node("MatMul", [a, b], [out], name=out)


def _add(a: str, b: str, out: str) -> onnx.NodeProto:
    return helper.make_node("Add", [a, b], [out], name=out)


def _ln(x: str, out: str) -> onnx.NodeProto:
    return helper.make_node("LayerNormalization", [x, "g", "z"], [out], name=out, axis=-1)


def encoder_block(*, outlier: float = 60.0, attention: bool = True) -> onnx.ModelProto:
    """One encoder layer; ``attention=False`` puts a Sigmoid where the Softmax is (no self-attention)."""
    rng = np.random.default_rng(0)

    def w(rows: int, cols: int) -> np.ndarray:
        return rng.normal(size=(rows, cols)) / np.sqrt(rows)

    inits = {f"w{n}": w(D, D) for n in "qkvo"} | {f"b{n}": rng.normal(size=D) * 0.1 for n in "qkvo"}
    w2 = w(4 * D, D)
    w2[:, 0] *= outlier
    inits |= {"w1": w(D, 4 * D), "b1": rng.normal(size=4 * D) * 0.1, "w2": w2, "b2": rng.normal(size=D) * 0.1}
    inits |= {"g": np.ones(D), "z": np.zeros(D), "scale": np.array(1 / np.sqrt(D))}
    nodes = [_ln("x", "ln0")]
    for n in "qkv":
        nodes += [_mm("ln0", f"w{n}", f"{n}_mm"), _add(f"{n}_mm", f"b{n}", n)]
    probs = helper.make_node("Softmax", ["scaled"], ["p"], name="p", axis=-1)
    nodes += [
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        _mm("q", "kt", "scores"),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"], name="scaled"),
        probs if attention else helper.make_node("Sigmoid", ["scaled"], ["p"], name="p"),
        _mm("p", "v", "ctx"),
        _mm("ctx", "wo", "o_mm"),
        _add("o_mm", "bo", "o"),
        _add("x", "o", "r1"),
        _ln("r1", "ln1"),
        _mm("ln1", "w1", "up_mm"),
        _add("up_mm", "b1", "up"),
        helper.make_node("Relu", ["up"], ["act"], name="act"),
        _mm("act", "w2", "down_mm"),
        _add("down_mm", "b2", "down"),
        _add("r1", "down", "r2"),
        _ln("r2", "y"),
    ]
    return models.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", T, D])],
        [models._init(k, v) for k, v in inits.items()],
    )


def _data(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(size=(32, T, D)).astype(np.float32)}


def _convert(model: onnx.ModelProto, config: QuantConfig) -> tuple[onnx.ModelProto, QuantPlan]:
    prepared, _ = preprocess(model)
    ranges = calibrate(prepared, helpers.dataset(model, _data(0)), model_sha256="t").ranges
    plan = make_plan(prepared, ranges, config)
    return apply_plan(prepared, plan, dynamic=lower_dynamic_nodes), plan


def _sqnr(model: onnx.ModelProto, quantized: onnx.ModelProto) -> float:
    held_out = _data(1)  # not the calibration samples
    return helpers.sqnr(helpers.run(model, held_out)[0], helpers.run(quantized, held_out)[0])


def test_todays_plan_loses_the_outlier_encoder_and_the_rules_repair_it() -> None:
    model = encoder_block()
    before, _ = _convert(model, TODAY)
    after, plan = _convert(model, HOST)
    residual_only, _ = _convert(model, replace(HOST, disabled_rules=frozenset({"encoder-linear", "attention"})))
    # measured: VNNI (8-bit weights) 16.1 -> 19.7 -> 28.9 dB; AVX2 without VNNI (7-bit) 13.2 -> 14.7 -> 27.9 dB
    assert _sqnr(model, before) < 20
    assert _sqnr(model, residual_only) > _sqnr(model, before) + 1  # each rule helps on its own
    assert _sqnr(model, after) > 25
    assert plan.dynamic_nodes == ("down_mm", "k_mm", "o_mm", "q_mm", "up_mm", "v_mm")


def test_the_plan_names_each_decision() -> None:
    _, plan = _convert(encoder_block(), HOST)
    skips = {s.node: s for s in plan.skipped}
    for add in ("r1", "r2"):
        assert skips[add].code == SkipCode.RESIDUAL_STREAM
        assert skips[add].reason == "transformer encoder: residual-stream Add read by a LayerNorm (outlier channels)"
        assert skips[add].detail == "read by LayerNormalization"
    for bias in ("q", "k", "v", "o", "up", "down"):
        assert skips[bias].code == SkipCode.LINEAR_BIAS_FLOAT and skips[bias].detail == f"bias of '{bias}_mm'"
    assert skips["down_mm"].code == SkipCode.RUNTIME_ACTIVATION
    assert "outlier channels" in skips["down_mm"].reason and "attention at 'ctx'" in skips["down_mm"].reason
    assert skips["scores"].code == skips["ctx"].code == SkipCode.ATTENTION_FLOAT
    assert skips["scores"].reason == skips["ctx"].reason  # one sentence per code: reports group by it
    assert skips["scores"].detail == "attention scores (q.kT) before a Softmax"
    assert "softmax.v" in skips["ctx"].detail


def test_no_self_attention_no_change() -> None:
    model = encoder_block(attention=False)
    q_today, plan_today = _convert(model, TODAY)
    q_now, plan_now = _convert(model, HOST)
    assert plan_now.dynamic_nodes == ()
    codes = {SkipCode.RESIDUAL_STREAM, SkipCode.LINEAR_BIAS_FLOAT, SkipCode.ATTENTION_FLOAT}
    assert not any(s.code in codes for s in plan_now.skipped)
    assert q_now.SerializeToString() == q_today.SerializeToString()
    assert plan_now.quantized_nodes == plan_today.quantized_nodes


def test_the_repaired_block_still_runs_integer_kernels() -> None:
    quantized, _ = _convert(encoder_block(), HOST)
    fused = audit_fusion(quantized, feed={"x": _data(2)["x"][:1]})
    kernels = {k for _, k in fused.integer_nodes}
    assert kernels & {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
    # every linear layer runs integer MACs; only the two attention products stay float, as planned
    assert {name.split("/")[0] for name, _ in fused.float_compute_nodes} == {"scores", "ctx"}
    share = fused.integer_mac_share()
    assert share is not None and share > 0.8


def test_attention_is_found_through_an_upgraded_softmax() -> None:
    """onnx's version converter wraps an opset < 13 Softmax in Flatten/Reshape: still self-attention."""
    rng = np.random.default_rng(0)
    nodes = [
        _mm("x", "wq", "q"),
        _mm("x", "wk", "k"),
        _mm("x", "wv", "v"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        _mm("q", "kt", "scores"),
        helper.make_node("Flatten", ["scores"], ["flat"], name="flat", axis=2),
        helper.make_node("Softmax", ["flat"], ["p2"], name="p2", axis=1),
        helper.make_node("Reshape", ["p2", "shape"], ["p"], name="p"),
        _mm("p", "v", "ctx"),
    ]
    inits = [models._init(f"w{n}", rng.normal(size=(D, D))) for n in "qkv"]
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [-1, T, T])
    model = models.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, D])],
        [helper.make_tensor_value_info("ctx", TensorProto.FLOAT, ["N", T, D])],
        [*inits, shape],
    )
    index = GraphIndex.build(model.graph)
    assert attention_score_matmuls(index) == {"scores"}
    assert attention_context_matmuls(index) == {"ctx"}
    assert self_attention(index) == {"scores", "ctx"}
