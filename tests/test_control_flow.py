"""Quantization inside If/Loop/Scan subgraphs, recurrent layers, integer inputs, failed shape inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantcli.core.options import QuantConfig
from quantcli.data.datasets import FeedList
from quantcli.graph.model_io import infer_shapes
from quantcli.graph.scopes import walk_graphs
from quantcli.graph.session import make_session
from quantcli.passes.preprocess import preprocess
from quantcli.static.lowering import apply_plan
from quantcli.static.plan import QuantPlan
from quantcli.static.planning import make_plan
from quantcli.stats.calibration import CalibrationResult, calibrate
from quantcli.verify.audit import audit_fusion
from tests.helpers import sqnr
from tests.models import make_model


def _quantize(
    model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]
) -> tuple[onnx.ModelProto, QuantPlan, CalibrationResult]:
    prepared, _ = preprocess(model)
    result = calibrate(prepared, FeedList(feeds), model_sha256="test")
    plan = make_plan(prepared, result.ranges, QuantConfig())
    quantized = apply_plan(prepared, plan)
    onnx.checker.check_model(quantized)
    return quantized, plan, result


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32)


def if_model(d: int = 32, seed: int = 0) -> onnx.ModelProto:
    """x -> Relu -> If(flag){then: MatMul(outer weight) -> Relu; else: MatMul(branch Constant) -> Sigmoid} -> MatMul."""
    rng = np.random.default_rng(seed)
    w_outer = numpy_helper.from_array(_w(rng, d, d), "w_outer")
    w_post = numpy_helper.from_array(_w(rng, d, d), "w_post")
    then = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w_outer"], ["t_mm"], name="then_mm"),
            helper.make_node("Relu", ["t_mm"], ["t_out"], name="then_relu"),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)],
    )
    els = helper.make_graph(
        [
            helper.make_node("Constant", [], ["w_branch"], value=numpy_helper.from_array(_w(rng, d, d))),
            helper.make_node("MatMul", ["x", "w_branch"], ["e_mm"], name="else_mm"),
            helper.make_node("Sigmoid", ["e_mm"], ["e_sig"], name="else_sigmoid"),
            helper.make_node("MatMul", ["e_sig", "w_branch"], ["e_out"], name="else_mm2"),
        ],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Relu", ["x0"], ["x"], name="pre"),
        helper.make_node("If", ["flag"], ["h"], name="branch", then_branch=then, else_branch=els),
        helper.make_node("MatMul", ["h", "w_post"], ["y"], name="post"),
    ]
    inputs = [
        helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["N", d]),
        helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
    ]
    return make_model(
        nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", d])], [w_outer, w_post]
    )


def _if_feeds(rng: np.random.Generator, flags: tuple[bool, ...], n: int = 4) -> list[dict[str, np.ndarray]]:
    return [{"x0": rng.normal(size=(16, 32)).astype(np.float32), "flag": np.array(f)} for f in flags for _ in range(n)]


def test_if_both_branches_quantized_and_fused(rng: np.random.Generator) -> None:
    model = if_model()
    original = model.SerializeToString()
    quantized, plan, result = _quantize(model, _if_feeds(rng, (True, False)))
    assert model.SerializeToString() == original
    assert {"t_mm", "e_mm", "e_out"} <= set(result.ranges)
    assert result.unobserved == ()
    by_path = {s.path: {n for n, _ in s.quantized_nodes} for s in plan.subgraphs}
    assert "then_mm" in by_path["branch/then_branch"]
    assert {"else_mm", "else_sigmoid", "else_mm2"} <= by_path["branch/else_branch"]
    # the new Q/DQ initializers sit in the branch that reads them
    for path, graph in walk_graphs(quantized.graph):
        inits = {t.name for t in graph.initializer}
        dq_inputs = {i for n in graph.node if n.op_type == "DequantizeLinear" for i in n.input[1:]}
        assert dq_inputs <= inits, path
    integer = dict(audit_fusion(quantized).integer_nodes)
    assert integer.get("then_mm") in ("MatMulIntegerToFloat", "QLinearMatMul")
    assert integer.get("else_mm") in ("MatMulIntegerToFloat", "QLinearMatMul")
    assert integer.get("else_mm2") in ("MatMulIntegerToFloat", "QLinearMatMul")
    ref, cand = make_session(model), make_session(quantized)
    for flag in (True, False):
        feed = _if_feeds(rng, (flag,), 1)[0]
        assert sqnr(ref.run(None, feed)[0], cand.run(None, feed)[0]) > 25, flag


def test_branch_never_taken_stays_float_and_is_reported(rng: np.random.Generator) -> None:
    model = if_model()
    quantized, plan, result = _quantize(model, _if_feeds(rng, (True,)))
    assert {"e_mm", "e_sig", "e_out"} <= set(result.unobserved)
    assert "e_mm" not in result.ranges
    else_plan = next(s for s in plan.subgraphs if s.path == "branch/else_branch")
    # else_mm reads only calibrated 'x' and a constant, so it may run in integers with a float output;
    # else_mm2 reads a tensor calibration never saw
    assert "else_mm2" not in {n for n, _ in else_plan.quantized_nodes}
    assert any(s.node == "else_mm2" and "never ran during calibration" in s.reason for s in else_plan.skipped)
    else_graph = next(g for path, g in walk_graphs(quantized.graph) if path == "branch/else_branch")
    mm2 = next(n for n in else_graph.node if n.name == "else_mm2")
    assert mm2.input[1] in {t.name for t in else_graph.initializer}  # still the float weight, no DequantizeLinear
    feed = _if_feeds(rng, (False,), 1)[0]  # the branch calibration never saw still runs
    assert np.all(np.isfinite(make_session(quantized).run(None, feed)[0]))


def loop_model(d: int = 16, steps: int = 6, seed: int = 1) -> onnx.ModelProto:
    """A Loop whose body multiplies the carried state by a weight: h <- tanh(h @ W) + x."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(_w(rng, d, d) * 1.5, "w_body")
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h_in", "w_body"], ["b_mm"], name="body_mm"),
            helper.make_node("Tanh", ["b_mm"], ["b_tanh"], name="body_tanh"),
            helper.make_node("Add", ["b_tanh", "x"], ["h_out"], name="body_add"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
        ],
        "body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["N", d]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["N", d]),
        ],
    )
    trip = numpy_helper.from_array(np.array(steps, np.int64), "trip")
    nodes = [helper.make_node("Loop", ["trip", "", "x"], ["h"], name="loop", body=body)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])]
    return make_model(nodes, inputs, [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", d])], [w, trip])


def test_loop_body_matmul_sees_every_iteration(rng: np.random.Generator) -> None:
    model = loop_model()
    feeds = [{"x": rng.normal(size=(8, 16)).astype(np.float32)} for _ in range(4)]
    quantized, plan, result = _quantize(model, feeds)
    assert {"h_in", "b_mm", "b_tanh"} <= set(result.ranges)
    # the carried state grows over iterations: its range must cover later iterations, not just the first
    assert result.ranges["h_in"].observed_max >= float(feeds[0]["x"].max())
    grown = make_session(model).run(None, feeds[0])[0]
    assert result.ranges["h_out"].observed_max >= float(grown.max()) - 1e-5  # the last iteration was seen
    assert ("body_mm", "MatMul") in plan.quantized_nodes
    assert "body_mm" in dict(audit_fusion(quantized).integer_nodes)
    feed = {"x": rng.normal(size=(8, 16)).astype(np.float32)}
    assert sqnr(make_session(model).run(None, feed)[0], make_session(quantized).run(None, feed)[0]) > 25


def test_nested_if_inside_if(rng: np.random.Generator) -> None:
    inner = if_model(seed=3)
    inner_if = next(n for n in inner.graph.node if n.op_type == "If")
    d = 32
    w_post = next(t for t in inner.graph.initializer if t.name == "w_post")
    w_outer = next(t for t in inner.graph.initializer if t.name == "w_outer")
    outer_then = helper.make_graph(
        [inner_if, helper.make_node("MatMul", ["h", "w_post"], ["o_then"], name="outer_then_mm")],
        "outer_then",
        [],
        [helper.make_tensor_value_info("o_then", TensorProto.FLOAT, None)],
    )
    outer_else = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["o_else"], name="outer_else_relu")],
        "outer_else",
        [],
        [helper.make_tensor_value_info("o_else", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Relu", ["x0"], ["x"], name="pre"),
        helper.make_node("If", ["flag2"], ["y"], name="outer", then_branch=outer_then, else_branch=outer_else),
    ]
    inputs = [
        helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["N", d]),
        helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        helper.make_tensor_value_info("flag2", TensorProto.BOOL, []),
    ]
    model = make_model(
        nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", d])], [w_outer, w_post]
    )
    feeds = [{**f, "flag2": np.array(True)} for f in _if_feeds(rng, (True, False))]
    quantized, plan, result = _quantize(model, feeds)
    assert {"t_mm", "e_mm", "o_then"} <= set(result.ranges)
    paths = {s.path for s in plan.subgraphs if s.quantized_nodes}
    assert "outer/then_branch/branch/else_branch" in paths
    integer = dict(audit_fusion(quantized).integer_nodes)
    assert {"then_mm", "else_mm", "outer_then_mm"} <= set(integer)
    ref, cand = make_session(model), make_session(quantized)
    for flag in (True, False):
        feed = {**_if_feeds(rng, (flag,), 1)[0], "flag2": np.array(True)}
        assert sqnr(ref.run(None, feed)[0], cand.run(None, feed)[0]) > 25


