"""``--mode fp16``: float16 weights and compute where it is safe; float32 model inputs and outputs.

Every node is put in one of three classes:

* **fp16 compute** (``FP16_OPS``: Conv, MatMul, Gemm, element-wise arithmetic, activations, pooling)
  and **data movement** (``FOLLOW_OPS``: Reshape, Transpose, Concat, Slice, ...; fp16 when their
  data input already is): float inputs are cast to float16 (constants converted once, offline);
  their float outputs are float16.
* **type-agnostic readers** (Shape, Size, Cast): read whatever type arrives.
* **float32**: everything else, in particular numerically sensitive ops (LayerNormalization,
  ReduceMean/ReduceSum, Softmax, Exp, Log, Pow, Sqrt, Reciprocal, Erf, ...), Resize (its scales and
  coordinate math must stay float32), ops with sub-graphs, and any op unknown here. A float16 input is
  cast back to float32 first.

Range: float16 holds |x| <= 65504 and flushes |x| < 2^-24 to zero. A node reading a constant outside
that range (e.g. a -3.4e38 attention mask, or an epsilon of 1e-12 that would become 0) stays float32;
after a too-large constant so does everything downstream until an op that bounds its output (Softmax,
Sigmoid, Tanh, Erf, LayerNormalization): the "wide" path never touches float16. ``Mul(x, x)`` is a
square like ``Pow`` and stays float32 too (it overflows float16 for |x| > 256).

Graph inputs stay float32 (a Cast to float16 is inserted before their first float16 reader) and graph
outputs stay float32 (a float16 producer writes a renamed tensor and a Cast restores the output). Each
(tensor, type) pair is cast at most once. Activations that overflow float16 at run time cannot be
seen without data: check with ``quantcli compare``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from quantcli.graph.editor import GraphEditor, ModelEditor, make_node
from quantcli.graph.index import GraphIndex
from quantcli.graph.model_io import infer_shapes
from quantcli.graph.scopes import subgraph_reads
from quantcli.modes.common import ConvertMode, ModeReport, add_constant, finish
from quantcli.static.plan import Skip, SkipCode

__all__ = ["FOLLOW_OPS", "FP16_OPS", "KEEP_FLOAT32_OPS", "convert_fp16"]

FP16_MAX = 65504.0
FP16_TINY = 2.0**-24

FP16_OPS = frozenset(
    {
        "Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Max", "Min",
        "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Where",
        "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
    }
)  # fmt: skip
FOLLOW_OPS = frozenset(
    {
        "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Slice", "Gather", "Split",
        "Expand", "Tile", "Identity", "Pad", "DepthToSpace", "SpaceToDepth",
    }
)  # fmt: skip
ANY_TYPE_OPS = frozenset({"Shape", "Size", "Cast"})
#: documented, not consulted: any op outside FP16_OPS/FOLLOW_OPS/ANY_TYPE_OPS stays float32
KEEP_FLOAT32_OPS = frozenset(
    {
        "LayerNormalization", "BatchNormalization", "InstanceNormalization", "GroupNormalization", "ReduceMean",
        "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "Softmax", "LogSoftmax", "Exp", "Log",
        "Pow", "Sqrt", "Reciprocal", "Erf", "Resize", "Upsample", "Range", "CumSum", "Einsum",
    }
)  # fmt: skip
#: ops whose float output is bounded whatever their input: a wide path ends there
BOUNDING_OPS = frozenset({"Softmax", "LogSoftmax", "Sigmoid", "Tanh", "Erf", "LayerNormalization", "HardSigmoid"})

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16


def _out_of_range(values: np.ndarray) -> str | None:
    """Why float16 cannot hold ``values``: "large" (overflow, inf/NaN), "small" (a small constant such as an
    epsilon flushed to zero), or None."""
    if values.dtype.kind != "f" or values.size == 0:
        return None
    mag = np.abs(values.astype(np.float64))
    if not np.all(np.isfinite(mag)) or float(mag.max()) > FP16_MAX:
        return "large"
    flushed = (mag > 0) & (mag < FP16_TINY)
    return "small" if values.size <= 16 and bool(flushed.any()) else None


@dataclass(slots=True)
class _Converter:
    index: GraphIndex
    edit: GraphEditor
    exclude: frozenset[str]
    exclude_op_types: frozenset[str] = frozenset()
    half: set[str] = field(default_factory=set)  # tensors (by original name) now float16
    renamed: dict[str, str] = field(default_factory=dict)  # graph output -> its float16 tensor
    wide: set[str] = field(default_factory=set)  # tensors that may exceed float16's range
    casts: dict[tuple[str, int], str] = field(default_factory=dict)
    half_constants: dict[str, str] = field(default_factory=dict)
    converted: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    subgraph_reads: set[str] = field(default_factory=set)

    def is_float_tensor(self, name: str) -> bool | None:
        """True/False when the original type is known, None when not."""
        if name in self.half:
            return True
        t = self.index.elem_types.get(name)
        return None if t is None else t == FLOAT

    def read_as(self, name: str, dtype: int, node: onnx.NodeProto) -> str:
        """The tensor to wire into ``node`` so that it reads ``name`` as ``dtype``."""
        if not name:
            return name
        current = HALF if name in self.half else FLOAT
        if current == dtype:
            return self.renamed.get(name, name)
        if dtype == HALF and self.index.is_constant(name):
            if name not in self.half_constants:
                values = self.index.constant(name).astype(np.float16)
                self.half_constants[name] = add_constant(self.edit, f"{name}_fp16", values)
            return self.half_constants[name]
        key = (name, dtype)
        if key not in self.casts:
            source = self.renamed.get(name, name)
            suffix = "fp16" if dtype == HALF else "fp32"
            out = self.edit.names.new(f"{name}_{suffix}")
            cast_name = self.edit.names.new(f"{name}_Cast_{suffix}")
            cast = make_node("Cast", [source], [out], name=cast_name, attrs={"to": dtype})
            self.edit.insert_before(node, [cast])
            self.casts[key] = out
        return self.casts[key]

    def decide(self, node: onnx.NodeProto) -> tuple[bool, str | None]:
        """(run in float16?, why not — for nodes a user could expect in float16)."""
        op = node.op_type
        if node.domain not in ("", "ai.onnx") or op not in FP16_OPS | FOLLOW_OPS:
            return False, None
        if node.name in self.exclude:
            return False, "excluded by --exclude-nodes"
        if op in self.exclude_op_types:
            return False, "op type excluded (--exclude-op-types)"
        if any(out in self.subgraph_reads for out in node.output):
            return False, "read inside a sub-graph"
        float_inputs = [i for i in node.input if i and self.is_float_tensor(i)]
        if any(i and self.is_float_tensor(i) is None for i in node.input):
            return False, "input type unknown (shape inference failed)"
        if not float_inputs:
            return False, None
        if any(i in self.wide for i in node.input):
            return False, "on a path fed by a constant outside float16's range"
        for i in float_inputs:
            if self.index.is_constant(i) and _out_of_range(self.index.constant(i)):
                return False, f"constant '{i}' is outside float16's range"
        if op == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1]:
            return False, "squares its input (float16 overflows above 256)"
        if op in FOLLOW_OPS:
            data = next((i for i in node.input if i and not self.index.is_constant(i)), None)
            return (data is not None and data in self.half), None
        return True, None

    def visit(self, node: onnx.NodeProto) -> None:
        to_half, reason = self.decide(node)
        if reason is not None and node.op_type in FP16_OPS:
            self.skipped.append(Skip(node.name, node.op_type, SkipCode.MODE_UNSUPPORTED, reason))
        if to_half:
            self.to_half(node)
            return
        if node.op_type in ANY_TYPE_OPS and node.domain in ("", "ai.onnx"):
            if any(i in self.renamed for i in node.input):
                self.edit.set_inputs(node, [self.renamed.get(i, i) for i in node.input])
            return
        # float32 node: float16 inputs are cast back; a wide input makes its outputs wide
        if any(i in self.half for i in node.input):
            self.edit.set_inputs(node, [self.read_as(i, FLOAT, node) if i in self.half else i for i in node.input])
        widened = any(i in self.wide for i in node.input) or any(
            i and self.index.is_constant(i) and _out_of_range(self.index.constant(i)) == "large" for i in node.input
        )
        if widened and node.op_type not in BOUNDING_OPS:
            self.wide.update(o for o in node.output if o and self.is_float_tensor(o) is not False)

    def to_half(self, node: onnx.NodeProto) -> None:
        inputs = [self.read_as(i, HALF, node) if i and self.is_float_tensor(i) else i for i in node.input]
        self.edit.set_inputs(node, inputs)
        tail = []
        for k, out in enumerate(list(node.output)):
            if not out:
                continue
            known = self.index.elem_types.get(out)
            is_float = known == FLOAT if known is not None else not (node.op_type == "MaxPool" and k == 1)
            if not is_float:
                continue
            self.half.add(out)
            if out in self.index.graph_outputs:
                inner = self.edit.names.new(f"{out}_fp16")
                self.edit.set_output(node, k, inner)
                self.renamed[out] = inner
                self.casts[(out, FLOAT)] = out
                cast = make_node("Cast", [inner], [out], name=self.edit.names.new(f"{out}_Cast"), attrs={"to": FLOAT})
                tail.append(cast)
        self.edit.insert_after(node, tail)
        self.converted.append((node.name, node.op_type, "float16"))


def convert_fp16(
    model: onnx.ModelProto,
    *,
    exclude_nodes: frozenset[str] = frozenset(),
    exclude_op_types: frozenset[str] = frozenset(),
) -> tuple[onnx.ModelProto, ModeReport]:
    """Float16 copy of ``model`` with float32 inputs/outputs and sensitive ops in float32 (see module docstring).

    ``exclude_nodes`` (names) and ``exclude_op_types`` stay float32 as well.
    """
    inferred, failure = infer_shapes(model)
    index = GraphIndex.build(inferred.graph)
    editor = ModelEditor(model)
    conv = _Converter(index, editor.graph, exclude_nodes, exclude_op_types, subgraph_reads=subgraph_reads(model.graph))
    for node in editor.graph.nodes:
        conv.visit(node)
    editor.graph.clear_value_info()  # types changed; onnxruntime re-infers them
    out = finish(editor)
    compute = [op for _, op, _ in conv.converted if op in FP16_OPS]
    notes = [
        f"{len(compute)} compute and {len(conv.converted) - len(compute)} data-movement nodes in float16; "
        f"{sum(1 for k in conv.casts if conv.casts[k] != k[0])} Cast nodes at float16/float32 boundaries",
    ]
    if conv.wide:
        notes.append(f"{len(conv.wide)} tensors kept float32 downstream of constants outside float16's range")
    if failure:
        notes.append(f"shape inference failed ({failure}); nodes with unknown input types stayed float32")
    return out, ModeReport(ConvertMode.FP16, tuple(conv.converted), tuple(conv.skipped), tuple(notes))
