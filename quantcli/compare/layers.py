"""Per-layer error: where in the network the quantized model drifts from FP32, and why.

For every activation the quantized model quantizes, the FP32 value of that tensor is compared with
the quantized model's DequantizeLinear output of the same tensor (accumulated error: everything
upstream is quantized too). For the layer that produces it, the error *in isolation* is measured
as well: the layer's quantized sub-graph (its weights and input Q/DQ, and its output Q/DQ) is cut out
and fed the FP32 inputs, so a layer that loses precision itself is told from one that inherits
error from upstream.

Both models are run in batches over the data with the tensors exposed as outputs, through the
statistics collector (``quantcli.stats.collector.ErrorRequest``, in memory groups under
``max_memory``); only sums are kept (O(1) per tensor), plus the first batch's values for the range
hints.

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

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import cast

import numpy as np
import onnx
import onnxruntime as ort

from quantcli.compare.evaluate import ordered_sum, sample_energies
from quantcli.core.progress import Progress, no_progress
from quantcli.data.datasets import Dataset
from quantcli.graph.editor import ModelEditor, make_node, submodel_extractor
from quantcli.graph.model_io import infer_shapes
from quantcli.graph.scopes import elem_types, has_subgraphs, walk_graphs
from quantcli.graph.session import augmented, make_session
from quantcli.graph.subgraphs import expose_subgraph_tensors
from quantcli.stats.collector import CollectOptions, ErrorRequest, ErrorStats, collect

__all__ = [
    "LayerError",
    "LayerStatistics",
    "layer_errors",
    "layer_statistics",
    "per_layer_errors",
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


@dataclass(slots=True)
class _PartsErrorStats(ErrorStats):
    """``ErrorStats`` keeping each batch's energies, so that shards over contiguous blocks of batches
    merge into the one-process sums to the bit (``settle`` adds them in batch order)."""

    signals: list[float] = field(default_factory=list)
    noises: list[float] = field(default_factory=list)

    def update(self, values: Sequence[np.ndarray]) -> None:
        """Fold one batch in (its energies kept apart, and added to the running totals)."""
        signal, noise = self.signal, self.noise
        self.signal = self.noise = 0.0
        ErrorStats.update(self, values)  # from zero: the batch's own energies
        self.signals.append(self.signal)
        self.noises.append(self.noise)
        self.signal, self.noise = signal + self.signal, noise + self.noise

    def settle(self) -> None:
        """``signal`` and ``noise`` as the running totals over the batches, in order."""
        self.signal, self.noise = ordered_sum(self.signals), ordered_sum(self.noises)

    def merge(self, later: _PartsErrorStats) -> None:
        """Append ``later``: the same tensor over the batches that follow these."""
        if self.first is None:
            self.first = later.first
        self.signals += later.signals
        self.noises += later.noises
        self.lo, self.hi = min(self.lo, later.lo), max(self.hi, later.hi)
        self.batches += later.batches
        self.settle()


@dataclass(frozen=True, slots=True)
class _PartsErrorRequest(ErrorRequest):
    def observer(self) -> ErrorStats:
        """A fresh observer that keeps per-batch energies."""
        return _PartsErrorStats(self.keep_first_empty)


@dataclass(slots=True)
class LayerStatistics:
    """What the per-layer pass observed: each compared tensor's error statistics over the data (or
    a shard of it: ``merge`` appends the next shard's), before the errors in isolation and the hints."""

    names: list[str]
    pairs: dict[str, _Pair]
    main: set[str]
    stats: dict[str, _PartsErrorStats]

    def merge(self, later: LayerStatistics) -> None:
        """Append ``later``: the same tensors over the batches that follow these."""
        for t, s in later.stats.items():
            self.stats[t].merge(s)


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

    Both models stream the data through the statistics collector (one ``ErrorRequest`` per
    tensor), in memory groups under ``max_memory`` (None: a quarter of the memory available).
    The errors in isolation are measured on the first batch, or with ``local_samples`` on the first
    that many samples streamed at ``batch_size`` (``streamed_local_errors``: the same whatever the batch).
    """
    stats = layer_statistics(
        reference, quantized, dataset, batch_size=batch_size, max_memory=max_memory, progress=progress
    )
    streamed = None
    if local and local_samples is not None:
        part = dataset.subset(min(dataset.num_samples, local_samples))
        streamed = streamed_local_errors(reference, quantized, stats, part, batch_size)
    return layer_errors(reference, quantized, stats, local=local, local_sqnr=streamed)


def layer_statistics(
    reference: onnx.ModelProto,
    quantized: onnx.ModelProto,
    dataset: Dataset,
    *,
    batch_size: int = 32,
    max_memory: int | None = None,
    progress: Progress = no_progress,
) -> LayerStatistics:
    """``per_layer_errors``'s pass over ``dataset`` (all of it, or a ``Dataset.window`` of it)."""
    pairs = _qdq_pairs(quantized)
    quantized = _read_on_own_grid(quantized, pairs)
    ref_producers = {o: n for _, g in walk_graphs(reference.graph) for n in g.node for o in n.output}
    graph_inputs = {i.name for i in reference.graph.input}
    names = [t for t in pairs if t in ref_producers or t in graph_inputs]
    main = {o for n in reference.graph.node for o in n.output} | graph_inputs
    if not names:
        return LayerStatistics([], pairs, main, {})
    ref_model, ref_out = _exposed(reference, names)
    q_model, q_out = _exposed(quantized, [pairs[t].dq for t in names])
    names = [t for t in names if t in ref_out and pairs[t].dq in q_out]
    requests = {t: _PartsErrorRequest(ref_out[t], q_out[pairs[t].dq], keep_first_empty=t in main) for t in names}
    options = CollectOptions(batch_size=batch_size, max_memory=max_memory, desc="per-layer")
    collected = collect([ref_model, q_model], dataset, list(requests.values()), options, progress=progress)
    stats = {t: cast(_PartsErrorStats, collected[r]) for t, r in requests.items()}
    return LayerStatistics(names, pairs, main, stats)