def test_identity_removed_in_main_graph_keeps_subgraph_reads(rng: np.random.Generator) -> None:
    model = if_model()
    # the branch reads 'x' through an Identity in the main graph: removing it must rename inside the branch
    model.graph.node[0].output[0] = "x_pre"
    model.graph.node.insert(1, helper.make_node("Identity", ["x_pre"], ["x"], name="ident"))
    onnx.checker.check_model(model)
    prepared, report = preprocess(model)
    assert report.removed_identities == 1
    feed = _if_feeds(rng, (True,), 1)[0]
    np.testing.assert_allclose(make_session(prepared).run(None, feed)[0], make_session(model).run(None, feed)[0])


def test_sentinel_mask_add_stays_float(rng: np.random.Generator) -> None:
    d = 16
    w = numpy_helper.from_array(_w(rng, d, d), "w")
    mask = numpy_helper.from_array(np.where(np.arange(d) < 12, 0.0, -3.4e38).astype(np.float32), "mask")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["scores"], name="mm"),
        helper.make_node("Add", ["scores", "mask_in"], ["masked"], name="mask_add"),
        helper.make_node("Softmax", ["masked"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "w"], ["y"], name="mm2"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d]),
        helper.make_tensor_value_info("mask_in", TensorProto.FLOAT, ["N", d]),
    ]
    model = make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", d])], [w, mask])
    m = numpy_helper.to_array(mask)
    feeds = [{"x": rng.normal(size=(8, d)).astype(np.float32), "mask_in": np.tile(m, (8, 1))} for _ in range(3)]
    quantized, plan, _ = _quantize(model, feeds)
    kept = {d.tensor for d in plan.range_decisions}
    assert kept & {"mask_in", "masked"}
    assert not {"mask_in", "masked"} & {a.tensor for a in plan.activations}
    assert ("mm", "MatMul") in plan.quantized_nodes
    feed = feeds[0]
    out = make_session(quantized).run(None, feed)[0]
    assert np.all(np.isfinite(out))
    assert sqnr(make_session(model).run(None, feed)[0], out) > 20


