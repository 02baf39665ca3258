"""convert --mode dynamic | weight-only | fp16: fused kernels, numerics against references, CLI."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from quantcli.api import convert_model
from quantcli.cli.app import EXIT_BAD_INPUT, app
from quantcli.core.options import QuantDType
from quantcli.modes.common import ConvertMode, WeightOnlyType
from quantcli.modes.dynamic import DynamicOptions, default_options, quantize_dynamic
from quantcli.modes.fp16 import convert_fp16
from quantcli.modes.weight_only import WeightOnlyOptions, dequantize_packed, pack_weight, quantize_weight_only
from quantcli.passes.preprocess import preprocess
from quantcli.verify.audit import audit_fusion
from tests import models
from tests.conftest import CALIBRATION_DATA, SAMPLE_MODELS
from tests.helpers import run

runner = CliRunner()
TRANSFORMER = SAMPLE_MODELS / "digits_transformer.onnx"
TRANSFORMER_EVAL = CALIBRATION_DATA / "digits_transformer_eval.npz"
U16 = 2.0**-11  # float16 unit roundoff


def _single(op: str, w: np.ndarray, in_shape: list, out_shape: list, *, bias: np.ndarray | None = None, **attrs):
    inits = [models._init("w", w)] + ([models._init("b", bias)] if bias is not None else [])
    node = helper.make_node(op, ["x", "w"] + (["b"] if bias is not None else []), ["y"], name=op.lower(), **attrs)
    return models.make_model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        inits,
    )


def _dynamic_quantize(x: np.ndarray) -> np.ndarray:
    """What DynamicQuantizeLinear followed by dequantization gives (ONNX formula, uint8)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = np.float32((hi - lo) / 255.0)
    zp = np.clip(np.rint(-lo / scale), 0, 255)
    q = np.clip(np.rint(x / scale) + zp, 0, 255)
    return ((q - zp) * scale).astype(np.float32)


def _dequantized_weight(w: np.ndarray, axis: int, opts: DynamicOptions) -> np.ndarray:
    from quantcli.modes.dynamic import _weight

    q, scale, zp = _weight(w, axis, opts)
    shape = [1] * w.ndim
    shape[axis] = -1
    s = scale.reshape(shape) if scale.ndim else scale
    return ((q.astype(np.float32) - zp.astype(np.float32)) * s).astype(np.float32)


# ---- dynamic ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opts",
    [
        default_options(),
        DynamicOptions(weight_type=QuantDType.UINT8),
        DynamicOptions(per_channel=False, reduce_range=True),
    ],
    ids=["host-default", "uint8", "per-tensor"],
)
def test_dynamic_matmul_fuses_and_computes_the_quantized_product(rng, opts):
    w = rng.normal(size=(48, 24)).astype(np.float32) * rng.uniform(0.05, 2.0, size=24).astype(np.float32)
    model = _single("MatMul", w, ["N", 5, 48], ["N", 5, 24])
    quantized, report = quantize_dynamic(model, opts)
    assert [c[1:] for c in report.converted] == [("MatMul", "MatMulInteger")]
    ops = audit_fusion(quantized).integer_op_counts()
    assert ops.get("DynamicQuantizeMatMul", 0) + ops.get("MatMulIntegerToFloat", 0) == 1, ops
    x = rng.normal(size=(3, 5, 48)).astype(np.float32)
    (y,) = run(quantized, {"x": x})
    # exactly the integer product: dequantized activation (run-time range) @ dequantized weight
    expected = _dynamic_quantize(x) @ _dequantized_weight(w, 1, opts)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # and within the rounding bound of FP32: |dy| <= sum_k |a||dw| + |w||da| + |da||dw|
    s_a = (max(x.max(), 0) - min(x.min(), 0)) / 255
    s_w = np.abs(w).max(axis=0 if opts.per_channel else None) / (63 if opts.reduce_range else 127)
    if opts.weight_type == QuantDType.UINT8:
        s_w = 2 * np.abs(w).max(axis=0 if opts.per_channel else None) / 255
    bound = np.abs(x) @ (np.ones_like(w) * s_w / 2) + (s_a / 2) * np.abs(w).sum(0) + 48 * s_a * s_w / 4
    assert np.all(np.abs(y - x @ w) <= bound * 1.001 + 1e-5)