def layer_errors(
    reference: onnx.ModelProto,
    quantized: onnx.ModelProto,
    statistics: LayerStatistics,
    *,
    local: bool = True,
    local_sqnr: dict[str, float] | None = None,
) -> list[LayerError]:
    """The per-layer errors from the statistics of all the data (``local``: with errors in isolation,
    measured on the first batch kept unless given: ``local_sqnr``, e.g. ``streamed_local_errors``)."""
    names, pairs, main, stats = statistics.names, statistics.pairs, statistics.main, statistics.stats
    # the copy the statistics ran: its added DequantizeLinear names are deterministic, as ``pairs`` holds them
    quantized = _read_on_own_grid(quantized, _qdq_pairs(quantized))
    ref_producers = {o: n for _, g in walk_graphs(reference.graph) for n in g.node for o in n.output}
    q_producers = {o: n for _, g in walk_graphs(quantized.graph) for n in g.node for o in n.output}
    first_ref = {t: s.first for t, s in stats.items() if s.first is not None}
    if not local:
        local_sqnr = {}
    elif local_sqnr is None:
        local_sqnr = _local_errors(quantized, pairs, names, {t: v for t, v in first_ref.items() if t in main})
    results = [
        _with_hint(_layer_error(t, stats[t], pairs[t], q_producers.get(t) or ref_producers.get(t), local_sqnr))
        for t in names
        if not math.isinf(stats[t].lo)  # never ran on this data
    ]
    results.sort(key=lambda e: (e.sqnr_db, e.tensor))
    return results


def _layer_error(
    t: str, stats: ErrorStats, pair: _Pair, node: onnx.NodeProto | None, local_sqnr: dict[str, float]
) -> LayerError:
    """The error of tensor ``t`` from its collected statistics (hint left empty)."""
    clip_low = (pair.qmin - pair.zero_point) * pair.scale
    clip_high = (pair.qmax - pair.zero_point) * pair.scale
    first = stats.first
    p999 = float(np.percentile(np.abs(first), 99.9)) if first is not None and first.size else 0.0
    edges: tuple[float, ...] = ()
    counts: tuple[int, ...] = ()
    if first is not None and first.size:
        values = first.ravel()
        span_lo, span_hi = min(float(values.min()), clip_low), max(float(values.max()), clip_high)
        c, e = np.histogram(values, bins=48, range=(span_lo, span_hi if span_hi > span_lo else span_lo + 1))
        edges, counts = tuple(float(x) for x in e), tuple(int(x) for x in c)
    return LayerError(
        tensor=t,
        node=node.name if node is not None else "(graph input)",
        op_type=node.op_type if node is not None else "Input",
        sqnr_db=_sqnr(stats.signal, stats.noise),
        local_sqnr_db=local_sqnr.get(t),
        clip_low=clip_low,
        clip_high=clip_high,
        observed_min=stats.lo,
        observed_max=stats.hi,
        p999_abs=p999,
        hint="",
        hist_edges=edges,
        hist_counts=counts,
    )