def test_int64_input_through_gather_is_never_quantized(rng: np.random.Generator) -> None:
    vocab, d = 50, 16
    table = numpy_helper.from_array(rng.normal(size=(vocab, d)).astype(np.float32), "embedding")
    w = numpy_helper.from_array(_w(rng, d, d), "w")
    nodes = [
        helper.make_node("Gather", ["embedding", "ids"], ["emb"], name="lookup"),
        helper.make_node("Shape", ["ids"], ["ids_shape"], name="shape"),
        helper.make_node("Cast", ["ids_shape"], ["ids_shape_f"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["emb", "w"], ["y"], name="mm"),
    ]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])]
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, d]),
        helper.make_tensor_value_info("ids_shape_f", TensorProto.FLOAT, [2]),
    ]
    model = make_model(nodes, inputs, outputs, [table, w])
    feeds = [{"ids": rng.integers(0, vocab, size=(4, 5)).astype(np.int64)} for _ in range(3)]
    quantized, plan, result = _quantize(model, feeds)
    assert "ids" not in result.ranges and "ids_shape" not in result.ranges
    q_inputs = {n.input[0] for _, g in walk_graphs(quantized.graph) for n in g.node if n.op_type == "QuantizeLinear"}
    assert not q_inputs & {"ids", "ids_shape"}
    assert ("mm", "MatMul") in plan.quantized_nodes
    out = make_session(quantized).run(None, feeds[0])
    ref = make_session(model).run(None, feeds[0])
    assert sqnr(ref[0], out[0]) > 25
    np.testing.assert_array_equal(ref[1], out[1])


