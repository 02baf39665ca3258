"""``above_protobuf_limit`` answers from an upper bound of the model's serialized size when that is far
below 2 GB, without serializing the weights (``ByteSize()`` copies them all): the bound must never be
below the real size, whatever field the values live in."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantcli.graph import model_io
from tests.conftest import SAMPLE_MODELS


def _model_with(initializers: list[TensorProto]) -> onnx.ModelProto:
    then = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [3])],
        [numpy_helper.from_array(np.arange(3, dtype=np.float32), "c")],
    )
    other = helper.make_graph(
        [helper.make_node("Constant", [], ["e"], value=numpy_helper.from_array(-np.ones(3, np.float32)))],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [3])],
    )
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_bound_is_never_below_the_serialized_size():
    rng = np.random.default_rng(0)
    tensors = [
        numpy_helper.from_array(rng.normal(size=(64, 64)).astype(np.float32), "raw_f32"),
        helper.make_tensor("i8_varints", TensorProto.INT8, [4096], [-1] * 4096),  # 10 bytes a value
        helper.make_tensor("i64", TensorProto.INT64, [512], [-(2**40)] * 512),
        helper.make_tensor("f32_field", TensorProto.FLOAT, [256], [0.5] * 256),
        helper.make_tensor("f16_field", TensorProto.FLOAT16, [300], [65504.0] * 300),
        helper.make_tensor("s", TensorProto.STRING, [2], [b"x" * 5000, b"y"]),
        helper.make_tensor("scalar", TensorProto.DOUBLE, [], [1.0]),
    ]
    for tensor in tensors:
        model = _model_with([tensor])
        assert model_io._size_bound(model) >= model.ByteSize(), tensor.name
    model = _model_with(tensors)
    bound = model_io._size_bound(model)
    assert model.ByteSize() <= bound <= model.ByteSize() + 64 * 1024 + 1024 * len(tensors) + 40_000


def test_real_models_bound_tightly_and_answer_as_before():
    for path in sorted(SAMPLE_MODELS.glob("*.onnx")):
        model = onnx.load(str(path))
        size, bound = model.ByteSize(), model_io._size_bound(model)
        assert size <= bound <= size * 1.2 + 128 * 1024, path.name
        assert model_io.above_protobuf_limit(model) is False


def test_a_bound_above_the_limit_falls_back_to_the_exact_size():
    # dims that claim 3 billion values of a weight whose bytes are not there: the bound says "above", the
    # exact size (a few bytes) says below, and the exact answer wins
    claimed = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[3_000_000_000])
    claimed.raw_data = b""
    model = _model_with([claimed])
    assert model_io._size_bound(model) >= model_io.PROTOBUF_LIMIT
    assert model_io.above_protobuf_limit(model) is False