def test_dynamic_gemm_folds_alpha_beta_and_bias_into_the_fused_kernel(rng):
    w = rng.normal(size=(10, 32)).astype(np.float32)
    b = rng.normal(size=10).astype(np.float32)
    model = _single("Gemm", w, ["N", 32], ["N", 10], bias=b, transB=1, alpha=0.5, beta=2.0)
    quantized, _report = quantize_dynamic(model, default_options())
    audit = audit_fusion(quantized)
    assert audit.integer_kernel_count == 1 and "Add" not in audit.op_counts  # bias went into the kernel
    x = rng.normal(size=(4, 32)).astype(np.float32)
    (y,) = run(quantized, {"x": x})
    expected = _dynamic_quantize(x) @ _dequantized_weight(0.5 * w.T, 1, default_options()) + 2.0 * b
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_dynamic_conv_is_opt_in_and_exact(rng):
    model = models.small_cnn()
    prepared, _ = preprocess(model)
    _default, report = quantize_dynamic(prepared, default_options())
    assert {op for _, op, _ in report.converted} == {"Gemm"}  # Conv stays float unless asked
    opts = DynamicOptions(reduce_range=True, op_types=frozenset({"Conv"}))
    quantized, report = quantize_dynamic(prepared, opts)
    assert [new for _, _, new in report.converted] == ["ConvInteger", "ConvInteger"]
    assert audit_fusion(quantized).integer_op_counts() == {"ConvInteger": 2}
    x = models.structured_images(4, seed=1)
    ref = run(prepared, {"x": x})[0]
    out = run(quantized, {"x": x})[0]
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel < 0.05, rel  # two 8-bit layers: a few percent at most


def test_dynamic_shared_weight_is_stored_once(rng):
    w = models._init("w", rng.normal(size=(16, 16)))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="a"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="b"),
    ]
    model = models.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [w],
    )
    quantized, report = quantize_dynamic(model, default_options())
    assert len(report.converted) == 2
    int8 = [t for t in quantized.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8) == 1


def test_dynamic_leaves_activation_matmuls_and_reports_them():
    _quantized, report = quantize_dynamic(models.attention_matmul(), default_options())
    assert [(s.node, s.reason) for s in report.skipped] == [("scores", "B is not a constant (activation x activation)")]
    assert {n for n, _, _ in report.converted} == {"q", "k"}


# ---- weight-only ---------------------------------------------------------------------------------