def test_failed_shape_inference_does_not_block_conv_quantization(rng: np.random.Generator) -> None:
    """A com.microsoft op onnx cannot infer, then a Reshape to a shape computed at run time, between two Convs."""
    c = 8
    w1 = numpy_helper.from_array(_w(rng, c, 3, 3, 3), "w1")
    w2 = numpy_helper.from_array(_w(rng, c, c, 3, 3), "w2")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("FastGelu", ["c1"], ["g"], name="gelu", domain="com.microsoft"),
        helper.make_node("Shape", ["g"], ["gs"], name="shape"),
        helper.make_node("Reshape", ["g", "gs"], ["r"], name="reshape"),
        helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c2"], ["y"], name="head"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 8, 8])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, [w1, w2])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    inferred, _ = infer_shapes(model)
    known = {v.name for v in inferred.graph.value_info if v.type.tensor_type.HasField("shape")}
    assert not known & {"g", "r"}  # onnx knows neither the FastGelu nor the Reshape output shape
    feeds = [{"x": rng.normal(size=(2, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    quantized, plan, _ = _quantize(model, feeds)
    assert {("conv1", "Conv"), ("conv2", "Conv")} <= set(plan.quantized_nodes)
    assert any(s.node == "gelu" for s in plan.skipped)
    assert audit_fusion(quantized).integer_op_counts().get("QLinearConv") == 2
    feed = feeds[0]
    assert sqnr(make_session(model).run(None, feed)[0], make_session(quantized).run(None, feed)[0]) > 20


@pytest.mark.parametrize(("op", "hidden"), [("LSTM", 16), ("GRU", 16), ("RNN", 16), ("LSTM", 256)])
def test_recurrent_state_stays_float_over_a_long_stream(rng: np.random.Generator, op: str, hidden: int) -> None:
    """MatMul -> recurrent layer -> MatMul with the state fed back for 400 steps: no Q/DQ touches the state.

    A small LSTM stays float (no faster integer kernel); from hidden 256 it becomes DynamicQuantizeLSTM.
    """
    d = 8
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    w_in = numpy_helper.from_array(_w(rng, d, d), "w_in")
    wx = numpy_helper.from_array(_w(rng, d, gates * hidden).T.reshape(1, gates * hidden, d).copy(), "wx")
    wh = numpy_helper.from_array(
        (0.5 * _w(rng, hidden, gates * hidden)).T.reshape(1, gates * hidden, hidden).copy(), "wh"
    )
    w_out = numpy_helper.from_array(_w(rng, hidden, 4), "w_out")
    state_in = ["h0", "c0"] if op == "LSTM" else ["h0"]
    state_out = ["hN", "cN"] if op == "LSTM" else ["hN"]
    rnn_inputs = ["xs", "wx", "wh", "", "", *state_in]
    rnn_outputs = ["seq", *state_out]
    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["proj"], name="proj"),
        helper.make_node("Unsqueeze", ["proj", "axis0"], ["xs"], name="unsq"),
        helper.make_node(op, rnn_inputs, rnn_outputs, name="rnn", hidden_size=hidden),
        helper.make_node("Squeeze", ["seq", "axes01"], ["last"], name="sq"),
        helper.make_node("MatMul", ["last", "w_out"], ["y"], name="head"),
    ]
    axis0 = numpy_helper.from_array(np.array([0], np.int64), "axis0")
    axes01 = numpy_helper.from_array(np.array([0, 1], np.int64), "axes01")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d])]
    inputs += [helper.make_tensor_value_info(s, TensorProto.FLOAT, [1, 1, hidden]) for s in state_in]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]
    outputs += [helper.make_tensor_value_info(s, TensorProto.FLOAT, [1, 1, hidden]) for s in state_out]
    model = make_model(nodes, inputs, outputs, [w_in, wx, wh, w_out, axis0, axes01])
    t = np.arange(400)
    signal = np.stack([np.sin(0.05 * (k + 1) * t + k) for k in range(d)], axis=1).astype(np.float32)
    signal[200:] = signal[:200][::-1]  # calibration covers the stream; the test is whether errors build up
    ref = make_session(model)

    def run(session: object, steps: int, record: list | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        state = {s: np.zeros((1, 1, hidden), np.float32) for s in state_in}
        ys = []
        for k in range(steps):
            feed = {"x": signal[k : k + 1], **state}
            if record is not None:
                record.append(feed)
            y, *new = session.run(None, feed)  # type: ignore[attr-defined]
            state = dict(zip(state_in, new, strict=True))
            ys.append(y)
        return np.concatenate(ys), list(state.values())

    calib: list[dict[str, np.ndarray]] = []
    run(ref, 400, calib)
    quantized, plan, _ = _quantize(model, calib)
    q_inputs = {n.input[0] for n in quantized.graph.node if n.op_type == "QuantizeLinear"}
    assert not q_inputs & {*state_in, *state_out, "seq"}
    rnn = next(n for n in quantized.graph.node if n.name == "rnn")
    if op == "LSTM" and hidden >= 256:
        assert ("rnn", "LSTM") in plan.quantized_nodes
        assert (rnn.domain, rnn.op_type) == ("com.microsoft", "DynamicQuantizeLSTM")
        assert list(rnn.input[5:7]) == state_in  # initial_h, initial_c: the float graph inputs
        assert "DynamicQuantizeLSTM" in audit_fusion(quantized).integer_op_counts()
    else:
        assert ("rnn", op) not in plan.quantized_nodes
        assert rnn.op_type == op
        assert [i for i in rnn.input if i][-len(state_in) :] == state_in  # state inputs read the float graph inputs
        if op == "LSTM":
            assert any(s.node == "rnn" and "no faster integer kernel" in s.reason for s in plan.skipped)
    y_ref, s_ref = run(ref, 400)
    y_q, s_q = run(make_session(quantized), 400)
    assert np.all(np.isfinite(y_q))
    # 8-bit input/output projections cost ~10-20 dB on this toy; what matters is that the error does
    # not build up along the stream: the last 100 steps are no worse than the first 100
    assert sqnr(y_ref, y_q) > 10
    assert sqnr(y_ref[-100:], y_q[-100:]) > sqnr(y_ref[:100], y_q[:100]) - 3
    for a, b in zip(s_ref, s_q, strict=True):
        assert sqnr(a, b) > 10


def data_dependent_if_model(d: int = 32, seed: int = 5) -> onnx.ModelProto:
    """The branch depends on the data: mean(x) > 0 takes a MatMul branch, else another MatMul branch."""
    model = if_model(d, seed)
    graph = model.graph
    graph.input.pop()  # no 'flag' input: computed from x
    del graph.input[0].type.tensor_type.shape.dim[0]
    graph.input[0].type.tensor_type.shape.dim.insert(0, onnx.TensorShapeProto.Dimension(dim_value=1))
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    graph.initializer.append(zero)
    graph.node.insert(0, helper.make_node("ReduceMean", ["x0"], ["mean"], name="mean", keepdims=0))
    graph.node.insert(1, helper.make_node("Greater", ["mean", "zero"], ["flag"], name="gt"))
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def if_files(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, Path]:
    path = tmp_path / "if.onnx"
    onnx.save(data_dependent_if_model(), str(path))
    x = rng.normal(size=(24, 1, 32)).astype(np.float32)
    x[:12] += 0.5
    x[12:] -= 0.5
    data = tmp_path / "if.npz"
    np.savez(data, x0=x.reshape(24, 32))
    return path, data


def test_cli_reports_what_was_quantized_per_subgraph(tmp_path: Path, if_files: tuple[Path, Path]) -> None:
    from typer.testing import CliRunner

    from quantcli.cli.app import app

    model, data = if_files
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(app, ["convert", str(model), "--data", str(data), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "inside If/Loop/Scan subgraphs" in result.output
    assert "branch/then_branch" in result.output and "branch/else_branch" in result.output
    quantized = onnx.load(str(out))
    branch_ops = {n.op_type for path, g in walk_graphs(quantized.graph) if path for n in g.node}
    assert "DequantizeLinear" in branch_ops


def test_require_speedup_writes_nothing_when_not_faster(
    tmp_path: Path, if_files: tuple[Path, Path], fixed_speedup
) -> None:
    from quantcli import api
    from quantcli.core.errors import QuantCliError

    model, data = if_files
    fixed_speedup(0.83)
    out = tmp_path / "q.onnx"
    with pytest.raises(QuantCliError, match="not faster than FP32 at batch 1"):
        api.convert_model(model, out, data_path=data, require_speedup=True)
    assert not out.exists()
    timed = fixed_speedup.feeds
    assert timed and timed[0]["x0"].shape == (1, 32)  # timed on a real batch-1 sample

    fixed_speedup(2.0)
    result = api.convert_model(model, out, data_path=data, require_speedup=True)
    assert out.exists() and result.speed is not None and result.speed.faster


def test_check_speedup_measures_both_models(rng: np.random.Generator) -> None:
    from quantcli.verify.speedcheck import MAX_ROUNDS, check_speedup

    model = loop_model()
    quantized, _, _ = _quantize(model, [{"x": rng.normal(size=(1, 16)).astype(np.float32)} for _ in range(3)])
    check = check_speedup(model, quantized, {"x": rng.normal(size=(1, 16)).astype(np.float32)}, rounds=2, runs=5)
    # 2 rounds, and 2 more each time their middle half spans 1.0x (this tiny loop runs near 1.0x: it did)
    assert check.rounds in (2, 4, 6, 8, MAX_ROUNDS)
    assert check.fp32_ms > 0 and check.quantized_ms > 0
    assert check.faster == (check.speedup > 1.0)
    assert ("faster" in check.line()) and f"x{check.speedup:.2f}" in check.line()


def test_large_embedding_table_becomes_int8_gathered_before_scaling(rng: np.random.Generator) -> None:
    vocab, d = 4096, 64  # 1 MiB of float32: above EMBEDDING_MIN_BYTES
    rows = rng.normal(size=(vocab, d)) * rng.uniform(0.1, 3.0, size=(vocab, 1))  # rows of different norms
    table = numpy_helper.from_array(rows.astype(np.float32), "embedding")
    w = numpy_helper.from_array(_w(rng, d, d), "w")
    nodes = [
        helper.make_node("Gather", ["embedding", "ids"], ["emb"], name="lookup"),
        helper.make_node("MatMul", ["emb", "w"], ["y"], name="mm"),
    ]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 7])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7, d])]
    model = make_model(nodes, inputs, outputs, [table, w])
    feeds = [{"ids": rng.integers(0, vocab, size=(4, 7)).astype(np.int64)} for _ in range(4)]
    quantized, plan, _ = _quantize(model, feeds)
    assert [e.node for e in plan.embeddings] == ["lookup"]
    inits = {t.name: t for t in quantized.graph.initializer}
    assert "embedding" not in inits  # the float table is gone
    int8_tables = [t for t in inits.values() if t.data_type == TensorProto.INT8 and list(t.dims) == [vocab, d]]
    assert len(int8_tables) == 1
    assert quantized.ByteSize() < model.ByteSize() / 3
    gathers = [n for n in quantized.graph.node if n.op_type == "Gather"]
    assert int8_tables[0].name in {n.input[0] for n in gathers}  # rows are gathered as int8 ...
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] == int8_tables[0].name for n in quantized.graph.node)
    feed = {"ids": rng.integers(0, vocab, size=(2, 7)).astype(np.int64)}
    assert sqnr(make_session(model).run(None, feed)[0], make_session(quantized).run(None, feed)[0]) > 25