def _cuts(
    quantized: onnx.ModelProto, pairs: dict[str, _Pair], names: list[str], known: Collection[str]
) -> dict[str, tuple[onnx.ModelProto, list[str]]]:
    """Each tensor's producing layer cut out alone (its quantized sub-graph from its FP32 inputs to its
    DequantizeLinear output), with those inputs; a layer whose inputs are not all ``known`` is left out."""
    producers = {o: n for n in quantized.graph.node for o in n.output}
    inits = {t.name for t in quantized.graph.initializer}
    cuts: dict[str, tuple[onnx.ModelProto, list[str]]] = {}
    extract = submodel_extractor(infer_shapes(quantized)[0])
    for t in names:
        node = producers.get(t)
        if node is None or t not in known:
            continue
        # the layer's float inputs: walk back through its DequantizeLinear/QuantizeLinear to the FP32 tensors
        sources: list[str] = []
        for name in node.input:
            if not name or name in inits:
                continue
            feeder = producers.get(name)
            if feeder is not None and feeder.op_type == "DequantizeLinear" and feeder.input[0] in inits:
                continue  # a quantized weight or bias
            src = _float_source(name, producers, inits)
            if src is None or src not in known:
                sources = []
                break
            sources.append(src)
        if not sources:
            continue
        try:
            cuts[t] = (extract(sorted(set(sources)), [pairs[t].dq]), sorted(set(sources)))
        except Exception:  # a layer that cannot be cut out alone (e.g. it needs shape inputs) is skipped
            continue
    return cuts


def _local_errors(
    quantized: onnx.ModelProto,
    pairs: dict[str, _Pair],
    names: list[str],
    ref_values: dict[str, np.ndarray],
) -> dict[str, float]:
    """SQNR of each tensor when only its producing layer is quantized (FP32 inputs fed in)."""
    out: dict[str, float] = {}
    for t, (sub, sources) in _cuts(quantized, pairs, names, ref_values).items():
        try:
            sess = make_session(sub)
            got = sess.run([pairs[t].dq], {s: ref_values[s] for s in sources})[0].astype(np.float64)
        except Exception:  # a layer that cannot run alone is skipped
            continue
        ref = ref_values[t].astype(np.float64)
        out[t] = _sqnr(float(np.sum(ref * ref)), float(np.sum((ref - got) ** 2)))
    return out


def streamed_local_errors(
    reference: onnx.ModelProto,
    quantized: onnx.ModelProto,
    statistics: LayerStatistics,
    dataset: Dataset,
    batch_size: int,
) -> dict[str, float]:
    """The errors in isolation (main-graph tensors) over all of ``dataset``, streamed ``batch_size``
    samples at a time: the FP32 inputs of every layer are computed a batch at a time and dropped, and
    the energies are summed sample by sample (``math.fsum``), so the values do not depend on the batch
    (``per_layer_errors`` measures them on the first batch the pass kept instead)."""
    quantized = _read_on_own_grid(quantized, _qdq_pairs(quantized))  # the copy the statistics ran
    main_names = [t for t in statistics.names if t in statistics.main]
    cuts = _cuts(quantized, statistics.pairs, main_names, set(main_names))
    sessions: dict[str, ort.InferenceSession] = {}
    for t, (sub, _) in cuts.items():
        try:
            sessions[t] = make_session(sub)
        except Exception:  # a layer that cannot run alone is skipped
            continue
    needed = sorted({s for t in sessions for s in cuts[t][1]} | set(sessions))
    if not needed:
        return {}
    ref_model, outs = _exposed(reference, needed)
    ref_session = make_session(ref_model)
    signal: dict[str, list[float]] = {t: [] for t in sessions}
    noise: dict[str, list[float]] = {t: [] for t in sessions}
    for feed in dataset.batches(batch_size):
        values = dict(zip(needed, ref_session.run([outs[n] for n in needed], feed), strict=True))
        for t, sess in list(sessions.items()):
            try:
                got = sess.run([statistics.pairs[t].dq], {s: values[s] for s in cuts[t][1]})[0]
            except Exception:  # as when the layer runs on the first batch only: skipped
                del sessions[t]
                continue
            signal[t].extend(sample_energies(values[t]))
            noise[t].extend(sample_energies(values[t], got.astype(np.float64)))
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
    if err.p999_abs > 0 and spread > 10 * err.p999_abs:
        hint = (
            f"outliers: range {spread / err.p999_abs:.0f}x the 99.9th percentile; "
            f"try --method percentile or --exclude-nodes {err.node}"
        )
    elif err.local_sqnr_db is not None and err.local_sqnr_db - err.sqnr_db > 6:
        hint = "error comes from upstream layers (this layer alone is fine)"
    elif err.local_sqnr_db is not None and err.local_sqnr_db < 20:
        hint = f"this layer loses precision itself; try --exclude-nodes {err.node}"
    elif err.clip_high < err.observed_max or err.clip_low > err.observed_min:
        hint = "clipped: evaluation data exceeds the calibrated range; calibrate on more representative data"
    return replace(err, hint=hint)
