"""Graph rewriting: onnxruntime fuses what quantcli writes, outputs stay close, inputs stay untouched."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from quantcli.core.options import QuantConfig
from quantcli.passes.preprocess import preprocess
from quantcli.verify.audit import audit_fusion
from tests import models
from tests.helpers import quantize, run, sqnr


@pytest.fixture
def cnn_inputs():
    return {"x": models.structured_images(64, seed=3)}


def test_cnn_fuses_every_conv_and_keeps_one_quantize(cnn_inputs):
    qmodel, plan, _ = quantize(models.small_cnn(), cnn_inputs)
    onnx.checker.check_model(qmodel, full_check=True)
    audit = audit_fusion(qmodel)
    ops = audit.integer_op_counts()
    assert ops.get("QLinearConv") == 2
    assert ops.get("QLinearAdd") == 1
    assert ops.get("QGemm") == 1
    assert ops.get("QLinearGlobalAveragePool") == 1
    assert audit.float_compute_nodes == ()
    # the whole body runs on integers: one QuantizeLinear at the input, no DequantizeLinear left
    assert audit.quantize_nodes == 1 and audit.dequantize_nodes == 0
    assert {f.node for f in plan.folded} == {"relu1", "relu2"}


def test_cnn_outputs_close_to_fp32(cnn_inputs):
    model = models.small_cnn()
    qmodel, _, _ = quantize(model, cnn_inputs)
    ref = run(model, cnn_inputs)[0]
    out = run(qmodel, cnn_inputs)[0]
    assert sqnr(ref, out) > 30.0
    assert (ref.argmax(1) == out.argmax(1)).mean() >= 0.95


def test_fused_graph_computes_what_the_qdq_graph_says(cnn_inputs):
    """onnxruntime's integer kernels agree with the Q/DQ semantics of the written model."""
    qmodel, _, _ = quantize(models.small_cnn(), cnn_inputs, QuantConfig(reduce_range=True))
    fused = run(qmodel, cnn_inputs, optimize=True)[0]
    reference = run(qmodel, cnn_inputs, optimize=False)[0]
    assert sqnr(reference, fused) > 80.0


def test_input_model_is_never_modified(cnn_inputs):
    model = models.small_cnn()
    before = model.SerializeToString()
    prepared, _ = preprocess(model)
    assert model.SerializeToString() == before
    quantize(model, cnn_inputs)
    assert model.SerializeToString() == before
    assert prepared.SerializeToString() != before  # BN was folded in the copy


def test_rewrite_is_deterministic(cnn_inputs):
    a, _, _ = quantize(models.small_cnn(), cnn_inputs)
    b, _, _ = quantize(models.small_cnn(), cnn_inputs)
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def test_batchnorm_folding_is_exact(cnn_inputs):
    model = models.small_cnn()
    prepared, report = preprocess(model)
    assert report.folded_batchnorms == 1
    assert "BatchNormalization" not in {n.op_type for n in prepared.graph.node}
    np.testing.assert_allclose(run(prepared, cnn_inputs)[0], run(model, cnn_inputs)[0], rtol=1e-4, atol=1e-5)


def test_matmul_chain_runs_integer_kernels(rng):
    model = models.matmul_chain()
    x = {"x": rng.normal(size=(64, 4, 32)).astype(np.float32)}
    qmodel, _, _ = quantize(model, x)
    ops = audit_fusion(qmodel).integer_op_counts()
    assert ops.get("QLinearMatMul") == 1  # first MatMul feeds a quantized Add
    assert ops.get("MatMulIntegerToFloat") == 1  # last MatMul writes the float graph output
    assert sqnr(run(model, x)[0], run(qmodel, x)[0]) > 25.0


def test_matmul_of_two_activations_is_quantized(rng):
    model = models.attention_matmul()
    x = {"x": rng.normal(size=(64, 6, 16)).astype(np.float32)}
    qmodel, plan, _ = quantize(model, x)
    assert ("scores", "MatMul") in plan.quantized_nodes
    ops = audit_fusion(qmodel).integer_op_counts()
    assert ops.get("QLinearMatMul", 0) + ops.get("MatMulIntegerToFloat", 0) == 3
    assert sqnr(run(model, x)[0], run(qmodel, x)[0]) > 20.0


def test_layernorm_stays_float_with_reason(rng):
    model = models.float_only()
    x = {"x": rng.normal(size=(32, 5, 16)).astype(np.float32)}
    qmodel, plan, _ = quantize(model, x)
    skipped = {s.node: s.reason for s in plan.skipped}
    assert "LayerNormalization" in skipped["ln"]
    assert "LayerNormalization" in {n.op_type for n in qmodel.graph.node}
    assert audit_fusion(qmodel).integer_op_counts().get("MatMulIntegerToFloat") == 2