def test_small_embedding_table_stays_float(rng: np.random.Generator) -> None:
    table = numpy_helper.from_array(rng.normal(size=(50, 16)).astype(np.float32), "embedding")
    nodes = [helper.make_node("Gather", ["embedding", "ids"], ["y"], name="lookup")]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3])]
    model = make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 16])], [table])
    _, plan, _ = _quantize(model, [{"ids": np.array([[1, 2, 3]], np.int64)}])
    assert plan.embeddings == ()


def test_loop_whose_shapes_change_per_iteration_is_observed_per_iteration(
    rng: np.random.Generator, caplog: pytest.LogCaptureFixture
) -> None:
    """Scan outputs must have one shape: a body tensor that grows cannot be stacked, but its per-iteration
    [min, max] pair can (calibration reduces Loop-body tensors inside the body), so the body is calibrated."""
    d, steps = 4, 3
    body = helper.make_graph(
        [
            helper.make_node("Concat", ["h_in", "x"], ["h_out"], name="grow", axis=1),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
        ],
        "body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["N", None]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["N", None]),
        ],
    )
    trip = numpy_helper.from_array(np.array(steps, np.int64), "trip")
    w = numpy_helper.from_array(_w(rng, d * (steps + 1), 8), "w")
    nodes = [
        helper.make_node("Loop", ["trip", "", "x"], ["h"], name="loop", body=body),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="mm"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])]
    model = make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [w, trip])
    feeds = [{"x": rng.normal(size=(2, d)).astype(np.float32)} for _ in range(3)]
    quantized, plan, result = _quantize(model, feeds)
    assert "h_out" in result.ranges and "h" in result.ranges
    # the last iteration's h_out holds every value seen (it is h): the same range
    assert result.ranges["h_out"] == result.ranges["h"]
    assert "they stay float" not in caplog.text
    assert ("mm", "MatMul") in plan.quantized_nodes
    feed = feeds[0]
    assert sqnr(make_session(model).run(None, feed)[0], make_session(quantized).run(None, feed)[0]) > 25


