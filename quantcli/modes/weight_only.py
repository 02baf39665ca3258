"""``--mode weight-only``: MatMul weights block-quantized to 4 or 8 bits in com.microsoft MatMulNBits.

Activations stay float. For ``Y = A @ W`` with a constant W [K, N], each column n of W is cut along
K into ``n_blocks = ceil(K / block_size)`` blocks (the last one zero-padded); block (n, b) has a
scale s[n, b] and a zero point z[n, b] (fixed at 2^(bits-1) when symmetric):

    W[k, n] ~ (q[n, k] - z[n, k // block_size]) * s[n, k // block_size],   0 <= q < 2^bits

The scale of each block minimises the block's squared error over a small, fixed grid of clip
ratios r (the rounding error of a narrower grid against the clipping error of the outliers):

    symmetric:  s = r * max|w| / 7  or  r * max|w| / 8  (int4: codes -8..7 stored as q = code + 8)
    asymmetric: [lo, hi] = r * [min(w, 0), max(w, 0)],  s = (hi - lo) / (2^bits - 1),  z = round(-lo / s)

Layout (onnxruntime's contrib op spec, checked numerically against its kernel in the tests):

    B            uint8 [N, n_blocks, blob_size], blob_size = block_size * bits / 8; 4-bit codes are
                 packed two per byte, the even k in the low nibble
    scales       float32 [N * n_blocks], column-major over blocks (n, then b)
    zero_points  uint8 [N * ceil(n_blocks / 2)] for 4 bits (two per byte, low nibble first, each
                 column padded to a whole byte), [N * n_blocks] for 8 bits; absent when symmetric

Gemm with a constant B (transA = 0) becomes the same op plus an Add of beta * C.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper

from quantcli.graph.editor import GraphEditor, ModelEditor, make_node
from quantcli.graph.index import GraphIndex
from quantcli.graph.model_io import infer_shapes
from quantcli.modes.common import ConvertMode, ModeReport, WeightOnlyType, add_constant, dense_weight_problem, finish
from quantcli.static.plan import Skip, SkipCode

__all__ = [
    "BLOCK_SIZES",
    "CLIP_RATIOS",
    "PackedWeight",
    "WeightOnlyOptions",
    "dequantize_packed",
    "pack_weight",
    "quantize_weight_only",
]

BLOCK_SIZES = (16, 32, 64, 128, 256)
#: clip ratios tried per block; 1.0 first so that ties keep the full range
CLIP_RATIOS = tuple(float(r) for r in np.round(np.arange(1.0, 0.599, -0.05), 2))
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True, slots=True)
class WeightOnlyOptions:
    """Choices of ``--mode weight-only``.

    Attributes:
        weight_type: int4/int8 (symmetric) or uint4/uint8 (per-block zero points).
        block_size: weights per block along K (a power of two, 16..256).
        accuracy_level: MatMulNBits' compute type: 0 unset (float), 1 fp32, 4 int8 (activations quantized per
            block at run time; measured no faster on AVX2 without VNNI, so not the default).
        op_types: which op types are rewritten (MatMul, Gemm).
        exclude_nodes: node names left float.
    """

    weight_type: WeightOnlyType = WeightOnlyType.INT4
    block_size: int = 32
    accuracy_level: int = 0
    op_types: frozenset[str] = frozenset({"MatMul", "Gemm"})
    exclude_nodes: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """The MatMulNBits inputs for one [K, N] weight."""

    b: npt.NDArray[np.uint8]
    scales: npt.NDArray[np.float32]
    zero_points: npt.NDArray[np.uint8] | None
    k: int
    n: int
    bits: int
    block_size: int


def _choose_blocks(blocks: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes, scales and zero points of ``blocks`` [..., block_size] with the smallest squared error."""
    levels = 2**bits - 1
    half = 2 ** (bits - 1)
    best_err = np.full(blocks.shape[:-1], np.inf)
    best_q = np.zeros(blocks.shape, dtype=np.uint8)
    best_s = np.ones(blocks.shape[:-1], dtype=np.float32)
    best_z = np.full(blocks.shape[:-1], half if symmetric else 0, dtype=np.int32)
    x = blocks.astype(np.float32)
    if symmetric:
        absmax = np.abs(x).max(axis=-1)
        candidates = [(r, d) for r in CLIP_RATIOS for d in (half - 1, half)]
    else:
        lo_full, hi_full = np.minimum(x.min(axis=-1), 0.0), np.maximum(x.max(axis=-1), 0.0)
        candidates = [(r, 0) for r in CLIP_RATIOS]
    for ratio, divisor in candidates:
        if symmetric:
            scale = (np.float32(ratio) * absmax / np.float32(divisor)).astype(np.float32)
            zero = np.full(scale.shape, half, dtype=np.int32)
        else:
            lo, hi = np.float32(ratio) * lo_full, np.float32(ratio) * hi_full
            scale = ((hi - lo) / np.float32(levels)).astype(np.float32)
            safe = np.where(scale > 0, scale, np.float32(1.0))
            zero = np.clip(np.rint(-lo / safe), 0, levels).astype(np.int32)
        scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)  # an all-zero block
        q = np.clip(np.rint(x / scale[..., None]) + zero[..., None], 0, levels)
        err = np.square((q - zero[..., None]) * scale[..., None] - x).sum(axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_q = np.where(better[..., None], q.astype(np.uint8), best_q)
        best_s = np.where(better, scale, best_s)
        best_z = np.where(better, zero, best_z)
    return best_q, best_s.astype(np.float32), best_z


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit codes per byte along the last axis (even index in the low nibble); odd length padded."""
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), dtype=codes.dtype)], axis=-1)
    return (codes[..., 0::2] & 0x0F | (codes[..., 1::2] & 0x0F) << 4).astype(np.uint8)


def pack_weight(weight: npt.ArrayLike, *, bits: int, block_size: int, symmetric: bool) -> PackedWeight:
    """Block-quantize a [K, N] weight into MatMulNBits' B, scales and zero points (see module docstring)."""
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D, got shape {w.shape}")
    if bits not in (4, 8) or block_size not in BLOCK_SIZES:
        raise ValueError(f"unsupported bits={bits} / block_size={block_size}")
    k, n = w.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n, n_blocks * block_size), dtype=np.float32)
    padded[:, :k] = w.T
    q, scales, zeros = _choose_blocks(padded.reshape(n, n_blocks, block_size), bits, symmetric)
    b = _pack_nibbles(q) if bits == 4 else q
    zp = None
    if not symmetric:
        zp = (_pack_nibbles(zeros.astype(np.uint8)) if bits == 4 else zeros.astype(np.uint8)).reshape(-1)
    return PackedWeight(
        b=np.ascontiguousarray(b, dtype=np.uint8),
        scales=scales.reshape(-1).astype(np.float32),
        zero_points=zp,
        k=k,
        n=n,
        bits=bits,
        block_size=block_size,
    )


