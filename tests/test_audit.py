"""The fusion audit: per-node verdicts and reasons, MAC counts, and ``quantcli inspect``."""

from __future__ import annotations

import platform

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper
from typer.testing import CliRunner

from quantcli.cli.app import EXIT_BAD_INPUT, app
from quantcli.core.options import QuantConfig
from quantcli.static.plan import SkipCode
from quantcli.verify.audit import audit_fusion
from quantcli.verify.macs import compute_macs
from tests import models
from tests.conftest import CALIBRATION_DATA, SAMPLE_MODELS
from tests.helpers import quantize

runner = CliRunner()
_NP = {T.UINT8: np.uint8, T.INT8: np.int8, T.UINT16: np.uint16}


def qdq_unit(
    op: str = "Conv",
    *,
    act: int = T.UINT8,
    w_shape: tuple[int, ...] = (8, 4, 3, 3),
    x_shape: tuple[int, ...] = (1, 4, 8, 8),
    output_q: bool = True,
    float_reader: bool = False,
    relu_zero_point: int | None = None,
    shared_input: bool = False,
    attrs: dict | None = None,
) -> onnx.ModelProto:
    """x -> Q -> DQ -> op(DQ(int8 W), DQ(int32 b)) [-> Relu] [-> Q -> DQ] [+ a float Sigmoid reader]."""
    rng = np.random.default_rng(0)
    out_ch = w_shape[1] if op in ("ConvTranspose", "MatMul", "Gemm") else w_shape[0]
    inits = [
        numpy_helper.from_array(np.float32(0.05), "xs"), numpy_helper.from_array(_NP[act](0), "xz"),
        numpy_helper.from_array(rng.integers(-50, 50, size=w_shape).astype(np.int8), "w"),
        numpy_helper.from_array(np.float32(0.01), "ws"), numpy_helper.from_array(np.int8(0), "wz"),
        numpy_helper.from_array(rng.integers(-99, 99, size=out_ch).astype(np.int32), "b"),
        numpy_helper.from_array(np.float32(0.0005), "bs"),
        numpy_helper.from_array(np.float32(0.1), "ys"),
        numpy_helper.from_array(_NP[act](relu_zero_point or 0), "yz"),
    ]  # fmt: skip
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="qx"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dqx"),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="dqw"),
        helper.make_node("DequantizeLinear", ["b", "bs"], ["bd"], name="dqb"),
        helper.make_node(
            op, ["xd", "wd"] if op == "MatMul" else ["xd", "wd", "bd"], ["y"], name="unit", **(attrs or {})
        ),
    ]
    tail, outputs = "y", []
    if relu_zero_point is not None:
        nodes.append(helper.make_node("Relu", ["y"], ["r"], name="relu"))
        tail = "r"
    if output_q:
        nodes += [
            helper.make_node("QuantizeLinear", [tail, "ys", "yz"], ["yq"], name="qy"),
            helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["z"], name="dqy"),
        ]
        outputs.append("z")
    if shared_input:  # a second reader of the input's DequantizeLinear
        nodes.append(helper.make_node("Relu", ["xd"], ["xr"], name="other"))
        outputs.append("xr")
    if float_reader or not output_q:
        nodes.append(helper.make_node("Sigmoid", [tail], ["s"], name="sig"))
        outputs.append("s")
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", T.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info(o, T.FLOAT, None) for o in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def verdict(model: onnx.ModelProto, **kwargs):
    (node,) = [n for n in audit_fusion(model, **kwargs).nodes if n.name == "unit"]
    return node


def test_quantized_conv_fuses_into_an_integer_kernel():
    node = verdict(qdq_unit())
    assert node.integer and node.kernel == "QLinearConv" and node.reason == ""
    assert node.status == "integer kernel"


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"float_reader": True}, "output is read by a QuantizeLinear and by float node(s) 'sig' (Sigmoid)"),
        ({"output_q": False}, "output is not followed by a QuantizeLinear (float consumer 'sig' (Sigmoid))"),
        ({"act": T.UINT16}, "uint16 input: no 16-bit integer Conv kernel"),
        ({"relu_zero_point": 100}, "Relu 'relu' after it is not absorbed"),
        (
            {"op": "ConvTranspose", "w_shape": (4, 8, 3, 3)},
            "no integer kernel: onnxruntime's CPU provider has no QDQ fusion for ConvTranspose",
        ),
        (
            {"op": "Gemm", "w_shape": (16, 8), "x_shape": (4, 16), "attrs": {"beta": 0.5}},
            "Gemm with a bias and beta=0.5 (QGemm needs beta=1)",
        ),
        (
            {"op": "MatMul", "w_shape": (16, 8), "x_shape": (2, 16), "float_reader": True},
            "output is read by a QuantizeLinear and by float node(s) 'sig' (Sigmoid)",
        ),
    ],
)
def test_float_reasons(kwargs, reason):
    node = verdict(qdq_unit(**kwargs))
    assert not node.integer
    assert node.reason.startswith(reason), node.reason
    assert node.status == f"float, because {node.reason}"


