"""Per-layer error: where in the network the quantized model drifts from FP32, and why.

For every activation the quantized model quantizes, the FP32 value of that tensor is compared with
the quantized model's DequantizeLinear output of the same tensor (accumulated error: everything
upstream is quantized too). For the layer that produces it, the error *in isolation* is measured
as well: the layer's quantized sub-graph (its weights and input Q/DQ, and its output Q/DQ) is cut out
and fed the FP32 inputs, so a layer that loses precision itself is told from one that inherits
error from upstream.

Two passes under ``max_memory`` (``compare --max-memory``, default ``DEFAULT_MEMORY_BUDGET``; Ray shards
share it). Pass 1 (``layer_statistics``) streams the data through both models with every compared tensor
returned, through the statistics collector (``quantcli.stats.collector``), at the batch whose tensors fit the
budget (measured on the first sample; onnxruntime's working memory follows them, so the peak follows the
budget, not ``--batch-size``); per tensor it keeps each sample's signal and noise energies added exactly
(``ExactSum``: the same bits at any batch, and shards merge to the bit) and the min/max, no values. Pass 2
(``layer_errors``) runs the reference again on the first batch of the size asked for only (at pass 1's
batch, the runs joined), a group of tensors at a time, for the range hints (99.9th percentile, histogram)
and the errors in isolation. Both models are optimized once with every compared tensor exposed and then
run with only a group's tensors returned (``LayerModels``), so every group computes the same values: the
numbers do not depend on the budget (beyond onnxruntime's own rounding at another batch).

Tensors inside If/Loop/Scan subgraphs are compared too: both models get them carried out as
main-graph outputs (``quantcli.graph.subgraphs.expose_subgraph_tensors``, as calibration does); a batch
in which a branch did not run contributes nothing to its tensors. Their error in isolation is not
measured (a layer inside a branch is not cut out alone), so ``local_sqnr_db`` is None for them.

A tensor whose only DequantizeLinear reads it on another scale (a product or quotient by a positive
constant folded into the scale, ``quantcli.static.rules.rescale``: a HardSwish's ``/6``) holds
``y / 6`` there, not ``y``; compared with FP32's ``y`` every such tensor would read 1.6 dB
(``20*log10(6/5)``). The comparison reads it through a DequantizeLinear on its own QuantizeLinear's
scale and zero point instead, added to the copy of the model that is run.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import cast

import numpy as np
import onnx
import onnxruntime as ort

from quantcli.compare.evaluate import sample_energies
from quantcli.compare.exact_sum import ExactSum
from quantcli.core.progress import Progress, no_progress
from quantcli.core.units import byte_text
from quantcli.data.datasets import Dataset
from quantcli.graph.editor import ModelEditor, make_node, submodel_extractor
from quantcli.graph.gates import sigmoid_gates
from quantcli.graph.model_io import infer_shapes
from quantcli.graph.scopes import elem_types, has_subgraphs, walk_graphs
from quantcli.graph.session import augmented, make_session, pinned
from quantcli.graph.subgraphs import expose_subgraph_tensors
from quantcli.stats.collector import CollectOptions, ErrorRequest, collect

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "LayerError",
    "LayerModels",
    "LayerStatistics",
    "layer_errors",
    "layer_memory_budget",
    "layer_models",
    "layer_statistics",
    "per_layer_errors",
    "plan_first_groups",
    "streamed_local_errors",
]


@dataclass(frozen=True, slots=True)
class LayerError:
    """Error of one quantized tensor, accumulated and in isolation, with a hint for the user."""

    tensor: str
    node: str
    op_type: str
    sqnr_db: float
    local_sqnr_db: float | None
    clip_low: float
    clip_high: float
    observed_min: float
    observed_max: float
    p999_abs: float
    hint: str
    #: histogram of the FP32 values on the first batch: bin edges and counts (for the HTML report)
    hist_edges: tuple[float, ...] = ()
    hist_counts: tuple[int, ...] = ()
    #: the grid's bottom when only a Sigmoid or SiLU reads the tensor and nothing below it matters to them
    #: (``_sigmoid_floors``): both models' values were compared above it
    floor: float | None = None


@dataclass(slots=True)
class _Pair:
    q: str  # quantized tensor name in the QDQ model (QuantizeLinear output)
    dq: str  # DequantizeLinear output
    scale: float
    zero_point: int
    qmin: int
    qmax: int
    #: the QuantizeLinear's scale and zero point inputs, when its only DequantizeLinear reads another grid
    own_grid: tuple[str, ...] = ()
    #: compare above this value (``_sigmoid_floors``), None: compare all of it
    floor: float | None = None


def _qdq_pairs(model: onnx.ModelProto) -> dict[str, _Pair]:
    """FP32 tensor name -> its Q/DQ pair in the quantized model (main graph and subgraphs)."""
    graphs = [g for _, g in walk_graphs(model.graph)]
    inits = {t.name: onnx.numpy_helper.to_array(t) for g in graphs for t in g.initializer}
    nodes = [n for g in graphs for n in g.node]
    by_input: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            by_input.setdefault(name, []).append(node)
    pairs: dict[str, _Pair] = {}
    for node in nodes:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits:
            continue
        dqs = [n for n in by_input.get(node.output[0], []) if n.op_type == "DequantizeLinear"]
        if not dqs or node.input[1] not in inits:
            continue
        scale = inits[node.input[1]]
        if scale.size != 1:
            continue
        zp = inits[node.input[2]] if len(node.input) > 2 and node.input[2] in inits else np.uint8(0)
        info = np.iinfo(zp.dtype)
        own = [d for d in dqs if _same_grid(d, node, inits)]
        grid = () if own else tuple(node.input[1:])
        dq = (own or dqs)[0].output[0]
        pairs[node.input[0]] = _Pair(node.output[0], dq, float(scale), int(zp), info.min, info.max, grid)
    return pairs


#: below this a Sigmoid reads less than 1/400, under half a step of its [0, 1] output on 256 levels
SIGMOID_DEAD = -6.0


def _sigmoid_floors(reference: onnx.ModelProto, pairs: dict[str, _Pair]) -> None:
    """Set ``floor`` on each pair whose FP32 tensor only Sigmoids of it and SiLUs (``x * Sigmoid(x)``)
    read, when its grid starts at or below ``SIGMOID_DEAD``: the ``sigmoid-floor`` rule's tensors.

    Below the grid's bottom both models' Sigmoids read about 0 and the SiLUs about 0, so the values there
    are no error; measured on them, NudeNet's first SiLU inputs read 6 dB (the observed minimum -184,
    the grid's bottom -6.7) and the hints asked to keep those Convs float."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for _, graph in walk_graphs(reference.graph):
        for node in graph.node:
            for name in node.input:
                readers.setdefault(name, []).append(node)
    for t, pair in pairs.items():
        sigmoids, other = sigmoid_gates(t, readers.get(t, []))
        bottom = (pair.qmin - pair.zero_point) * pair.scale
        if sigmoids and other is None and bottom <= SIGMOID_DEAD:
            pair.floor = bottom