def test_excluded_node_stays_float(cnn_inputs):
    qmodel, plan, _ = quantize(models.small_cnn(), cnn_inputs, QuantConfig(exclude_nodes=("conv2",)))
    assert ("conv2", "Conv") not in plan.quantized_nodes
    assert any(s.node == "conv2" and "excluded" in s.reason for s in plan.skipped)
    float_convs = [name for name, op in audit_fusion(qmodel).float_compute_nodes]
    assert len(float_convs) == 1


def test_op_type_exclusion(cnn_inputs):
    _, plan, _ = quantize(models.small_cnn(), cnn_inputs, QuantConfig(exclude_op_types=frozenset({"Gemm"})))
    assert all(op != "Gemm" for _, op in plan.quantized_nodes)


def test_transposed_weight_is_folded_and_quantized_as_a_weight(rng):
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(rng.normal(size=(8, 16)).astype(np.float32), "w_t")
    nodes = [
        helper.make_node("Transpose", ["w_t"], ["w"], name="t", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    model = models.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [w],
    )
    prepared, report = preprocess(model)
    assert report.folded_constants == 1 and [n.op_type for n in prepared.graph.node] == ["MatMul"]
    x = {"x": rng.normal(size=(32, 16)).astype(np.float32)}
    qmodel, plan, _ = quantize(model, x)
    assert [(wq.node, wq.input_index) for wq in plan.weights] == [("mm", 1)]
    assert sqnr(run(model, x)[0], run(qmodel, x)[0]) > 25.0


def test_attention_mask_sentinel_stays_float(rng):
    """scores + (1 - mask) * -3.4e38 -> Softmax -> @ v: the mask path must not set a quantization range."""
    from onnx import TensorProto, helper, numpy_helper

    d = 16
    inits = [
        numpy_helper.from_array((rng.normal(size=(d, d)) / 4).astype(np.float32), n) for n in ("wq", "wk", "wv")
    ] + [numpy_helper.from_array(np.float32(1.0), "one"), numpy_helper.from_array(np.float32(-3.4e38), "neg")]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="v"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
        helper.make_node("Sub", ["one", "mask"], ["inv"], name="inv"),
        helper.make_node("Mul", ["inv", "neg"], ["bias"], name="bias"),
        helper.make_node("Add", ["scores", "bias"], ["masked"], name="add_mask"),
        helper.make_node("Softmax", ["masked"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["y"], name="pv"),
    ]
    model = models.make_model(
        nodes,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, d]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1, 6]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, d])],
        inits,
    )
    mask = np.ones((64, 1, 6), np.float32)
    mask[::2, 0, 4:] = 0  # padded positions
    feeds = {"x": rng.normal(size=(64, 6, d)).astype(np.float32), "mask": mask}
    # the transformer-encoder rules would keep q.kT/softmax.v float and q/k/v dynamic: off, to test the sentinel
    encoder = frozenset({"encoder-linear", "attention", "residual"})
    qmodel, plan, _ = quantize(model, feeds, QuantConfig(disabled_rules=encoder))
    flagged = {r.tensor for r in plan.range_decisions}
    assert "bias" in flagged  # the mask term; the Add reading it then stays float
    assert ("add_mask", "Add") not in plan.quantized_nodes
    assert ("scores", "MatMul") in plan.quantized_nodes  # the rest stays quantized
    ref, out = run(model, feeds)[0], run(qmodel, feeds)[0]
    handled = sqnr(ref, out)
    # the same model with the sentinel check switched off: the mask sets the range, the output is lost
    naive, _, _ = quantize(model, feeds, QuantConfig(disabled_rules=encoder | {"sentinel"}))
    lost = sqnr(ref, run(naive, feeds)[0])
    assert handled > 15.0 and lost < 5.0, (handled, lost)


def test_excluded_matmul_stays_float_after_onnxruntime_optimization():
    """Fed from a DequantizeLinear, onnxruntime would quantize a float MatMul's weight by itself."""
    model = models.sensitive_mlp()
    x = np.abs(np.random.default_rng(3).normal(size=(64, 32))).astype(np.float32)
    q, _, _ = quantize(model, {"x": x}, QuantConfig(exclude_nodes=("mm2",)))
    audit = audit_fusion(q)
    assert any(name.startswith("mm2") for name, _ in audit.float_compute_nodes)  # e.g. mm2/MatMulAddFusion
    assert audit.integer_kernel_count >= 2  # mm1 and mm3 still run as integer kernels
    # mm2's huge dead row would wipe out its other weights if it were quantized: it is not
    assert sqnr(run(model, {"x": x})[0], run(q, {"x": x})[0]) > 25