def test_int8_activations_fuse_on_x86_only_with_a_single_reader():
    assert verdict(qdq_unit(act=T.INT8)).kernel == "QLinearConv"  # converted to uint8 by onnxruntime
    node = verdict(qdq_unit(act=T.INT8, shared_input=True))
    assert not node.integer
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert node.reason == (
            "int8 activation 'x' stays int8, which x86 kernels lack: onnxruntime converts an int8 "
            "QuantizeLinear/DequantizeLinear pair to uint8 only if it has a single reader, and it has 2"
        )
        assert node.reason_kind.startswith("int8 activation '…' stays int8") and node.reason_kind.endswith("has more")


def test_relu_whose_range_starts_at_zero_is_absorbed():
    assert verdict(qdq_unit(relu_zero_point=0)).kernel == "QLinearConv"


def test_matmul_and_gemm_may_keep_a_float_output():
    assert verdict(qdq_unit("MatMul", w_shape=(16, 8), x_shape=(2, 16), output_q=False)).kernel == (
        "MatMulIntegerToFloat"
    )
    assert verdict(qdq_unit("Gemm", w_shape=(16, 8), x_shape=(4, 16), output_q=False)).kernel == "QGemm"


def test_plan_reasons_and_mac_share_on_a_converted_model(rng):
    model = models.small_cnn()
    images = {"x": models.structured_images(32, seed=3)}
    qmodel, plan, _ = quantize(model, images, QuantConfig(exclude_nodes=("conv2",)))
    audit = audit_fusion(qmodel, skipped={s.node: s.reason for s in plan.skipped})
    by_name = {n.name: n for n in audit.nodes}
    assert by_name["conv1"].integer and by_name["fc"].integer
    assert not by_name["conv2"].integer
    assert by_name["conv2"].reason == "not quantized: excluded by --exclude-nodes pattern 'conv2'"
    # conv1: 16x16 output x 16 channels x (3*3*3); conv2: 16*16*16 x (16*3*3); fc: 10 x 16
    assert (by_name["conv1"].macs, by_name["conv2"].macs, by_name["fc"].macs) == (110592, 589824, 160)
    assert audit.integer_mac_share() == pytest.approx((110592 + 160) / (110592 + 589824 + 160))