def _energies(ref: np.ndarray, got: np.ndarray, floor: float | None) -> tuple[list[float], list[float]]:
    """Each sample's signal and noise energy of ``got`` against ``ref``, both raised to ``floor`` first
    when there is one (``_sigmoid_floors``)."""
    if floor is not None:
        ref, got = np.maximum(ref, floor), np.maximum(got, floor)
    return sample_energies(ref), sample_energies(ref, got.astype(np.float64))


def _same_grid(dq: onnx.NodeProto, q: onnx.NodeProto, inits: dict[str, np.ndarray]) -> bool:
    """True when ``dq`` reads on ``q``'s scale and zero point (the same names, or equal constants)."""
    for pos in (1, 2):
        a = q.input[pos] if len(q.input) > pos else ""
        b = dq.input[pos] if len(dq.input) > pos else ""
        if a == b:
            continue
        if a not in inits or b not in inits or not np.array_equal(inits[a], inits[b]):
            return False
    return True


def _read_on_own_grid(model: onnx.ModelProto, pairs: dict[str, _Pair]) -> onnx.ModelProto:
    """A copy of ``model`` where each main-graph pair read only on another grid gets a DequantizeLinear on
    its own (inserted after its QuantizeLinear); ``pairs`` then name that one (see the module docstring)."""
    main_q = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    todo = {t: p for t, p in pairs.items() if p.own_grid and p.q in main_q}
    if not todo:
        return model
    editor = ModelEditor(model)
    q_nodes = {n.output[0]: n for n in editor.graph.nodes if n.op_type == "QuantizeLinear"}
    for t, p in todo.items():
        name = editor.names.new(f"{p.q}_own_grid")
        editor.graph.insert_after(q_nodes[p.q], [make_node("DequantizeLinear", [p.q, *p.own_grid], [name], name=name)])
        pairs[t] = replace(p, dq=name)
    return editor.build()