def dequantize_packed(packed: PackedWeight) -> npt.NDArray[np.float32]:
    """The [K, N] float weight MatMulNBits computes with (the reference for tests)."""
    n, bs = packed.n, packed.block_size
    n_blocks = packed.b.shape[1]
    if packed.bits == 4:
        codes = np.stack([packed.b & 0x0F, packed.b >> 4], axis=-1).reshape(n, n_blocks, bs)
    else:
        codes = packed.b.reshape(n, n_blocks, bs)
    if packed.zero_points is None:
        zeros = np.full((n, n_blocks), 2 ** (packed.bits - 1), dtype=np.int32)
    elif packed.bits == 4:
        per_col = packed.zero_points.reshape(n, -1)
        zeros = np.stack([per_col & 0x0F, per_col >> 4], axis=-1).reshape(n, -1)[:, :n_blocks].astype(np.int32)
    else:
        zeros = packed.zero_points.reshape(n, n_blocks).astype(np.int32)
    scales = packed.scales.reshape(n, n_blocks)
    w = (codes.astype(np.int32) - zeros[..., None]).astype(np.float32) * scales[..., None]
    return np.ascontiguousarray(w.reshape(n, n_blocks * bs)[:, : packed.k].T)


@dataclass(slots=True)
class _Rewriter:
    """MatMul/Gemm -> MatMulNBits [-> Add bias], one packed copy per (weight, alpha, transB)."""

    index: GraphIndex
    edit: GraphEditor
    opts: WeightOnlyOptions
    converted: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    _cache: dict[tuple[str, float, bool], tuple[str, str, str | None, int, int]] = field(default_factory=dict)

    def packed(self, weight: str, alpha: float, trans_b: bool) -> tuple[str, str, str | None, int, int]:
        """Names of B, scales and zero points (or None), and K, N of the packed ``weight``."""
        key = (weight, alpha, trans_b)
        if key not in self._cache:
            opts, edit = self.opts, self.edit
            w = self.index.constant(weight).astype(np.float32)
            w = (w.T if trans_b else w) * np.float32(alpha)
            packed = pack_weight(
                w, bits=opts.weight_type.bits, block_size=opts.block_size, symmetric=opts.weight_type.symmetric
            )
            b_name = add_constant(edit, f"{weight}_nbits", packed.b)
            s_name = add_constant(edit, f"{weight}_nbits_scales", packed.scales)
            zp_name = (
                add_constant(edit, f"{weight}_nbits_zero_points", packed.zero_points)
                if packed.zero_points is not None
                else None
            )
            self._cache[key] = (b_name, s_name, zp_name, packed.k, packed.n)
        return self._cache[key]

    def visit(self, node: onnx.NodeProto) -> None:
        opts, edit, index = self.opts, self.edit, self.index
        if node.op_type not in opts.op_types or node.domain not in ("", "ai.onnx"):
            return
        if node.name in opts.exclude_nodes:
            self.skipped.append(Skip(node.name, node.op_type, SkipCode.NODE_EXCLUDED))
            return
        reason = dense_weight_problem(index, node)
        if reason:
            self.skipped.append(Skip(node.name, node.op_type, SkipCode.MODE_UNSUPPORTED, reason))
            return
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        b_name, s_name, zp_name, k, n = self.packed(
            node.input[1], float(attrs.get("alpha", 1.0)), bool(attrs.get("transB", 0))
        )
        base = node.name or node.output[0]
        inputs = [node.input[0], b_name, s_name] + ([zp_name] if zp_name else [])
        bias = None
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            c = index.constant(node.input[2]).astype(np.float32).reshape(-1)
            bias = np.broadcast_to(c, (n,)) * np.float32(attrs.get("beta", 1.0))
        out = node.output[0] if bias is None else edit.names.new(f"{node.output[0]}_nobias")
        nbits = {"K": k, "N": n, "bits": opts.weight_type.bits, "block_size": opts.block_size,
                 "accuracy_level": opts.accuracy_level}  # fmt: skip
        new = [make_node("MatMulNBits", inputs, [out], name=edit.names.new(f"{base}_MatMulNBits"), domain=MS_DOMAIN,
                         attrs=nbits)]  # fmt: skip
        if bias is not None:
            b = add_constant(edit, f"{base}_bias", np.ascontiguousarray(bias, dtype=np.float32))
            new.append(make_node("Add", [out, b], [node.output[0]], name=edit.names.new(f"{base}_bias_Add")))
        edit.replace(node, new)
        self.converted.append((node.name, node.op_type, "MatMulNBits"))


def quantize_weight_only(
    model: onnx.ModelProto, opts: WeightOnlyOptions | None = None
) -> tuple[onnx.ModelProto, ModeReport]:
    """Replace MatMul/Gemm with constant 2-D weights by MatMulNBits; returns a new model and a report."""
    opts = opts or WeightOnlyOptions()
    if opts.block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}")
    symmetric = opts.weight_type.symmetric
    inferred, _ = infer_shapes(model)
    editor = ModelEditor(model)
    rw = _Rewriter(GraphIndex.build(inferred.graph), editor.graph, opts)
    for node in editor.graph.nodes:
        rw.visit(node)
    if rw.converted:
        editor.use_domain(MS_DOMAIN, 1)
    out_model = finish(editor)
    fmt = f"{opts.weight_type} ({'symmetric' if symmetric else 'per-block zero points'})"
    notes = (
        f"weights {fmt}, block size {opts.block_size} along K, scale per block by least squared error over "
        f"{len(CLIP_RATIOS)} clip ratios; MatMulNBits accuracy_level={opts.accuracy_level}",
    )
    return out_model, ModeReport(ConvertMode.WEIGHT_ONLY, tuple(rw.converted), tuple(rw.skipped), notes)