@pytest.mark.parametrize("wtype", list(WeightOnlyType))
@pytest.mark.parametrize(("k", "n", "block"), [(64, 16, 32), (80, 24, 32), (20, 8, 16), (300, 33, 128)])
def test_matmulnbits_packing_matches_onnxruntime(rng, wtype, k, n, block):
    """onnxruntime's MatMulNBits (float compute) equals x @ our numpy dequantization, also when K % block != 0."""
    w = rng.normal(size=(k, n)).astype(np.float32)
    w[:, 0] += 3.0  # an asymmetric column
    model = _single("MatMul", w, [2, 5, k], [2, 5, n])
    quantized, _report = quantize_weight_only(model, WeightOnlyOptions(weight_type=wtype, block_size=block))
    assert audit_fusion(quantized).integer_op_counts() == {"MatMulNBits": 1}
    node = next(nd for nd in quantized.graph.node if nd.op_type == "MatMulNBits")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    n_blocks = -(-k // block)
    assert (attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]) == (k, n, wtype.bits, block)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in quantized.graph.initializer}
    assert inits[node.input[1]].shape == (n, n_blocks, block * wtype.bits // 8)
    assert inits[node.input[2]].shape == (n * n_blocks,)
    if wtype.symmetric:
        assert len(node.input) == 3
    else:
        zp_len = n * (-(-n_blocks // 2)) if wtype.bits == 4 else n * n_blocks
        assert inits[node.input[3]].shape == (zp_len,)
    packed = pack_weight(w, bits=wtype.bits, block_size=block, symmetric=wtype.symmetric)
    x = rng.normal(size=(2, 5, k)).astype(np.float32)
    (y,) = run(quantized, {"x": x})
    expected = x @ dequantize_packed(packed)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_nibble_order_and_padding_by_hand():
    """K=20 in blocks of 16: codes 0..15 then 0..3 + padding; low nibble holds the even k."""
    k = 20
    codes = np.concatenate([np.arange(16), np.arange(4)]) - 8.0  # symmetric int4 codes -8..7
    w = codes.reshape(k, 1).astype(np.float32) * np.float32(0.5)
    packed = pack_weight(w, bits=4, block_size=16, symmetric=True)
    # block 0 holds -4..3.5 (scale 0.5, max |w| = 4 on the negative side); block 1 holds -4..-2.5
    assert packed.b.shape == (1, 2, 8)
    assert packed.b[0, 0, 0] == (0 | 1 << 4) and packed.b[0, 0, 7] == (14 | 15 << 4)
    assert packed.b[0, 1, 0] == (0 | 1 << 4) and packed.b[0, 1, 1] == (2 | 3 << 4)
    assert np.all(packed.b[0, 1, 2:] == (8 | 8 << 4))  # padding is code 8: exactly zero
    np.testing.assert_array_equal(packed.scales, [0.5, 0.5])
    np.testing.assert_array_equal(dequantize_packed(packed), w)


@pytest.mark.parametrize("wtype", [WeightOnlyType.INT4, WeightOnlyType.UINT4])
def test_block_scale_search_never_loses_to_the_plain_range(rng, wtype):
    w = rng.standard_t(df=3, size=(128, 16)).astype(np.float32)  # heavy tails: clipping pays
    packed = pack_weight(w, bits=4, block_size=32, symmetric=wtype.symmetric)
    err = (dequantize_packed(packed) - w).reshape(4, 32, 16)
    blocks = w.reshape(4, 32, 16)
    if wtype.symmetric:
        s = np.abs(blocks).max(1, keepdims=True) / 7
        plain = np.clip(np.rint(blocks / s), -8, 7) * s
    else:
        lo, hi = np.minimum(blocks.min(1, keepdims=True), 0), np.maximum(blocks.max(1, keepdims=True), 0)
        s = (hi - lo) / 15
        z = np.rint(-lo / s)
        plain = (np.clip(np.rint(blocks / s) + z, 0, 15) - z) * s
    chosen, baseline = np.square(err).sum(1), np.square(plain - blocks).sum(1)
    assert np.all(chosen <= baseline * (1 + 1e-6))
    # symmetric blocks gain most (the -8 code and clipping); asymmetric ranges shrink both ends together
    assert chosen.sum() < (0.95 if wtype.symmetric else 0.99) * baseline.sum()


# ---- fp16 ----------------------------------------------------------------------------------------


def _masked_attention(seed: int = 0, d: int = 16) -> onnx.ModelProto:
    """scores = x @ Wq + mask (-3.4e38 on some columns) -> Softmax -> @ Wv -> LayerNormalization."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((1, d), dtype=np.float32)
    mask[0, d // 2 :] = -3.4e38
    inits = [
        models._init("wq", rng.normal(size=(d, d)) * 0.3), models._init("wv", rng.normal(size=(d, d)) * 0.3),
        models._init("mask", mask), models._init("g", np.ones(d)), models._init("bb", np.zeros(d)),
    ]  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["s"], name="q"),
        helper.make_node("Add", ["s", "mask"], ["sm"], name="mask_add"),
        helper.make_node("Softmax", ["sm"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "wv"], ["v"], name="v"),
        helper.make_node("LayerNormalization", ["v", "g", "bb"], ["y"], name="ln", axis=-1),
    ]
    return models.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", d])],
        inits,
    )


def test_fp16_keeps_io_float32_and_the_mask_path_float32(rng):
    model = _masked_attention()
    half, report = convert_fp16(model)
    assert [i.type.tensor_type.elem_type for i in half.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in half.graph.output] == [TensorProto.FLOAT]
    assert {n for n, _, _ in report.converted} == {"q", "v"}
    assert ("mask_add", "Add") in {(s.node, s.op_type) for s in report.skipped}
    inits = {t.name: t.data_type for t in half.graph.initializer}
    assert inits["mask"] == TensorProto.FLOAT and TensorProto.FLOAT16 in inits.values()
    nodes = {n.name: n for n in half.graph.node}
    # the masked sum and the LayerNormalization read float32 tensors
    assert nodes["mask_add"].input[0] != "s" and nodes["mask_add"].input[1] == "mask"
    x = rng.normal(size=(8, 16)).astype(np.float32)
    ref, out = run(model, {"x": x})[0], run(half, {"x": x})[0]
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, atol=0.05)  # LN output ~N(0,1); fp16 weights: ~1e-3 relative


def test_fp16_matmul_within_the_rounding_bound(rng):
    w = rng.normal(size=(64, 8)).astype(np.float32)
    model = _single("MatMul", w, ["N", 64], ["N", 8])
    half, _ = convert_fp16(model)
    x = rng.normal(size=(16, 64)).astype(np.float32)
    y = run(half, {"x": x})[0]
    assert y.dtype == np.float32
    # x, w and every partial sum rounded to float16: |dy| <= (K + 2) u (|x| @ |w|)
    bound = (64 + 2) * U16 * (np.abs(x) @ np.abs(w))
    assert np.all(np.abs(y - x @ w) <= bound)


def test_fp16_small_constants_and_sensitive_ops_stay_float32():
    """x / sqrt(mean(x*x) + 1e-12): 1e-12 underflows float16 and x*x overflows it above 256: both stay float32."""
    d = 8
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["sq"], name="sq"),
        helper.make_node("ReduceMean", ["sq"], ["ms"], name="mean", axes=[-1]),
        helper.make_node("Add", ["ms", "eps"], ["mse"], name="eps_add"),
        helper.make_node("Sqrt", ["mse"], ["rms"], name="sqrt"),
        helper.make_node("Div", ["x", "rms"], ["y"], name="div"),
    ]
    model = models.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", d])],
        [models._init("eps", np.array([1e-12]))],
    )
    half, report = convert_fp16(model)
    assert {n for n, _, _ in report.converted} == {"div"}
    reasons = {s.node: s.reason for s in report.skipped}
    assert "outside float16" in reasons["eps_add"] and "squares" in reasons["sq"]
    x = np.zeros((3, d), dtype=np.float32)
    x[1], x[2] = 1e-3, 1000.0  # 1e-6 + eps and 1e6 are both outside float16
    out = run(half, {"x": x})[0]
    assert np.all(np.isfinite(out[1:])) and np.allclose(out[1:], 1.0, atol=2e-3)


# ---- bundled transformer, through the API ---------------------------------------------------------


def _top1(model_path, x: np.ndarray) -> np.ndarray:
    return run(onnx.load(str(model_path)), {"input": x})[0].argmax(1)


@pytest.mark.parametrize(
    ("mode", "kernel", "min_accuracy"),
    # measured on the 500 eval samples (FP32: 97.4%): dynamic 97.4%, weight-only int4/32 97.2%, fp16 97.4%
    [(ConvertMode.DYNAMIC, "DynamicQuantizeMatMul", 0.966), (ConvertMode.WEIGHT_ONLY, "MatMulNBits", 0.964),
     (ConvertMode.FP16, None, 0.974)],
)  # fmt: skip
def test_bundled_transformer_keeps_accuracy(tmp_path, mode, kernel, min_accuracy):
    data = np.load(TRANSFORMER_EVAL)
    x, labels = data["input"], data["labels"]
    out = tmp_path / f"t.{mode}.onnx"
    result = convert_model(TRANSFORMER, out, mode=mode)
    assert result.mode == mode and result.plan is None and result.mode_report is not None
    assert len(result.mode_report.converted) >= 20
    if kernel:
        assert result.audit.integer_op_counts().get(kernel, 0) >= 9
    ref, got = _top1(TRANSFORMER, x), _top1(out, x)
    assert (ref == labels).mean() == pytest.approx(0.974)
    assert (got == labels).mean() >= min_accuracy
    assert (got == ref).mean() >= 0.98
    assert result.output_bytes < 0.55 * result.input_bytes


# ---- CLI -----------------------------------------------------------------------------------------


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_modes_convert_and_report(tmp_path):
    out = tmp_path / "t.dyn.onnx"
    result = invoke("convert", TRANSFORMER, "-o", out, "--mode", "dynamic", "--require-fused")
    assert result.exit_code == 0, result.output
    assert "mode: dynamic" in result.output and "DynamicQuantizeMatMul" in result.output
    out = tmp_path / "t.w4.onnx"
    result = invoke("convert", TRANSFORMER, "-o", out, "--mode", "weight-only", "--block-size", "64",
                    "--weight-type", "uint4", "--exclude-nodes", "/head/*")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "MatMul -> MatMulNBits" in result.output and "block size 64" in result.output
    m = onnx.load(str(out))
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 19 and all(len(n.input) == 4 for n in nbits)  # uint4: zero points; Gemm head excluded
    assert any(n.op_type == "Gemm" for n in m.graph.node)
    out = tmp_path / "t.fp16.onnx"
    result = invoke("convert", TRANSFORMER, "-o", out, "--mode", "fp16")
    assert result.exit_code == 0, result.output
    assert "MatMul -> float16" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "dynamic", "--calibration", "c.json"], "--calibration cannot be used with --mode dynamic"),
        (["--mode", "weight-only", "--data", "d.npz"], "--data cannot be used with --mode weight-only"),
        (["--mode", "fp16", "--block-size", "32"], "--block-size cannot be used with --mode fp16"),
        (["--block-size", "32", "--data", "d.npz"], "--block-size cannot be used with --mode static"),
        (["--mode", "dynamic", "--block-size", "64"], "--block-size cannot be used with --mode dynamic"),
        (["--weight-type", "int4", "--data", "d.npz"], "--weight-type int4 needs --mode weight-only"),
        (["--mode", "weight-only", "--block-size", "48"], "--block-size 48: must be one of"),
        (["--mode", "weight-only", "--per-tensor"], "--per-tensor cannot be used with --mode weight-only"),
        (["--mode", "dynamic", "--op-types", "Add"], "--op-types Add: --mode dynamic rewrites only"),
    ],
)
def test_cli_conflicting_options_are_usage_errors(tmp_path, args, message):
    out = tmp_path / "never.onnx"
    result = invoke("convert", TRANSFORMER, "-o", out, *args)
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()