def _exposed(model: onnx.ModelProto, names: list[str]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` returning ``names`` (the calibration's augmentation), and the output name of
    each: its own in the main graph, the carried-out name for one inside a subgraph (absent: not exposed)."""
    main = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    outputs = {t: t for t in names if t in main}
    inner = [t for t in names if t not in main]
    if inner and has_subgraphs(model.graph):
        try:
            exposed = expose_subgraph_tensors(model, elem_types(infer_shapes(model)[0]))
        except Exception:  # never block the report: subgraph tensors are then left out
            exposed = None
        if exposed is not None:
            carried = {inside: out for out, inside in exposed.names.items()}
            outputs.update({t: carried[t] for t in inner if t in carried})
            model = exposed.model
    return augmented(model, list(outputs.values())), outputs


def _sqnr(signal: float, noise: float) -> float:
    if noise <= 0:
        return math.inf
    if signal <= 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


#: bytes of exposed activations the per-layer comparison holds at once by default (``compare --max-memory``):
#: on PP-OCRv4 rec at batch 8, a quarter of the memory available (the budget before) held every tensor in
#: one group, 2.9 GB at peak
DEFAULT_MEMORY_BUDGET = 512 << 20


def layer_memory_budget(max_memory: int | None = None, *, shards: int = 1) -> int:
    """Bytes of exposed activations one process may hold: ``max_memory`` (None: ``DEFAULT_MEMORY_BUDGET``),
    split evenly between ``shards`` processes that may share a host (Ray shard tasks)."""
    return max(1, (max_memory or DEFAULT_MEMORY_BUDGET) // max(1, shards))


@dataclass(frozen=True, slots=True)
class LayerModels:
    """Both models as the per-layer comparison runs them, built once per process (``layer_models``).

    Attributes:
        reference: the FP32 model, returning every compared tensor (``ref_out`` names the output of each).
        quantized: the quantized model read on its own grids (``_read_on_own_grid``), for the layers cut out alone.
        quantized_exposed: ``quantized`` returning every compared tensor's DequantizeLinear (``q_out``).
        pairs: FP32 tensor -> its Q/DQ pair in ``quantized``.
        names: the compared tensors, in the quantized model's order.
        main: the reference's main-graph tensors (graph inputs included).
        optimize: let onnxruntime optimize ``reference`` and ``quantized_exposed`` (False: they are pinned).

    ``reference`` and ``quantized_exposed`` are pinned when they can be (``quantcli.graph.session.pinned``):
    optimized with every compared tensor exposed, then returning their own outputs only; a memory group
    adds back the tensors it reads. So every group runs the same kernels (the numbers do not depend on
    the grouping) while onnxruntime holds only the group's tensors, not all of them, until a run ends.
    """

    reference: onnx.ModelProto
    quantized: onnx.ModelProto
    quantized_exposed: onnx.ModelProto
    pairs: dict[str, _Pair]
    names: list[str]
    main: set[str]
    ref_out: dict[str, str]
    q_out: dict[str, str]
    optimize: bool = True


def layer_models(reference: onnx.ModelProto, quantized: onnx.ModelProto) -> LayerModels:
    """The models both per-layer passes run (neither input is modified)."""
    pairs = _qdq_pairs(quantized)
    _sigmoid_floors(reference, pairs)
    quantized = _read_on_own_grid(quantized, pairs)
    ref_producers = {o for _, g in walk_graphs(reference.graph) for n in g.node for o in n.output}
    graph_inputs = {i.name for i in reference.graph.input}
    names = [t for t in pairs if t in ref_producers or t in graph_inputs]
    main = {o for n in reference.graph.node for o in n.output} | graph_inputs
    if not names:
        return LayerModels(reference, quantized, quantized, pairs, [], main, {}, {})
    ref_model, ref_out = _exposed(reference, names)
    q_model, q_out = _exposed(quantized, [pairs[t].dq for t in names])
    names = [t for t in names if t in ref_out and pairs[t].dq in q_out]
    ref_pinned = pinned(ref_model, [o.name for o in reference.graph.output])
    q_pinned = pinned(q_model, [o.name for o in quantized.graph.output]) if ref_pinned is not None else None
    if ref_pinned is None or q_pinned is None:  # above 2 GB: every group runs the models exposing every tensor
        return LayerModels(ref_model, quantized, q_model, pairs, names, main, ref_out, q_out)
    return LayerModels(ref_pinned, quantized, q_pinned, pairs, names, main, ref_out, q_out, optimize=False)


@dataclass(slots=True)
class _LayerSums:
    """Pass 1's state of one tensor: O(1) in the data.

    Each sample's signal and noise energies (``sample_energies``) are added exactly (``ExactSum``), so
    the sums are the same to the bit whatever the batch pass 1 ran at, and shards over contiguous blocks
    of batches merge into the one-process sums to the bit. No values are kept: ``first_batch`` says
    which batch (of pass 1's) the hints read again in pass 2 (the first one for a main-graph tensor;
    else the first in which it was compared), ``first_bytes`` how large it is.
    """

    keep_first_empty: bool = True
    floor: float | None = None  # both models compared above it (``_sigmoid_floors``)
    signal_sum: ExactSum = field(default_factory=ExactSum)
    noise_sum: ExactSum = field(default_factory=ExactSum)
    lo: float = float("inf")
    hi: float = float("-inf")
    batches: int = 0
    first_batch: int | None = None
    first_bytes: int = 0

    @property
    def signal(self) -> float:
        """The reference's energy over the samples."""
        return self.signal_sum.value

    @property
    def noise(self) -> float:
        """The error's energy over the samples."""
        return self.noise_sum.value

    def update(self, values: Sequence[np.ndarray]) -> None:
        """Fold one batch in; a batch whose shapes differ (a branch that did not run) adds nothing."""
        ref, cand = values
        self.batches += 1
        if self.batches == 1 and self.keep_first_empty:
            self.first_batch, self.first_bytes = 0, int(ref.nbytes)
        if ref.size == 0 or ref.shape != cand.shape:
            return
        if self.first_batch is None:
            self.first_batch, self.first_bytes = self.batches - 1, int(ref.nbytes)
        signal, noise = _energies(ref, cand, self.floor)
        self.signal_sum.extend(signal)
        self.noise_sum.extend(noise)
        self.lo = min(self.lo, float(ref.min()))
        self.hi = max(self.hi, float(ref.max()))

    def finish(self) -> None:
        """Nothing is held back."""

    def merge(self, later: _LayerSums) -> None:
        """Append ``later``: the same tensor over the batches that follow these."""
        if self.first_batch is None and later.first_batch is not None:
            self.first_batch, self.first_bytes = self.batches + later.first_batch, later.first_bytes
        self.signal_sum.merge(later.signal_sum)
        self.noise_sum.merge(later.noise_sum)
        self.lo, self.hi = min(self.lo, later.lo), max(self.hi, later.hi)
        self.batches += later.batches


@dataclass(frozen=True, slots=True)
class _SumsRequest(ErrorRequest):
    floor: float | None = None

    def observer(self) -> _LayerSums:  # type: ignore[override]
        """A fresh pass-1 observer."""
        return _LayerSums(self.keep_first_empty, self.floor)


@dataclass(slots=True)
class LayerStatistics:
    """What pass 1 observed: each compared tensor's sums over the data (or a shard of it: ``merge``
    appends the next shard's), before the hints and errors in isolation (pass 2, ``layer_errors``).
    Plain numbers only: it travels between Ray tasks.

    Attributes:
        names: the compared tensors.
        sums: their state.
        batch_size: the batch size asked for (pass 2's hints read the first batch of that size).
        passes: passes over the data (memory groups) pass 1 took; the most of any shard.
        run_batch: the batch pass 1 ran at (``batch_size`` shrunk to fit the memory budget; 0: ``batch_size``);
            pass 2 reads its first batch in runs of that size.
    """

    names: list[str]
    sums: dict[str, _LayerSums]
    batch_size: int
    passes: int = 0
    run_batch: int = 0

    def merge(self, later: LayerStatistics) -> None:
        """Append ``later``: the same tensors over the batches that follow these."""
        for t, s in later.sums.items():
            self.sums[t].merge(s)
        self.passes = max(self.passes, later.passes)
        self.run_batch = min((b for b in (self.run_batch, later.run_batch) if b), default=0)


def per_layer_errors(
    reference: onnx.ModelProto,
    quantized: onnx.ModelProto,
    dataset: Dataset,
    *,
    batch_size: int = 32,
    local: bool = True,
    max_memory: int | None = None,
    progress: Progress = no_progress,
    local_samples: int | None = None,
) -> list[LayerError]:
    """Errors of every quantized tensor found in both models, worst accumulated SQNR first.

    Pass 1 streams the data through both models (one ``ErrorRequest`` per tensor, at the batch up to
    ``batch_size`` that fits ``max_memory``; None: ``DEFAULT_MEMORY_BUDGET``); pass 2 reads the first batch
    of ``batch_size`` again for the hints and the errors in isolation, in groups under the same budget.
    The budget decides the batch run and how many passes, never the numbers (beyond onnxruntime's own
    rounding at another batch). With ``local_samples`` the errors in isolation are measured on the
    first that many samples streamed at ``batch_size`` instead (``streamed_local_errors``: the same
    whatever the batch; the search uses it so that its order does not depend on its memory budget).
    """
    models = layer_models(reference, quantized)
    stats = layer_statistics(models, dataset, batch_size=batch_size, max_memory=max_memory, progress=progress)
    streamed = None
    if local and local_samples is not None:
        part = dataset.subset(min(dataset.num_samples, local_samples))
        streamed = streamed_local_errors(models, stats, part, batch_size)
    return layer_errors(models, stats, dataset, local=local, max_memory=max_memory, local_sqnr=streamed)


def layer_statistics(
    models: LayerModels,
    dataset: Dataset,
    *,
    batch_size: int = 32,
    max_memory: int | None = None,
    progress: Progress = no_progress,
    log: Callable[[str], None] | None = None,
) -> LayerStatistics:
    """Pass 1 over ``dataset`` (all of it, or a ``Dataset.window`` of it) under ``max_memory`` bytes
    (None: ``DEFAULT_MEMORY_BUDGET``).

    The batch shrinks (down to one sample) until one batch of every compared tensor of both models fits
    the budget, measured on the first sample (``CollectOptions.fit_batch``): onnxruntime's working memory
    for a batch, which follows those tensors, sets the peak, and one pass runs each model once (memory
    groups would re-run both models each). ``log`` gets one line when it shrinks. The sums are per sample,
    so the batch changes none of them (beyond onnxruntime's own rounding at another batch). A model with
    compared tensors inside If/Loop/Scan bodies keeps the batch asked for and is split into memory groups
    instead: which branch runs, hence what is compared, may depend on the batch.
    """
    names = models.names
    if not names:
        return LayerStatistics([], {}, batch_size)
    requests = {
        t: _SumsRequest(
            models.ref_out[t],
            models.q_out[models.pairs[t].dq],
            keep_first_empty=t in models.main,
            floor=models.pairs[t].floor,
        )
        for t in names
    }
    budget = layer_memory_budget(max_memory)
    fit = all(t in models.main for t in names)
    options = CollectOptions(
        batch_size=batch_size, max_memory=budget, fit_batch=fit, desc="per-layer", optimize=models.optimize
    )
    model_list = [models.reference, models.quantized_exposed]
    collected = collect(model_list, dataset, list(requests.values()), options, progress=progress)
    sums = {t: cast(_LayerSums, collected[r]) for t, r in requests.items()}
    asked = dataset.effective_batch_size(batch_size)
    if log is not None and collected.batch_size < min(asked, dataset.num_samples):
        log(f"per-layer pass at batch {collected.batch_size} for --max-memory {byte_text(budget, '.3g')}")
    return LayerStatistics(list(names), sums, batch_size, collected.passes, collected.batch_size)


def layer_errors(
    models: LayerModels,
    statistics: LayerStatistics,
    dataset: Dataset,
    *,
    local: bool = True,
    max_memory: int | None = None,
    local_sqnr: dict[str, float] | None = None,
) -> list[LayerError]:
    """Pass 2 and the per-layer errors, from the statistics of all of ``dataset`` (``local``: with
    errors in isolation, measured in pass 2 unless given as ``local_sqnr``); the first batch is read
    again in groups under ``max_memory``."""
    names, sums = statistics.names, statistics.sums
    ran = [t for t in names if not math.isinf(sums[t].lo)]  # else never ran on this data
    budget = layer_memory_budget(max_memory)
    firsts, measured = _first_batch_pass(models, statistics, dataset, budget, local and local_sqnr is None)
    local_sqnr = measured if local_sqnr is None or not local else local_sqnr
    ref_producers = {o: n for _, g in walk_graphs(models.reference.graph) for n in g.node for o in n.output}
    q_producers = {o: n for _, g in walk_graphs(models.quantized.graph) for n in g.node for o in n.output}
    results = [
        _with_hint(
            _layer_error(
                t, sums[t], models.pairs[t], q_producers.get(t) or ref_producers.get(t), firsts.get(t), local_sqnr
            )
        )
        for t in ran
    ]
    results.sort(key=lambda e: (e.sqnr_db, e.tensor))
    return results


@dataclass(frozen=True, slots=True)
class _FirstBatch:
    """What the hints read of a tensor's first batch of FP32 values."""

    p999_abs: float
    hist_edges: tuple[float, ...]
    hist_counts: tuple[int, ...]


def _first_batch(values: np.ndarray, pair: _Pair) -> _FirstBatch:
    """The 99.9th percentile of ``|values|`` and their histogram over the values and the clip range."""
    if not values.size:
        return _FirstBatch(0.0, (), ())
    clip_low = (pair.qmin - pair.zero_point) * pair.scale
    clip_high = (pair.qmax - pair.zero_point) * pair.scale
    p999 = float(np.percentile(np.abs(values), 99.9))
    flat = values.ravel()
    span_lo, span_hi = min(float(flat.min()), clip_low), max(float(flat.max()), clip_high)
    c, e = np.histogram(flat, bins=48, range=(span_lo, span_hi if span_hi > span_lo else span_lo + 1))
    return _FirstBatch(p999, tuple(float(x) for x in e), tuple(int(x) for x in c))


def _layer_error(
    t: str,
    sums: _LayerSums,
    pair: _Pair,
    node: onnx.NodeProto | None,
    first: _FirstBatch | None,
    local_sqnr: dict[str, float],
) -> LayerError:
    """The error of tensor ``t`` from its pass-1 sums and pass-2 first batch (hint left empty)."""
    first = first or _FirstBatch(0.0, (), ())
    return LayerError(
        tensor=t,
        node=node.name if node is not None else "(graph input)",
        op_type=node.op_type if node is not None else "Input",
        sqnr_db=_sqnr(sums.signal, sums.noise),
        local_sqnr_db=local_sqnr.get(t),
        clip_low=(pair.qmin - pair.zero_point) * pair.scale,
        clip_high=(pair.qmax - pair.zero_point) * pair.scale,
        observed_min=sums.lo,
        observed_max=sums.hi,
        p999_abs=first.p999_abs,
        hint="",
        hist_edges=first.hist_edges,
        hist_counts=first.hist_counts,
        floor=pair.floor,
    )


def plan_first_groups(
    targets: Sequence[str], needs: dict[str, list[str]], nbytes: dict[str, int], budget: int
) -> list[list[str]]:
    """Pass 2's groups: ``targets`` in order, split so that the values each group reads (every target's
    ``needs``: itself and the inputs of its layer, ``nbytes`` each) fit ``budget``; a target whose own
    needs exceed it is a group alone."""
    groups: list[list[str]] = [[]]
    held: set[str] = set()
    used = 0
    for t in targets:
        new = [x for x in dict.fromkeys(needs.get(t, [t])) if x not in held]
        cost = sum(nbytes.get(x, 0) for x in new)
        if groups[-1] and used + cost > budget:
            groups.append([])
            held, used = set(), 0
            new = list(dict.fromkeys(needs.get(t, [t])))
            cost = sum(nbytes.get(x, 0) for x in new)
        groups[-1].append(t)
        held.update(new)
        used += cost
    return [g for g in groups if g]


def _first_batch_pass(
    models: LayerModels, statistics: LayerStatistics, dataset: Dataset, budget: int, local: bool
) -> tuple[dict[str, _FirstBatch], dict[str, float]]:
    """Pass 2: each tensor's first batch of FP32 values read again (the reference returns the group's
    tensors only), its hints' figures and, for main-graph layers, the SQNR of the layer cut out alone
    and fed the FP32 inputs of that batch.

    The first batch is of the size asked for (``statistics.batch_size``) whatever batch pass 1 ran at,
    so the hints do not depend on the memory budget; it is run at pass 1's batch (``run_batch``) and its
    runs joined, so onnxruntime's working memory stays pass 1's; a group holds the first batch of its
    tensors (``plan_first_groups``)."""
    sums = statistics.sums
    at = {t: s.first_batch for t, s in sums.items() if s.first_batch is not None}
    sources = _local_sources(models, [t for t in at if at[t] == 0 and t in models.main]) if local else {}
    needs = {t: [t, *sources.get(t, [])] for t in at}
    size = dataset.effective_batch_size(statistics.batch_size)
    run = min(size, statistics.run_batch or size)
    count = min(size, dataset.num_samples)
    scale = -(-count // max(1, min(run, count)))  # pass 1's first batches in the first batch asked for
    nbytes = {t: sums[t].first_bytes * scale for t in at}
    extract = submodel_extractor(infer_shapes(models.quantized)[0]) if sources else None
    firsts: dict[str, _FirstBatch] = {}
    local_sqnr: dict[str, float] = {}
    for index in sorted(set(at.values())):
        for group in plan_first_groups([t for t in statistics.names if at.get(t) == index], needs, nbytes, budget):
            wanted = list(dict.fromkeys(x for t in group for x in needs[t]))
            outs = [models.ref_out[x] for x in wanted]
            session = make_session(models.reference, optimize=models.optimize, outputs=outs)
            parts: dict[str, list[np.ndarray]] = {x: [] for x in wanted}
            lengths: list[int] = []
            for feed in _first_batch_runs(dataset, size, run, index, count):
                for x, value in zip(wanted, session.run(outs, feed), strict=True):
                    parts[x].append(value)
                lengths.append(dataset.batch_length(feed))
            del session
            for t in group:
                firsts[t] = _first_batch(_joined(parts[t], lengths), models.pairs[t])
                if t in sources and extract is not None:
                    got = _local_sqnr(extract, t, models.pairs[t], sources[t], parts)
                    if got is not None:
                        local_sqnr[t] = got
            del parts
    return firsts, local_sqnr


def _first_batch_runs(dataset: Dataset, size: int, run: int, index: int, count: int) -> Iterator[dict[str, np.ndarray]]:
    """The feeds of batch ``index`` of ``size`` samples: one, or (the first batch, ``count`` samples)
    ``run`` samples at a time when pass 1 ran at a smaller batch."""
    if run >= size or index:
        yield next(itertools.islice(dataset.batches(size), index, None))
        return
    yield from dataset.subset(count).batches(run)


def _joined(parts: list[np.ndarray], lengths: list[int]) -> np.ndarray:
    """One tensor's values over the runs of a batch, for the hints (which ignore the order of values): the
    runs' values flattened end to end, or the first run's alone when every run returned the same values
    with no axis the size of its samples (no batch axis: the same whatever the batch)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    batch_axis = first.ndim > 0 and all(p.shape[:1] == (n,) for p, n in zip(parts, lengths, strict=True))
    if not batch_axis and all(p.shape == first.shape and np.array_equal(p, first) for p in parts[1:]):
        return first
    return np.concatenate([p.ravel() for p in parts])


def _local_sources(models: LayerModels, names: list[str]) -> dict[str, list[str]]:
    """For each of ``names`` (main-graph tensors) produced by a layer that can be cut out alone: the FP32
    tensors feeding that layer (walked back through its input Q/DQ), all of them compared tensors."""
    quantized = models.quantized
    producers = {o: n for n in quantized.graph.node for o in n.output}
    inits = {t.name for t in quantized.graph.initializer}
    have = set(names)
    out: dict[str, list[str]] = {}
    for t in names:
        node = producers.get(t)
        if node is None:
            continue
        found: list[str] = []
        for name in node.input:
            if not name or name in inits:
                continue
            feeder = producers.get(name)
            if feeder is not None and feeder.op_type == "DequantizeLinear" and feeder.input[0] in inits:
                continue  # a quantized weight or bias
            src = _float_source(name, producers, inits)
            if src is None or src not in have:
                found = []
                break
            found.append(src)
        if found:
            out[t] = sorted(set(found))
    return out


def _local_sqnr(
    extract: Callable[[list[str], list[str]], onnx.ModelProto],
    t: str,
    pair: _Pair,
    sources: list[str],
    parts: dict[str, list[np.ndarray]],
) -> float | None:
    """SQNR of ``t`` when only its producing layer is quantized (``sources``' FP32 values fed in, run by
    run: ``parts``), its energies added sample by sample (``ExactSum``, so the same whatever the runs);
    None when the layer cannot be cut out alone (e.g. it needs shape inputs)."""
    signal, noise = ExactSum(), ExactSum()
    try:
        sess = make_session(extract(sources, [pair.dq]))
        for k, ref in enumerate(parts[t]):
            got = sess.run([pair.dq], {s: parts[s][k] for s in sources})[0]
            energies = _energies(ref, got, pair.floor)
            signal.extend(energies[0])
            noise.extend(energies[1])
    except Exception:
        return None
    return _sqnr(signal.value, noise.value)


def streamed_local_errors(
    models: LayerModels, statistics: LayerStatistics, dataset: Dataset, batch_size: int
) -> dict[str, float]:
    """The errors in isolation (main-graph tensors) over all of ``dataset``, streamed ``batch_size``
    samples at a time: each layer's FP32 inputs are computed a batch at a time and dropped, and the
    energies are summed sample by sample (``math.fsum``), so the values do not depend on the batch."""
    names = [t for t in statistics.names if t in models.main and not math.isinf(statistics.sums[t].lo)]
    sources = _local_sources(models, names)
    if not sources:
        return {}
    extract = submodel_extractor(infer_shapes(models.quantized)[0])
    sessions: dict[str, ort.InferenceSession] = {}
    for t, found in sources.items():
        try:
            sessions[t] = make_session(extract(found, [models.pairs[t].dq]))
        except Exception:  # a layer that cannot be cut out alone (e.g. it needs shape inputs) is skipped
            continue
    needed = list(dict.fromkeys(x for t in sessions for x in (t, *sources[t])))
    if not needed:
        return {}
    outs = [models.ref_out[x] for x in needed]
    reference = make_session(models.reference, optimize=models.optimize, outputs=outs)
    signal: dict[str, list[float]] = {t: [] for t in sessions}
    noise: dict[str, list[float]] = {t: [] for t in sessions}
    for feed in dataset.batches(batch_size):
        values = dict(zip(needed, reference.run(outs, feed), strict=True))
        for t, sess in list(sessions.items()):
            try:
                got = sess.run([models.pairs[t].dq], {x: values[x] for x in sources[t]})[0]
            except Exception:  # as when the layer runs alone on the first batch only: skipped
                del sessions[t]
                continue
            energies = _energies(values[t], got, models.pairs[t].floor)
            signal[t].extend(energies[0])
            noise[t].extend(energies[1])
        del values
    return {t: _sqnr(math.fsum(signal[t]), math.fsum(noise[t])) for t in sessions}


def _float_source(name: str, producers: dict[str, onnx.NodeProto], inits: set[str]) -> str | None:
    node = producers.get(name)
    if node is None:
        return name
    if node.op_type == "DequantizeLinear":
        q = producers.get(node.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            return q.input[0]
        return None
    return name


def _with_hint(err: LayerError) -> LayerError:
    hint = ""
    spread = max(abs(err.observed_min), abs(err.observed_max))
    if err.p999_abs > 0 and spread > 10 * err.p999_abs and err.op_type != "Sigmoid":  # a score's rare highs
        hint = (
            f"outliers: range {spread / err.p999_abs:.0f}x the 99.9th percentile; "
            f"try --method percentile or --exclude-nodes {err.node}"
        )
    elif err.local_sqnr_db is not None and err.local_sqnr_db - err.sqnr_db > 6:
        hint = "error comes from upstream layers (this layer alone is fine)"
    elif err.local_sqnr_db is not None and err.local_sqnr_db < 20:
        hint = f"this layer loses precision itself; try --exclude-nodes {err.node}"
    elif err.clip_high < err.observed_max or (err.floor is None and err.clip_low > err.observed_min):
        hint = "clipped: evaluation data exceeds the calibrated range; calibrate on more representative data"
    return replace(err, hint=hint)