def test_calibration_file_keeps_the_unobserved_subgraph_tensors(tmp_path: Path, rng: np.random.Generator) -> None:
    from quantcli.stats.artifact import read_calibration, write_calibration

    prepared, _ = preprocess(if_model())
    result = calibrate(prepared, FeedList(_if_feeds(rng, (True,), 2)), model_sha256="abc")
    assert result.unobserved
    path = tmp_path / "m.calib.json"
    write_calibration(result, path, model_path="m.onnx")
    again = read_calibration(path, expected_sha256="abc")
    assert sorted(again.unobserved) == sorted(result.unobserved)
    assert again.ranges == result.ranges


def test_scan_body_matmul_is_quantized(rng: np.random.Generator) -> None:
    """Scan over time: state <- tanh(state @ R + x_t @ W); the body MatMuls see every time step."""
    d, steps = 16, 10
    w = numpy_helper.from_array(_w(rng, d, d), "w_scan")
    r = numpy_helper.from_array(0.5 * _w(rng, d, d), "r_scan")
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_t", "w_scan"], ["xw"], name="scan_xw"),
            helper.make_node("MatMul", ["s_in", "r_scan"], ["sr"], name="scan_sr"),
            helper.make_node("Add", ["xw", "sr"], ["pre"], name="scan_add"),
            helper.make_node("Tanh", ["pre"], ["s_out"], name="scan_tanh"),
            helper.make_node("Identity", ["s_out"], ["y_t"], name="scan_y"),
        ],
        "body",
        [
            helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [1, d]),
            helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [1, d]),
        ],
        [
            helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [1, d]),
            helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [1, d]),
        ],
    )
    nodes = [
        helper.make_node(
            "Scan", ["s0", "xs"], ["s_final", "ys"], name="scan", body=body, num_scan_inputs=1, scan_output_axes=[0]
        )
    ]
    inputs = [
        helper.make_tensor_value_info("s0", TensorProto.FLOAT, [1, d]),
        helper.make_tensor_value_info("xs", TensorProto.FLOAT, [steps, 1, d]),
    ]
    outputs = [
        helper.make_tensor_value_info("s_final", TensorProto.FLOAT, [1, d]),
        helper.make_tensor_value_info("ys", TensorProto.FLOAT, [steps, 1, d]),
    ]
    model = make_model(nodes, inputs, outputs, [w, r])
    t = np.arange(steps)[:, None, None]

    def feed(phase: float) -> dict[str, np.ndarray]:
        xs = np.sin(0.3 * t + np.linspace(0, 3, d)[None, None, :] + phase).astype(np.float32)
        return {"s0": np.zeros((1, d), np.float32), "xs": xs}

    quantized, plan, result = _quantize(model, [feed(p) for p in (0.0, 0.7, 1.4, 2.1)])
    assert {"x_t", "s_in", "xw", "sr", "pre"} <= set(result.ranges)
    assert {("scan_xw", "MatMul"), ("scan_sr", "MatMul")} <= set(plan.quantized_nodes)
    integer = dict(audit_fusion(quantized).integer_nodes)
    assert {"scan_xw", "scan_sr"} <= set(integer)
    ref, out = make_session(model).run(None, feed(0.35)), make_session(quantized).run(None, feed(0.35))
    assert sqnr(ref[1], out[1]) > 20


