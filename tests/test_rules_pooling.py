"""The pooling rule: a pool measured slow on integers runs float, with the float neighbours onnxruntime needs.

The head of the PP-OCR direction classifier (``Conv -> HardSwish's /6 -> MaxPool -> GlobalAveragePool ->
... -> MatMul``) in small: its uint8 MaxPool took 118 us against 14 us float on an AVX512-VNNI host.
Leaving the MaxPool float by itself does not help, because onnxruntime moves the DequantizeLinear before it
past it and runs it on uint8 anyway (the failure below); the rule also leaves its producer's output float.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from quantcli.core.host import ConstantSpeedOracle, KernelKind, KernelShape, KernelSpeed, SpeedOracle
from quantcli.core.options import QuantConfig
from quantcli.passes.preprocess import preprocess
from quantcli.static.lowering import apply_plan
from quantcli.static.plan import QuantPlan, SkipCode
from quantcli.static.planning import make_plan
from quantcli.stats.calibration import calibrate
from quantcli.verify.kernel_speed import bucket, kernel_models
from tests.helpers import dataset, run, sqnr
from tests.models import make_model, structured_images

C = 16


@dataclass
class PoolOracle:
    """Answers MaxPool islands with ``ratio`` and every other shape with 1.0; records the pools asked."""

    ratio: float
    asked: list[KernelShape] = field(default_factory=list)

    def speed(self, shape: KernelShape) -> KernelSpeed | None:
        if shape.kind != KernelKind.MAX_POOL_ISLAND:
            return KernelSpeed(shape, 1.0, "on this host")
        self.asked.append(shape)
        return KernelSpeed(shape, self.ratio, "on this host")


def pool_head(seed: int = 0) -> onnx.ModelProto:
    """1x1 Conv -> Mul -> Div by 6 (a HardSwish tail) -> MaxPool 2x2/2 -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.normal(size=(C, 8, 1, 1)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array(np.array(6.0, np.float32), "six"),
        numpy_helper.from_array((rng.normal(size=(4, C)) * 0.3).astype(np.float32), "wf"),
        numpy_helper.from_array((rng.normal(size=(4,)) * 0.1).astype(np.float32), "bf"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv"),
        helper.make_node("Mul", ["c", "c"], ["m"], name="mul"),
        helper.make_node("Div", ["m", "six"], ["d"], name="div"),
        helper.make_node("MaxPool", ["d"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 16, 16])
    return make_model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)


def _prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    """Pre-processed, with inferred shapes (as convert plans it: the pool's channels are known)."""
    return onnx.shape_inference.infer_shapes(preprocess(model)[0])


def _plan(speed: SpeedOracle, config: QuantConfig | None = None) -> tuple[onnx.ModelProto, QuantPlan]:
    model = pool_head()
    prepared = _prepared(model)
    ranges = calibrate(prepared, dataset(model, {"x": structured_images(32, seed=1, channels=8)}), model_sha256="t")
    plan = make_plan(prepared, ranges.ranges, config or QuantConfig(), speed=speed)
    return apply_plan(prepared, plan), plan


def _maxpool_input_producer(model: onnx.ModelProto) -> str:
    """The op type writing the MaxPool's input once onnxruntime has optimized ``model`` (uint8: a Q/QLinear op)."""
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(opts.optimized_model_filepath)
    producers = {o: n.op_type for n in optimized.graph.node for o in n.output}
    pools = [n for n in optimized.graph.node if n.op_type == "MaxPool"]
    assert len(pools) == 1
    return producers.get(pools[0].input[0], "input")


def _on_uint8(producer: str) -> bool:
    return producer == "QuantizeLinear" or producer.startswith("QLinear")


def test_float_maxpool_alone_still_runs_on_uint8() -> None:
    """The failure: a MaxPool merely left float reads a DequantizeLinear, which onnxruntime moves past it."""
    quantized, plan = _plan(ConstantSpeedOracle(), QuantConfig(exclude_nodes=("pool",)))
    assert {s.node: s.code for s in plan.skipped}["pool"] == SkipCode.NODE_EXCLUDED
    assert _on_uint8(_maxpool_input_producer(quantized))


def test_maxpool_measured_slow_runs_float_with_its_producer() -> None:
    oracle = PoolOracle(0.3)
    quantized, plan = _plan(oracle)
    skips = {s.node: s for s in plan.skipped}
    assert skips["pool"].code == SkipCode.SLOW_POOLING
    assert "integer MaxPool measured 0.30x float on this host" in skips["pool"].reason
    assert oracle.asked and oracle.asked[0].dims[:5] == (C, C, 2, 2, 2)
    # the /6 no longer folds into the Mul's scale: it runs float and writes the MaxPool's float input
    assert "div" in skips and "div" not in dict(plan.quantized_nodes)
    assert dict(plan.quantized_nodes)["conv"] == "Conv" and dict(plan.quantized_nodes)["mul"] == "Mul"
    assert _maxpool_input_producer(quantized) == "Div"
    x = structured_images(8, seed=2, channels=8)
    assert sqnr(run(pool_head(), {"x": x})[0], run(quantized, {"x": x})[0]) > 25


def test_maxpool_measured_not_slower_stays_integer() -> None:
    quantized, plan = _plan(PoolOracle(1.2))
    assert "pool" in dict(plan.quantized_nodes)
    declined = [d for d in plan.declined if d.node == "pool" and d.rule == "pooling"]
    assert declined and "1.20x float on this host" in declined[0].rejection.reason
    assert _on_uint8(_maxpool_input_producer(quantized))


def test_constant_oracle_keeps_the_pool_integer() -> None:
    """The tests' oracle keeps today's plan (golden hashes do not depend on the host)."""
    _, plan = _plan(ConstantSpeedOracle())
    assert "pool" in dict(plan.quantized_nodes)
    assert "pool" not in {s.node for s in plan.skipped}


def test_maxpool_with_a_non_pool_reader_is_no_candidate() -> None:
    """A QuantizeLinear after a float MaxPool would be moved before it: only pooling readers qualify."""
    model = pool_head()
    gap = next(n for n in model.graph.node if n.name == "gap")
    gap.input[0] = "pr"  # MaxPool -> Relu -> GlobalAveragePool: no float island to make
    model.graph.node.insert(5, helper.make_node("Relu", ["p"], ["pr"], name="relu"))
    prepared = _prepared(model)
    ranges = calibrate(prepared, dataset(model, {"x": structured_images(16, seed=1, channels=8)}), model_sha256="t")
    oracle = PoolOracle(0.3)
    plan = make_plan(prepared, ranges.ranges, QuantConfig(), speed=oracle)
    assert not oracle.asked
    assert "pool" not in {s.node for s in plan.skipped if s.code == SkipCode.SLOW_POOLING}


def test_pool_island_forms_measure_what_they_say() -> None:
    """The float form runs its MaxPool on float, the integer form on uint8."""
    shape = bucket(KernelShape(KernelKind.MAX_POOL_ISLAND, (200, 200, 2, 2, 2, 0, 0)))
    assert shape.dims == (200, 200, 2, 2, 2, 224, 224)  # unknown sides at 224
    assert shape.describe() == "1x200x224x224 -> max-pool 2x2/2"
    reference, candidate, _ = kernel_models(shape)
    assert _maxpool_input_producer(reference) == "Relu"
    assert _on_uint8(_maxpool_input_producer(candidate))
    for kind, op in ((KernelKind.GLOBAL_POOL_ISLAND, "QLinearGlobalAveragePool"),):
        _, cand, feed = kernel_models(KernelShape(kind, (16, 16, 0, 0, 1, 8, 8)))
        sess = ort.InferenceSession(cand.SerializeToString(), providers=["CPUExecutionProvider"])
        assert sess.run(None, feed)[0].shape == (1, 16, 1, 1), op
