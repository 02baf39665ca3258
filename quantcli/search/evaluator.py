"""Scoring candidates: FP32 outputs computed once on the evaluation data, each candidate measured against them.

``Evaluator.score`` runs a candidate session over the same batches and returns a ``Score``
(``quantcli.search.budget``): the lowest output SQNR, top-1 (per scored position for batch x
positions x classes outputs, negative labels unscored) or its drop against FP32's own top-1 without
labels, a user's task metric (``quantcli.compare.metrics``), and each output's kind metric when the
budget has task-level bounds. A MatMul run with run-time activation quantization takes its range from
the whole batch, so its score depends on the batching (32 samples here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from quantcli.compare.metrics import MetricSpec, evaluate_custom
from quantcli.compare.output_kinds import DEFAULT_MAP_THRESHOLD, KindMetrics, OutputKind, OutputKindObserver
from quantcli.data.datasets import Dataset
from quantcli.graph.session import make_session
from quantcli.search.budget import AGREEMENT, Score

__all__ = ["Evaluator"]


class Evaluator:
    """FP32 outputs computed once; each candidate is scored against them."""

    def __init__(
        self,
        reference: onnx.ModelProto,
        dataset: Dataset,
        batch_size: int = 32,
        metric: MetricSpec | None = None,
        *,
        kinds: tuple[Mapping[str, OutputKind], float] | None = None,
    ) -> None:
        """``kinds`` (overrides, map threshold): measure each output's kind metric (task-level bounds)."""
        self.dataset = dataset
        self.kind_options = kinds
        self.metric = metric if metric is not None and metric.function is not None else None
        #: "agreement": labels ignored, the drop is the share of samples whose top-1 changed (an upper
        #: bound of the accuracy drop, and less noisy: a few hundred samples cannot resolve one point)
        agreement = metric is not None and metric.name == AGREEMENT
        self.session = make_session(reference)
        self.names = [o.name for o in self.session.get_outputs()]
        self.size = dataset.effective_batch_size(batch_size)
        self.feeds = list(dataset.batches(self.size))
        self.reference = [self.session.run(self.names, feed) for feed in self.feeds]
        self.counts = [dataset.batch_length(feed) for feed in self.feeds]
        #: each output's detected (or given) kind, FP32 against itself
        self.kinds = self._kinds(self.reference[:1]) if kinds is not None else ()
        self.labels = None if agreement else dataset.labels
        first = self.reference[0][0] if self.reference else np.zeros(0)
        scores = first.ndim >= 2 and first.shape[-1] > 1 and first.dtype.kind == "f"
        # batch x classes, or batch x positions... x classes with labels per position (token
        # classification, masked language models: negative labels are positions nobody scores)
        per_position = (
            self.labels is not None
            and np.asarray(self.labels).ndim == first.ndim - 1
            and np.asarray(self.labels).shape[1:] == first.shape[1:-1]
        )
        self.classifier = scores and (first.ndim == 2 or per_position)
        self.fp32_accuracy = self._accuracy([r[0] for r in self.reference]) if self.classifier else None
        if self.metric is not None:  # the user's metric decides, whatever the outputs look like
            self.classifier = True
            self.fp32_accuracy = 100.0 * evaluate_custom(self.metric, self.reference, self.names, self.labels)
        self.latency_feed = next(dataset.batches(1))

    def _accuracy(self, scores: list[np.ndarray]) -> float | None:
        if self.labels is None:
            return None
        pred = np.concatenate([s.argmax(-1) for s in scores])
        labels = np.asarray(self.labels)[: pred.shape[0]]
        if labels.shape != pred.shape:
            return None
        scored = labels >= 0
        if not scored.any():
            return None
        return 100.0 * float(np.mean(pred[scored] == labels[scored]))

    def _kinds(self, outputs: Sequence[Sequence[np.ndarray]]) -> tuple[KindMetrics, ...]:
        """The kind metrics of ``outputs`` (one list per feed) against the FP32 outputs."""
        overrides, threshold = self.kind_options or ({}, DEFAULT_MAP_THRESHOLD)
        observer = OutputKindObserver(overrides, map_threshold=threshold)
        for ref, out, n in zip(self.reference, outputs, self.counts, strict=False):
            observer(self.names, ref, out, n)
        return tuple(observer.results())

    def score(self, session: ort.InferenceSession) -> Score:
        signal: dict[str, float] = dict.fromkeys(self.names, 0.0)
        noise: dict[str, float] = dict.fromkeys(self.names, 0.0)
        firsts: list[np.ndarray] = []
        everything: list[list[np.ndarray]] = []  # for a custom metric or kind metrics only
        for feed, ref in zip(self.feeds, self.reference, strict=True):
            out = session.run(self.names, feed)
            if self.metric is not None or self.kind_options is not None:
                everything.append(out)
            for name, r, q in zip(self.names, ref, out, strict=True):
                if r.dtype.kind != "f":
                    continue
                r64 = r.astype(np.float64)
                signal[name] += float(np.sum(r64 * r64))
                noise[name] += float(np.sum((r64 - q) ** 2))
            firsts.append(out[0])
        sqnrs = [
            (10 * math.log10(signal[n] / noise[n]) if noise[n] > 0 else math.inf)
            for n in self.names
            if signal[n] > 0 or noise[n] > 0
        ]
        sqnr = min(sqnrs) if sqnrs else math.inf
        accuracy = drop = None
        if self.metric is not None:
            accuracy = 100.0 * evaluate_custom(self.metric, everything, self.names, self.labels)
            drop = None if self.fp32_accuracy is None else self.fp32_accuracy - accuracy
        elif self.classifier:
            accuracy = self._accuracy(firsts)
            if accuracy is not None and self.fp32_accuracy is not None:
                drop = self.fp32_accuracy - accuracy
            else:  # no labels: the share of samples whose top-1 changed bounds the accuracy drop
                ref_top = np.concatenate([r[0].argmax(-1) for r in self.reference])
                q_top = np.concatenate([f.argmax(-1) for f in firsts])
                drop = 100.0 * float(np.mean(ref_top != q_top))
        kinds = self._kinds(everything) if self.kind_options is not None else ()
        return Score(accuracy, drop, sqnr, kinds)
