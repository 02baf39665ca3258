"""``--mode dynamic``: int8 weights quantized offline, activations quantized at run time.

No calibration: each activation's range is measured on every run by DynamicQuantizeLinear
(uint8, asymmetric, zero always exact). For ``Y = A @ W`` with a constant W [K, N]:

    a_q, s_a, z_a = DynamicQuantizeLinear(A)
    W_q = round(W / s_w)     s_w[n] = max_k |W[k, n]| / qmax       (symmetric, per column)
    Y   = float(MatMulInteger(a_q, W_q, z_a, z_w)) * (s_a * s_w)  [+ bias]

which is the sub-graph onnxruntime's CPU provider fuses into MatMulIntegerToFloat (and, with the
DynamicQuantizeLinear in front, into DynamicQuantizeMatMul). The weight zero point is one scalar
(0 for int8, 128 for uint8) so the per-column scales live only in the final Mul, which the fused
kernels take as a vector. Gemm with constant B becomes the same pattern (alpha folded into W, beta*C
into the bias Add); Conv can become ConvInteger (``op_types`` containing "Conv"):

    Y = float(ConvInteger(x_q, W_q, z_x, z_w)) * (s_x * s_w[c]) + b[c]

Weight integer type: on x86 without VNNI, onnxruntime's u8*s8 kernels sum pairs of products in
saturating int16 (255 * 127 * 2 > 32767), so ``weight_type`` uint8 (u8*u8 kernels, no saturation)
or 7-bit int8 (``reduce_range``) keep the result exact; the caller picks per host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from quantcli.core.errors import UnsupportedModelError
from quantcli.core.host import detect_host
from quantcli.core.options import QuantDType
from quantcli.core.qmath import params_from_range, quantize
from quantcli.graph.editor import GraphEditor, ModelEditor, make_node
from quantcli.graph.index import GraphIndex
from quantcli.graph.model_io import infer_shapes
from quantcli.modes.common import (
    ConvertMode,
    ModeReport,
    add_constant,
    constant_weight_problem,
    dense_weight_problem,
    finish,
)
from quantcli.static.plan import QuantPlan, Skip, SkipCode

__all__ = ["DEFAULT_OP_TYPES", "DynamicOptions", "default_options", "lower_dynamic_nodes", "quantize_dynamic"]

#: Conv is opt-in: ConvInteger is not a fused kernel in onnxruntime (im2col + integer GEMM, then
#: separate Cast/Mul/Add) and measured slower than float Conv on the models tried (see README)
DEFAULT_OP_TYPES = frozenset({"MatMul", "Gemm"})
SUPPORTED_OP_TYPES = frozenset({"MatMul", "Gemm", "Conv"})


@dataclass(frozen=True, slots=True)
class DynamicOptions:
    """Choices of ``--mode dynamic``.

    Attributes:
        weight_type: int8 (symmetric, zero point 0) or uint8 (symmetric around 128).
        per_channel: one scale per output column/channel (otherwise one per tensor).
        reduce_range: 7-bit weights.
        op_types: which op types are rewritten (subset of MatMul, Gemm, Conv).
        exclude_nodes: node names left float (exact names; patterns are resolved by the caller).
        only_nodes: when given, only these node names are rewritten (a static plan's dynamic nodes).
    """

    weight_type: QuantDType = QuantDType.INT8
    per_channel: bool = True
    reduce_range: bool = False
    op_types: frozenset[str] = DEFAULT_OP_TYPES
    exclude_nodes: frozenset[str] = frozenset()
    only_nodes: frozenset[str] | None = None


def default_options() -> DynamicOptions:
    """int8 weights, 7-bit on x86 without VNNI (measured on the bundled transformer, AVX2: 9.3 dB output
    SQNR with 8-bit weights, 37.5 dB with 7-bit, 38.8 dB with uint8 weights, which run 1.2-1.4x slower)."""
    return DynamicOptions(reduce_range=detect_host().reduce_range)


def _weight(w: np.ndarray, axis: int | None, opts: DynamicOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantized weight, per-axis scale (or scalar) and the scalar zero point."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None or not opts.per_channel:
        rmin, rmax, axis = float(w.min()), float(w.max()), None
    else:
        moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        rmin, rmax = moved.min(axis=1), moved.max(axis=1)
    params = params_from_range(rmin, rmax, opts.weight_type, symmetric=True, reduce_range=opts.reduce_range, axis=axis)
    q = quantize(w, params)
    zp = np.asarray(params.zero_point.reshape(-1)[0] if params.zero_point.ndim else params.zero_point)
    return q, params.scale, zp.astype(q.dtype)


@dataclass(slots=True)
class _Rewriter:
    index: GraphIndex
    edit: GraphEditor
    opts: DynamicOptions
    converted: list[tuple[str, str, str]]
    skipped: list[Skip]
    _dynamic: dict[str, tuple[str, str, str]]
    _weights: dict[tuple[str, str], tuple[str, str, np.ndarray]]

    def weight(self, key: tuple[str, str], w: np.ndarray, axis: int) -> tuple[str, str, np.ndarray]:
        """Quantized weight and zero point initializers and the scale; one copy per shared weight."""
        if key not in self._weights:
            q, scale, zp = _weight(w, axis, self.opts)
            w_name = add_constant(self.edit, f"{key[0]}_quantized", q)
            zp_name = add_constant(self.edit, f"{key[0]}_zero_point", zp)
            self._weights[key] = (w_name, zp_name, scale)
        return self._weights[key]

    def dynamic_quant(self, tensor: str, before: onnx.NodeProto) -> tuple[str, str, str]:
        """One DynamicQuantizeLinear per activation, emitted before its first quantized reader."""
        if tensor not in self._dynamic:
            names = self.edit.names
            out = (names.new(f"{tensor}_quantized"), names.new(f"{tensor}_scale"), names.new(f"{tensor}_zero_point"))
            node = make_node(
                "DynamicQuantizeLinear", [tensor], list(out), name=names.new(f"{tensor}_DynamicQuantizeLinear")
            )
            self.edit.insert_before(before, [node])
            self._dynamic[tensor] = out
        return self._dynamic[tensor]

    def integer_tail(
        self, node: onnx.NodeProto, integer_op: str, inputs: list[str], scale: np.ndarray, a_scale: str,
        bias: np.ndarray | None, attrs: dict[str, Any], scale_shape: tuple[int, ...],
    ) -> list[onnx.NodeProto]:  # fmt: skip
        """integer_op -> Cast -> Mul(s_a * s_w) [-> Add bias], writing ``node``'s output."""
        names, base, output = self.edit.names, node.name or node.output[0], node.output[0]
        s_w = add_constant(self.edit, f"{base}_weight_scale", scale.astype(np.float32).reshape(scale_shape))
        y_int, y_f, s = names.new(f"{output}_int32"), names.new(f"{output}_float"), names.new(f"{output}_scale")
        y_scaled = names.new(f"{output}_scaled") if bias is not None else output
        nodes = [
            make_node(integer_op, inputs, [y_int], name=names.new(f"{base}_{integer_op}"), attrs=attrs),
            make_node("Cast", [y_int], [y_f], name=names.new(f"{base}_Cast"), attrs={"to": TensorProto.FLOAT}),
            make_node("Mul", [a_scale, s_w], [s], name=names.new(f"{base}_scale_Mul")),
            make_node("Mul", [y_f, s], [y_scaled], name=names.new(f"{base}_Mul")),
        ]
        if bias is not None:
            b_shape = (1, -1, *([1] * (len(scale_shape) - 2))) if integer_op == "ConvInteger" else (-1,)
            b = add_constant(self.edit, f"{base}_bias", bias.astype(np.float32).reshape(b_shape))
            nodes.append(make_node("Add", [y_scaled, b], [output], name=names.new(f"{base}_bias_Add")))
        return nodes

    def matmul(self, node: onnx.NodeProto, key: tuple[str, str], w: np.ndarray, bias: np.ndarray | None) -> None:
        """A @ W (W constant [K, N]) as the MatMulIntegerToFloat pattern."""
        w_name, zp_name, scale = self.weight(key, w, 1)
        a_q, a_scale, a_zp = self.dynamic_quant(node.input[0], node)
        shape = (-1,) if scale.ndim else ()
        nodes = self.integer_tail(node, "MatMulInteger", [a_q, w_name, a_zp, zp_name], scale, a_scale, bias, {}, shape)
        self.edit.replace(node, nodes)

    def conv(self, node: onnx.NodeProto, w: np.ndarray, bias: np.ndarray | None) -> None:
        """Conv as DynamicQuantizeLinear -> ConvInteger -> Cast -> Mul [-> Add]."""
        w_name, zp_name, scale = self.weight((node.input[1], "conv"), w, 0)
        x_q, x_scale, x_zp = self.dynamic_quant(node.input[0], node)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        rank = w.ndim
        shape = (1, -1, *([1] * (rank - 2))) if scale.ndim else ()
        nodes = self.integer_tail(node, "ConvInteger", [x_q, w_name, x_zp, zp_name], scale, x_scale, bias, attrs, shape)
        self.edit.replace(node, nodes)

    def visit(self, node: onnx.NodeProto) -> None:
        if node.op_type not in self.opts.op_types or node.domain not in ("", "ai.onnx"):
            return
        if self.opts.only_nodes is not None and node.name not in self.opts.only_nodes:
            return
        if node.name in self.opts.exclude_nodes:
            self.skipped.append(Skip(node.name, node.op_type, SkipCode.NODE_EXCLUDED))
            return
        reason = self.check(node)
        if reason:
            self.skipped.append(Skip(node.name, node.op_type, SkipCode.MODE_UNSUPPORTED, reason))
            return
        idx = self.index
        if node.op_type == "MatMul":
            self.matmul(node, (node.input[1], "matmul"), idx.constant(node.input[1]), None)
            self.converted.append((node.name, node.op_type, "MatMulInteger"))
        elif node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            w = idx.constant(node.input[1]).astype(np.float32)
            w = (w.T if attrs.get("transB", 0) else w) * np.float32(attrs.get("alpha", 1.0))
            bias = None
            if len(node.input) > 2 and node.input[2]:
                n = w.shape[1]
                bias = np.broadcast_to(idx.constant(node.input[2]).astype(np.float32).reshape(-1), (n,))
                bias = bias * np.float32(attrs.get("beta", 1.0))
            key = (node.input[1], f"gemm/{attrs.get('transB', 0)}/{attrs.get('alpha', 1.0)}")
            self.matmul(node, key, w, bias)
            self.converted.append((node.name, node.op_type, "MatMulInteger"))
        else:
            bias = idx.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            self.conv(node, idx.constant(node.input[1]), bias)
            self.converted.append((node.name, node.op_type, "ConvInteger"))

    def check(self, node: onnx.NodeProto) -> str | None:
        """Why ``node`` cannot take the integer pattern, or None."""
        idx = self.index
        if node.op_type in ("MatMul", "Gemm"):
            reason = dense_weight_problem(idx, node)
            if reason is None and node.op_type == "Gemm":
                transb = any(a.name == "transB" and a.i for a in node.attribute)
                w = idx.constant(node.input[1])
                if len(node.input) > 2 and node.input[2] and (w.shape[0] if transb else w.shape[1]) == 1:
                    return "a single output column"
            return reason
        problem = constant_weight_problem(idx, node)
        if problem is not None:
            return problem
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return "auto_pad is not supported by ConvInteger's fusion-free path"
        if len(node.input) > 2 and node.input[2] and not idx.is_constant(node.input[2]):
            return "bias is not a constant"
        return None


def quantize_dynamic(model: onnx.ModelProto, opts: DynamicOptions | None = None) -> tuple[onnx.ModelProto, ModeReport]:
    """Rewrite MatMul/Gemm (and Conv if asked) with constant weights for run-time activation quantization.

    Returns a new model (``model`` is not modified) and what was rewritten or skipped.
    """
    opts = opts or default_options()
    unknown = set(opts.op_types) - SUPPORTED_OP_TYPES
    if unknown:
        raise ValueError(f"dynamic mode cannot quantize {sorted(unknown)}")
    inferred, _ = infer_shapes(model)
    index = GraphIndex.build(inferred.graph)
    editor = ModelEditor(model)
    rw = _Rewriter(index, editor.graph, opts, [], [], {}, {})
    for node in editor.graph.nodes:
        rw.visit(node)
    out = finish(editor)
    wt = f"{opts.weight_type}{' (7-bit: --reduce-range)' if opts.reduce_range else ''}"
    notes = (
        f"weights {wt}, {'per-channel' if opts.per_channel else 'per-tensor'}; activations uint8 quantized at "
        "run time (DynamicQuantizeLinear)",
    )
    return out, ModeReport(ConvertMode.DYNAMIC, tuple(rw.converted), tuple(rw.skipped), notes)


def lower_dynamic_nodes(model: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
    """Rewrite the static plan's ``dynamic_nodes`` of a lowered QDQ ``model`` for run-time activation quantization.

    The static lowering's dynamic hook (``quantcli.static.lowering.apply_plan(..., dynamic=...)``): the
    nodes read float tensors there, and become this mode's pattern with the plan's weight choices
    (int8 unless the plan's weights are uint8, per channel unless per-tensor, 7-bit if ``reduce_range``).

    Raises:
        UnsupportedModelError: a planned node could not be rewritten (planning checks the same things).
    """
    config = plan.config
    weight_type = config.weight_type if config.weight_type in (QuantDType.INT8, QuantDType.UINT8) else QuantDType.INT8
    opts = DynamicOptions(
        weight_type=weight_type,
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
        op_types=frozenset({"MatMul", "Gemm"}),
        only_nodes=frozenset(plan.dynamic_nodes),
    )
    out, report = quantize_dynamic(model, opts)
    missing = sorted(set(plan.dynamic_nodes) - {name for name, _, _ in report.converted})
    if missing:
        reasons = "; ".join(f"{s.node}: {s.reason}" for s in report.skipped if s.node in missing)
        raise UnsupportedModelError(f"run-time activation quantization failed for {missing}: {reasons or 'not found'}")
    return out
