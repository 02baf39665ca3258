"""The graph editor: functional (the input model is never mutated), ordered, and named uniquely."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantcli.graph.editor import ModelEditor, make_node, make_tensor, used_names
from quantcli.graph.names import NameAllocator
from quantcli.graph.scopes import subgraph_reads


def _chain() -> onnx.ModelProto:
    """x -> Relu(a) -> Mul(b, w) -> Relu(c) -> y, with an unused initializer 'dead' and a value_info for 'a'."""
    w = numpy_helper.from_array(np.full((1,), 2.0, np.float32), "w")
    dead = numpy_helper.from_array(np.zeros((2,), np.float32), "dead")
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["a"], name="r1"),
            helper.make_node("Mul", ["a", "w"], ["b"], name="m"),
            helper.make_node("Relu", ["b"], ["y"], name="r2"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [w, dead],
        value_info=[helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _if_model() -> onnx.ModelProto:
    """An If whose then-branch reads the outer initializer 'k' and whose else-branch outputs 'k2' directly."""
    then_g = helper.make_graph(
        [helper.make_node("Add", ["x", "k"], ["t"], name="add")], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])],
    )  # fmt: skip
    else_g = helper.make_graph([], "else", [], [helper.make_tensor_value_info("k2", TensorProto.FLOAT, [1])])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g)],
        "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []), helper.make_tensor_value_info("x", 1, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.ones(1, np.float32), n) for n in ("k", "k2", "unused")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_edits_leave_the_input_model_untouched() -> None:
    model = _chain()
    before = model.SerializeToString()
    editor = ModelEditor(model)
    g = editor.graph
    r1, mul, r2 = g.nodes
    g.set_input(mul, 1, g.add_initializer("w", np.full((1,), 3.0, np.float32)))
    g.insert_after(r1, [make_node("Identity", ["a"], ["a2"], name=editor.names.new("id"))])
    g.set_inputs(r2, ["b"])
    g.set_op(r2, "Sigmoid", "")
    g.rename_node(r1, "first")
    editor.use_domain("com.microsoft", 1)
    out = editor.build()
    assert model.SerializeToString() == before
    assert out is not model
    assert [n.op_type for n in out.graph.node] == ["Relu", "Identity", "Mul", "Sigmoid"]
    assert out.graph.node[0].name == "first"
    assert out.graph.node[2].input[1] == "w_1"  # 'w' is taken: a fresh name
    assert {i.domain: i.version for i in out.opset_import} == {"": 17, "com.microsoft": 1}
    with pytest.raises(RuntimeError):
        editor.build()


def test_node_order_is_head_before_replacement_after_tail() -> None:
    editor = ModelEditor(_chain())
    g = editor.graph
    r1, mul, r2 = g.nodes

    def node(name: str) -> onnx.NodeProto:
        return make_node("Identity", ["x"], [f"{name}_out"], name=name)

    g.prepend([node("head")])
    g.insert_before(mul, [node("before")])
    g.replace(mul, [node("new1"), mul])
    g.insert_after(mul, [node("after")])
    g.append([node("tail")])
    extra = node("gone")
    g.insert_after(r2, [extra])
    g.remove(extra)
    g.remove(r1)
    assert g.pending
    g.commit()
    assert not g.pending
    assert [n.name for n in g.nodes] == ["head", "before", "new1", "m", "after", "r2", "tail"]


def test_edit_of_a_foreign_node_is_refused() -> None:
    editor = ModelEditor(_chain())
    with pytest.raises(KeyError, match="not one of this editor's nodes"):
        editor.graph.replace(make_node("Relu", ["x"], ["z"], name="stranger"), [])


def test_prune_keeps_what_nodes_subgraphs_and_interface_read() -> None:
    editor = ModelEditor(_if_model())
    editor.graph.add_initializer("fresh", np.zeros(1, np.float32))
    assert [t.name for t in editor.graph.proto.initializer] == ["k", "k2", "unused", "fresh"]
    editor.graph.prune_initializers()  # the model's own unread one and an added one nothing reads
    assert [t.name for t in editor.build().graph.initializer] == ["k", "k2"]


def test_used_names_and_subgraph_reads() -> None:
    graph = _if_model().graph
    assert subgraph_reads(graph) == {"x", "k"}
    assert {"c", "x", "y", "k", "k2"} <= used_names(graph)
    assert "unused" not in used_names(graph)


def test_subgraph_editors_share_the_allocator_and_commit_at_build() -> None:
    editor = ModelEditor(_if_model())
    (if_node, attr, _), (_, attr2, then_g) = editor.graph.subgraphs()  # attributes are sorted by name
    assert (if_node.name, attr, attr2) == ("if", "else_branch", "then_branch")
    assert then_g.names is editor.names
    (add,) = then_g.nodes
    then_g.insert_before(add, [make_node("Neg", ["x"], [editor.names.new("x")], name="neg")])
    out = editor.build()
    then_branch = out.graph.node[0].attribute[1].g
    assert [n.op_type for n in then_branch.node] == ["Neg", "Add"]
    assert then_branch.node[0].output[0] == "x_1"


def test_subgraphs_refused_with_pending_edits() -> None:
    editor = ModelEditor(_if_model())
    editor.graph.remove(editor.graph.nodes[0])
    with pytest.raises(RuntimeError):
        list(editor.graph.subgraphs())


def test_rename_reads_reaches_subgraphs() -> None:
    editor = ModelEditor(_if_model())
    editor.graph.rename_reads({"k": "k2"})
    out = editor.build()
    assert out.graph.node[0].attribute[1].g.node[0].input[:] == ["x", "k2"]


def test_value_info_and_outputs() -> None:
    editor = ModelEditor(_chain())
    g = editor.graph
    g.add_output("a", TensorProto.FLOAT)
    g.drop_value_info({"a"})
    g.set_input_dim("x", 0, 4)
    out = editor.build()
    assert [o.name for o in out.graph.output] == ["y", "a"]
    assert not out.graph.value_info
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4


def test_prune_value_info_drops_tensors_gone() -> None:
    editor = ModelEditor(_chain())
    g = editor.graph
    g.remove(g.nodes[0])
    g.commit()
    g.prune_value_info()
    assert not editor.build().graph.value_info


def test_make_tensor_int4_and_put_initializer_copy() -> None:
    t = make_tensor("q", np.array([-1, 2, 3], np.int8), elem_type=TensorProto.INT4)
    assert t.data_type == TensorProto.INT4 and list(t.dims) == [3]
    np.testing.assert_array_equal(numpy_helper.to_array(t), [-1, 2, 3])
    editor = ModelEditor(_chain())
    editor.graph.put_initializer("copied", t)
    assert t.name == "q"
    assert editor.build().graph.initializer[-1].name == "copied"


def test_make_node_matches_onnx_helper_bytes() -> None:
    ours = make_node("Cast", ["a"], ["b"], name="c", attrs={"to": 1, "saturate": 0})
    theirs = helper.make_node("Cast", ["a"], ["b"], name="c", to=1, saturate=0)
    assert ours.SerializeToString() == theirs.SerializeToString()
    assert not ours.HasField("domain")


def test_name_allocator() -> None:
    names = NameAllocator.for_graph(_chain().graph)
    assert names.new("w") == "w_1"
    assert names.new("w") == "w_2"
    assert names.new("fresh") == "fresh"
    assert NameAllocator.reserving(["a"]).new("a") == "a_1"


def _cnn_with_constants() -> onnx.ModelProto:
    """small_cnn plus the shapes of edits preprocess makes: a Constant node, an Identity, a foldable Transpose."""
    from tests import models

    model = models.small_cnn()
    graph = model.graph
    first = graph.node[0]
    x = first.input[0]
    graph.node.insert(0, helper.make_node("Identity", [x], ["x_id"], name="id"))
    graph.node.insert(0, helper.make_node("Constant", [], ["one"], value_float=1.0))
    graph.node.insert(2, helper.make_node("Mul", ["x_id", "one"], ["x_one"], name="mul_one"))
    first.input[0] = "x_one"
    return model


@pytest.mark.parametrize("convert", ["preprocess", "apply_plan", "dynamic", "weight_only", "fp16", "macs"])
def test_every_ported_rewrite_leaves_its_input_untouched(convert: str) -> None:
    from quantcli.core.options import QuantConfig
    from quantcli.modes.dynamic import DynamicOptions, quantize_dynamic
    from quantcli.modes.fp16 import convert_fp16
    from quantcli.modes.weight_only import quantize_weight_only
    from quantcli.passes.preprocess import preprocess
    from quantcli.static.lowering import apply_plan
    from quantcli.static.planning import make_plan
    from quantcli.stats.calibration import TensorRange
    from quantcli.verify.macs import compute_macs
    from tests import models

    model = _cnn_with_constants() if convert in ("preprocess", "macs") else models.matmul_chain()
    before = model.SerializeToString()
    if convert == "preprocess":
        out, report = preprocess(model)
        assert report.constants_to_initializers == 1 and report.removed_identities == 1
    elif convert == "apply_plan":
        prepared, _ = preprocess(model)
        index_names = {o for n in prepared.graph.node for o in n.output} | {i.name for i in prepared.graph.input}
        ranges = {name: TensorRange(-1.0, 1.0, -1.0, 1.0) for name in index_names}
        plan = make_plan(prepared, ranges, QuantConfig())
        before = prepared.SerializeToString()
        model = prepared
        out = apply_plan(prepared, plan)
        assert any(n.op_type == "QuantizeLinear" for n in out.graph.node)
    elif convert == "dynamic":
        out, _ = quantize_dynamic(model, DynamicOptions())
    elif convert == "weight_only":
        out, _ = quantize_weight_only(model)
    elif convert == "fp16":
        out, _ = convert_fp16(model)
    else:
        compute_macs(model)
        out = model
    assert model.SerializeToString() == before
    onnx.checker.check_model(out)


def test_upgrade_opset_returns_a_converted_copy() -> None:
    from quantcli.graph.model_io import model_opset, upgrade_opset

    model = _chain()
    model.opset_import[0].version = 11
    before = model.SerializeToString()
    out = upgrade_opset(model, 13)
    assert model_opset(out) == 13
    assert model.SerializeToString() == before


def test_set_initializer_keeps_position_and_matches_from_array_bytes() -> None:
    model = _chain()
    editor = ModelEditor(model)
    editor.graph.set_initializer("w", np.full((3,), 5.0, np.float32))
    with pytest.raises(KeyError):
        editor.graph.set_initializer("missing", np.zeros(1, np.float32))
    out = editor.build()
    assert [t.name for t in out.graph.initializer] == ["w", "dead"]
    expected = numpy_helper.from_array(np.full((3,), 5.0, np.float32), "w")
    assert out.graph.initializer[0].SerializeToString() == expected.SerializeToString()
    assert numpy_helper.to_array(model.graph.initializer[0]).tolist() == [2.0]


def test_submodel_extractor_cuts_between_tensors() -> None:
    from quantcli.graph.editor import submodel_extractor
    from quantcli.graph.model_io import infer_shapes

    model, _ = infer_shapes(_chain())
    cut = submodel_extractor(model)(["a"], ["b"])
    assert [n.name for n in cut.graph.node] == ["m"]
    assert [i.name for i in cut.graph.input] == ["a"]
    assert [t.name for t in cut.graph.initializer] == ["w"]


def test_prune_keeps_an_initializer_that_is_a_graph_input() -> None:
    model = _chain()
    model.graph.input.append(helper.make_tensor_value_info("dead", TensorProto.FLOAT, [2]))
    editor = ModelEditor(model)
    editor.graph.prune_initializers()
    assert [t.name for t in editor.build().graph.initializer] == ["w", "dead"]  # an overridable input keeps its default


def test_augmented_adds_each_missing_output_once_and_leaves_the_model_alone() -> None:
    from quantcli.graph.session import augmented

    model = _chain()
    before = model.SerializeToString()
    inner = [n.output[0] for n in model.graph.node][:1]
    existing = model.graph.output[0].name
    aug = augmented(model, [*inner, existing])
    assert model.SerializeToString() == before
    assert [o.name for o in aug.graph.output] == [existing, *inner]
    assert not aug.graph.output[1].HasField("type")  # onnxruntime infers the type
    assert aug.graph.node == model.graph.node and aug.graph.initializer == model.graph.initializer