def test_preprocess_folds_inside_branches(rng: np.random.Generator) -> None:
    """BatchNormalization after a Conv and a Transpose of an outer weight are folded inside a branch."""
    c = 4
    w = numpy_helper.from_array(_w(rng, c, 3, 3, 3), "conv_w")
    wt = numpy_helper.from_array(_w(rng, 3, 3, c, 3), "conv_w_t")  # stored transposed: folded back
    bn = [numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), n) for n in ("g", "b", "m", "v")]
    then = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "conv_w"], ["c1"], name="b_conv", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn1"], name="b_bn"),
            helper.make_node("Identity", ["bn1"], ["t_out"], name="b_id"),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)],
        bn,
    )
    els = helper.make_graph(
        [
            helper.make_node("Transpose", ["conv_w_t"], ["w_back"], name="b_transpose", perm=[2, 3, 0, 1]),
            helper.make_node("Conv", ["x", "w_back"], ["e_out"], name="e_conv", pads=[1, 1, 1, 1]),
        ],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)],
    )
    nodes = [helper.make_node("If", ["flag"], ["y"], name="branch", then_branch=then, else_branch=els)]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
        helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
    ]
    model = make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 8, 8])], [w, wt])
    prepared, report = preprocess(model)
    assert report.folded_batchnorms == 1 and report.folded_constants == 1
    ops = {n.op_type for _, g in walk_graphs(prepared.graph) for n in g.node}
    assert not ops & {"BatchNormalization", "Transpose"}
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    for flag in (True, False):
        feed = {"x": x, "flag": np.array(flag)}
        np.testing.assert_allclose(
            make_session(prepared).run(None, feed)[0], make_session(model).run(None, feed)[0], rtol=1e-4, atol=1e-5
        )