def _mac_model(dynamic: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = lambda name, shape: numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)  # noqa: E731
    nodes = [
        # 3x10x10 -> stride 2, pad 1, 3x3, group 1 -> 6x5x5; MACs 150 * 27
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv", strides=[2, 2], pads=[1, 1, 1, 1]),
        # depthwise: 6x5x5 -> 6x3x3 (no pad); MACs 54 * 9
        helper.make_node("Conv", ["c1", "w2"], ["c2"], name="dw", group=6),
        # ConvTranspose 6x3x3 -> 4 channels, 2x2 kernel, stride 2: MACs |X| * 4*2*2 = 54 * 16
        helper.make_node("ConvTranspose", ["c2", "w3"], ["c3"], name="up", strides=[2, 2]),
        helper.make_node("Reshape", ["c3", "shape"], ["r"], name="flat"),
        # [1, 4, 36] @ [36, 5]: MACs 20 * 36
        helper.make_node("MatMul", ["r", "w4"], ["m"], name="mm"),
        helper.make_node("Reshape", ["m", "shape2"], ["m2"], name="flat2"),
        # Gemm transA: A is [20, 1] -> M=1, K=20, N=7: MACs 7 * 20
        helper.make_node("Gemm", ["m2", "w5"], ["y"], name="gemm", transA=1),
    ]
    inits = [
        w("w1", (6, 3, 3, 3)), w("w2", (6, 1, 3, 3)), w("w3", (6, 4, 2, 2)), w("w4", (36, 5)), w("w5", (20, 7)),
        numpy_helper.from_array(np.array([1, 4, 36], np.int64), "shape"),
        numpy_helper.from_array(np.array([20, 1], np.int64), "shape2"),
    ]  # fmt: skip
    dims = ["N", 3, "H", "W"] if dynamic else ["N", 3, 10, 10]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", T.FLOAT, dims)],
        [helper.make_tensor_value_info("y", T.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


EXPECTED_MACS = {"conv": 150 * 27, "dw": 54 * 9, "up": 54 * 16, "mm": 20 * 36, "gemm": 7 * 20}


def test_macs_from_shape_inference_with_batch_one():
    model = _mac_model(dynamic=False)
    macs = compute_macs(model)
    got = {model.graph.node[i].name: m for i, m in macs.items()}
    assert got == EXPECTED_MACS


def test_dynamic_shapes_need_a_sample():
    model = _mac_model(dynamic=True)
    unresolved = {model.graph.node[i].name: m for i, m in compute_macs(model).items()}
    assert unresolved["conv"] is None
    feed = {"x": np.zeros((4, 3, 10, 10), np.float32)}  # batch 4: counts are still per sample
    resolved = {model.graph.node[i].name: m for i, m in compute_macs(model, feed=feed).items()}
    assert resolved == EXPECTED_MACS


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_inspect_fp32_and_quantized_bundled_cnn(tmp_path):
    fp32 = SAMPLE_MODELS / "digits_cnn.onnx"
    result = invoke("inspect", fp32)
    assert result.exit_code == 0, result.output
    assert "122,026 parameters" in result.output
    assert "Conv 7" in result.output and "BatchNormalization 7" in result.output
    assert "integer kernels run 0.0% of Conv/MatMul/Gemm MACs" in result.output
    assert "not quantized: no DequantizeLinear on its inputs" in result.output

    out = tmp_path / "cnn.int8.onnx"
    converted = invoke("convert", fp32, "--data", CALIBRATION_DATA / "digits_cnn_calib.npz", "-o", out)
    assert converted.exit_code == 0, converted.output
    assert "integer kernels run 100.0% of Conv/MatMul/Gemm MACs" in converted.output
    result = invoke("inspect", out, "--verbose")
    assert result.exit_code == 0, result.output
    assert "integer kernels run 100.0% of Conv/MatMul/Gemm MACs" in result.output
    assert "QLinearConv 7" in result.output
    rows = [line for line in result.output.splitlines() if "/features/features.0/Conv" in line]
    assert rows and "QLinearConv" in rows[0] and "integer kernel" in rows[0]


def test_require_fused_lists_nodes_and_reasons(tmp_path, cnn_data):
    model = models.small_cnn()
    model.opset_import[0].version = 21  # 16-bit QuantizeLinear needs opset 21
    cnn_path = tmp_path / "cnn21.onnx"
    cnn_path.write_bytes(model.SerializeToString())
    out = tmp_path / "q.onnx"
    result = invoke(
        "convert", cnn_path, "--data", cnn_data, "-o", out, "--activation-type", "uint16", "--require-fused"
    )
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "--require-fused: 3 quantized Conv/MatMul/Gemm did not fuse" in result.output
    assert "conv1 (Conv): uint16 input: no 16-bit integer Conv kernel" in result.output
    assert not out.exists()


def test_float_nodes_group_by_the_plans_reason_code():
    model = models.small_cnn()
    images = {"x": models.structured_images(32, seed=3)}
    config = QuantConfig(exclude_nodes=("re:^conv2$",), exclude_op_types=frozenset({"Gemm"}))
    qmodel, plan, _ = quantize(model, images, config)
    audit = audit_fusion(qmodel, skips=plan.skipped)
    as_text = audit_fusion(qmodel, skipped={s.node: s.reason for s in plan.skipped})
    by_name = {n.name: n for n in audit.nodes}
    assert by_name["conv2"].code == SkipCode.NODE_EXCLUDED and by_name["fc"].code == SkipCode.OP_TYPE_EXCLUDED
    assert by_name["conv1"].code is None  # integer
    # the same sentences either way; only the skips carry the code
    assert [n.reason for n in audit.nodes] == [n.reason for n in as_text.nodes]
    assert all(n.code is None for n in as_text.nodes)
    groups = audit.float_groups()
    assert set(groups) == {"plan:node-excluded", "plan:op-type-excluded"}
    label, nodes = groups["plan:node-excluded"]
    assert label == "not quantized: excluded by --exclude-nodes pattern '…'" and [n.name for n in nodes] == ["conv2"]
    assert {n.reason_kind for n in as_text.float_nodes()} == {label for label, _ in groups.values()}