def test_subgraph_rewrite_is_deterministic(rng: np.random.Generator) -> None:
    model = if_model()
    feeds = _if_feeds(rng, (True, False))
    first, _, _ = _quantize(model, feeds)
    second, _, _ = _quantize(model, feeds)
    assert first.SerializeToString(deterministic=True) == second.SerializeToString(deterministic=True)


def test_shared_outer_constant_is_not_copied_into_each_branch(rng: np.random.Generator) -> None:
    big = numpy_helper.from_array(rng.normal(size=(64, 512)).astype(np.float32), "shared")  # 128 KiB
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")

    def branch(tag: str) -> onnx.GraphProto:
        return helper.make_graph(
            [
                helper.make_node("Unsqueeze", ["shared", "axes"], [f"{tag}_u"], name=f"{tag}_unsqueeze"),
                helper.make_node("Mul", ["x", f"{tag}_u"], [f"{tag}_out"], name=f"{tag}_mul"),
            ],
            tag,
            [],
            [helper.make_tensor_value_info(f"{tag}_out", TensorProto.FLOAT, [1, 64, 512])],
        )

    nodes = [helper.make_node("If", ["flag"], ["y"], name="branch", then_branch=branch("t"), else_branch=branch("e"))]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 512]),
        helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 512])]
    model = make_model(nodes, inputs, outputs, [big, axes])
    prepared, _ = preprocess(model)
    assert prepared.ByteSize() < 1.5 * model.ByteSize()
    assert {n.op_type for _, g in walk_graphs(prepared.graph) for n in g.node} >= {"Unsqueeze"}
