"""Scoring candidates: FP32 outputs computed once on the evaluation data, each candidate measured against them.

``Evaluator.score`` runs a candidate session over the same batches and returns a ``Score``
(``quantcli.search.budget``): the lowest output SQNR, top-1 (per scored position for batch x
positions x classes outputs, negative labels unscored) or its drop against FP32's own top-1 without
labels, a user's task metric (``quantcli.compare.metrics``), and each output's kind metric when the
budget has task-level bounds.

Memory: with ``max_memory``, the batch is the largest (up to ``batch_size``) whose activations fit it
(``quantcli.search.memory``: PP-OCRv4 det exposes 531 MiB a sample, so batch 1 under 512 MiB); the
session that computed the FP32 outputs is released (its arena grew to a batch), a fresh one kept for
the batch-1 latency; a candidate's session is the caller's, released once scored. The output energies
are summed sample by sample (``math.fsum``), so the SQNR does not depend on the batching.

A MatMul run with run-time activation quantization (``DynamicQuantizeMatMul``) takes its range from the
whole batch, so its score depends on the batching, hence on ``max_memory`` (the batch is a function of
the model, the first sample and the budget: the same inputs give the same scores).

Folds: with ``folds`` (more datasets), the samples are those of ``dataset`` and then of each fold, and
``score`` takes one session a fold: each fold's samples are run by the candidate built from a
calibration that did not read them (``accuracy_search.SecondFold``), and the score is over all of them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from quantcli.compare.evaluate import sample_energies
from quantcli.compare.map_thresholds import MapThreshold
from quantcli.compare.metrics import MetricSpec, evaluate_custom
from quantcli.compare.output_kinds import DEFAULT_MAP_THRESHOLD, KindMetrics, OutputKind, OutputKindObserver
from quantcli.data.datasets import Dataset
from quantcli.graph.session import make_session
from quantcli.search.budget import AGREEMENT, Score
from quantcli.search.memory import SEARCH_BATCH, SearchBatches, activation_bytes, plan_search_batches

__all__ = ["METRIC_GROUPS", "Evaluator"]

#: runs of consecutive samples a custom metric is measured on for its standard error (``Evaluator._metric_error``)
METRIC_GROUPS = 10


class Evaluator:
    """FP32 outputs computed once; each candidate is scored against them."""

    def __init__(
        self,
        reference: onnx.ModelProto,
        dataset: Dataset,
        batch_size: int = SEARCH_BATCH,
        metric: MetricSpec | None = None,
        *,
        kinds: tuple[Mapping[str, OutputKind], MapThreshold] | None = None,
        max_memory: int | None = None,
        folds: Sequence[Dataset] = (),
    ) -> None:
        """``kinds`` (overrides, map threshold): measure each output's kind metric (task-level bounds).
        ``max_memory``: bytes a batch's activations may take (None: ``batch_size`` samples, unmeasured).
        ``folds``: more samples, each set scored by a session of its own (``score``)."""
        self.dataset = dataset
        self.kind_options = kinds
        self.metric = metric if metric is not None and metric.function is not None else None
        #: "agreement": labels ignored, the drop is the share of samples whose top-1 changed (an upper
        #: bound of the accuracy drop, and less noisy: a few hundred samples cannot resolve one point)
        agreement = metric is not None and metric.name == AGREEMENT
        self.latency_feed = next(dataset.batches(1))
        per_sample = activation_bytes(reference, self.latency_feed) if max_memory is not None else 0
        #: the scoring and sensitivity batches (both ``batch_size`` without a budget)
        self.batches = (
            plan_search_batches(per_sample, max_memory, batch_size)
            if max_memory is not None
            else SearchBatches(batch_size, batch_size, 0, 0)
        )
        self.size = dataset.effective_batch_size(self.batches.score)
        session = make_session(reference)
        self.names = [o.name for o in session.get_outputs()]
        parts = (dataset, *folds)
        #: the feeds of every part, and the part (the session of ``score``) each belongs to
        self.feeds: list[dict[str, np.ndarray]] = []
        self.fold_of: list[int] = []
        for i, part in enumerate(parts):
            for feed in part.batches(self.size):
                self.feeds.append(feed)
                self.fold_of.append(i)
        self.parts = len(parts)
        self.reference = [session.run(self.names, feed) for feed in self.feeds]
        self.counts = [dataset.batch_length(feed) for feed in self.feeds]
        #: each output's FP32 energy, sample by sample, and summed (``math.fsum``)
        self.signal_samples = {
            n: [
                e
                for r, count in zip(self.reference, self.counts, strict=True)
                if r[i].dtype.kind == "f"
                for e in _sample_energies(r[i], None, count)
            ]
            for i, n in enumerate(self.names)
        }
        self.signal = {n: math.fsum(e) for n, e in self.signal_samples.items()}
        # the batch's arena is released; batch-1 latency runs on a fresh session
        self.session = session if self.size == 1 else make_session(reference)
        del session
        #: how many samples are scored (every part's)
        self.num_samples = sum(part.num_samples for part in parts)
        #: labels in the feeds' order, for kind metrics (a sequence is judged at its labelled positions)
        self.position_labels = _joined([part.yielded_labels() for part in parts])
        #: each output's detected (or given) kind, FP32 against itself
        self.kinds = self._kinds(self.reference[:1]) if kinds is not None else ()
        self.labels = None if agreement else _joined([part.labels for part in parts])
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
        #: FP32's per-sample top-1 hits (``_correct``), paired with each candidate's for the drop's error
        self.fp32_correct = self._correct([r[0] for r in self.reference]) if self.classifier else None
        self.fp32_accuracy = self._accuracy(self.fp32_correct)
        if self.metric is not None:  # the user's metric decides, whatever the outputs look like
            self.classifier = True
            self.fp32_accuracy = 100.0 * evaluate_custom(self.metric, self.reference, self.names, self.labels)

    def __getstate__(self) -> dict[str, object]:
        """What a Ray task needs to score (``quantcli.distributed.score_on_ray``): no session, no open data."""
        state = dict(self.__dict__)
        state.update(session=None, dataset=None)
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)

    def _correct(self, scores: list[np.ndarray]) -> np.ndarray | None:
        """1 where a scored prediction (top-1) equals its label, else 0, over the samples (positions) whose
        label is not negative; None without labels, or with labels of another shape, or none scored."""
        if self.labels is None:
            return None
        pred = np.concatenate([s.argmax(-1) for s in scores])
        labels = np.asarray(self.labels)[: pred.shape[0]]
        if labels.shape != pred.shape:
            return None
        scored = labels >= 0
        if not scored.any():
            return None
        return (pred[scored] == labels[scored]).astype(np.float64)

    def _accuracy(self, correct: np.ndarray | None) -> float | None:
        return None if correct is None else 100.0 * float(np.mean(correct))

    def _kinds(self, outputs: Sequence[Sequence[np.ndarray]]) -> tuple[KindMetrics, ...]:
        """The kind metrics of ``outputs`` (one list per feed) against the FP32 outputs."""
        overrides, threshold = self.kind_options or ({}, DEFAULT_MAP_THRESHOLD)
        observer = OutputKindObserver(overrides, map_threshold=threshold, labels=self.position_labels)
        for ref, out, n in zip(self.reference, outputs, self.counts, strict=False):
            observer(self.names, ref, out, n)
        return tuple(observer.results())

    def score(self, *sessions: ort.InferenceSession) -> Score:
        """The score against the FP32 outputs of one session a part (``folds``); the sessions are only run."""
        if len(sessions) != self.parts:
            raise ValueError(f"{len(sessions)} sessions for {self.parts} parts of the samples")
        noise: dict[str, list[float]] = {n: [] for n in self.names}
        firsts: list[np.ndarray] = []
        everything: list[list[np.ndarray]] = []  # for a custom metric or kind metrics only
        for feed, ref, fold, count in zip(self.feeds, self.reference, self.fold_of, self.counts, strict=True):
            out = sessions[fold].run(self.names, feed)
            if self.metric is not None or self.kind_options is not None:
                everything.append(out)
            for name, r, q in zip(self.names, ref, out, strict=True):
                if r.dtype.kind == "f":
                    noise[name].extend(_sample_energies(r, q, count))
            firsts.append(out[0])
        noises = {n: math.fsum(noise[n]) for n in self.names}
        signal = self.signal
        sqnrs = {
            n: (10 * math.log10(signal[n] / noises[n]) if noises[n] > 0 else math.inf)
            for n in self.names
            if signal[n] > 0 or noises[n] > 0
        }
        worst = min(sqnrs, key=lambda n: sqnrs[n], default=None)
        sqnr = sqnrs[worst] if worst is not None else math.inf
        error = _sqnr_error(self.signal_samples[worst], noise[worst]) if worst is not None else 0.0
        accuracy = drop = None
        drop_error = 0.0
        if self.metric is not None:
            accuracy = 100.0 * evaluate_custom(self.metric, everything, self.names, self.labels, self.reference)
            drop = None if self.fp32_accuracy is None else self.fp32_accuracy - accuracy
            drop_error = self._metric_error(everything)
        elif self.classifier:
            correct = self._correct(firsts)
            accuracy = self._accuracy(correct)
            if correct is not None and self.fp32_correct is not None:
                drop = 100.0 * float(np.mean(self.fp32_correct)) - 100.0 * float(np.mean(correct))
                drop_error = _mean_error(self.fp32_correct - correct)
            else:  # no labels: the share of samples whose top-1 changed bounds the accuracy drop
                ref_top = np.concatenate([r[0].argmax(-1) for r in self.reference])
                q_top = np.concatenate([f.argmax(-1) for f in firsts])
                changed = (ref_top != q_top).astype(np.float64).reshape(-1)
                drop = 100.0 * float(np.mean(changed))
                drop_error = _mean_error(changed)
        kinds = self._kinds(everything) if self.kind_options is not None else ()
        return Score(accuracy, drop, sqnr, kinds, sqnr_error_db=error, accuracy_error=drop_error)

    def _metric_error(self, outputs: Sequence[Sequence[np.ndarray]]) -> float:
        """The standard error (points) of the custom metric over the scored samples, by batch means: the
        metric on ``METRIC_GROUPS`` runs of consecutive samples, ``std / sqrt(groups)`` of their values
        (a metric such as a detector's F1 is not a mean over samples, so it has no per-sample spread; this
        costs about one more call of it); a run whose value is not finite (none of what the metric counts)
        is left out. 0 when the samples cannot be split (fewer than 2 runs of 2, an output whose first axis
        is not the samples', labels that are not one a sample)."""
        assert self.metric is not None
        total = sum(self.counts)
        groups = min(METRIC_GROUPS, total // 2)
        labels = None if self.labels is None else np.asarray(self.labels)
        if groups < 2 or (labels is not None and (labels.ndim == 0 or labels.shape[0] != total)):
            return 0.0
        for ref, out, count in zip(self.reference, outputs, self.counts, strict=True):
            if any(a.ndim == 0 or a.shape[0] != count for a in (*ref, *out)):
                return 0.0
        stacked = [np.concatenate(parts) for parts in zip(*outputs, strict=True)]
        reference = [np.concatenate(parts) for parts in zip(*self.reference, strict=True)]
        values = []
        for part in np.array_split(np.arange(total), groups):
            run = slice(int(part[0]), int(part[-1]) + 1)
            part_labels = None if labels is None else labels[run]
            with warnings.catch_warnings():  # a run may hold none of what the metric counts (numpy says so)
                warnings.simplefilter("ignore", RuntimeWarning)
                value = evaluate_custom(
                    self.metric, [[a[run] for a in stacked]], self.names, part_labels, [[a[run] for a in reference]]
                )
            if math.isfinite(value):
                values.append(value)
        return _mean_error(np.asarray(values))


def _joined(labels: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """The labels of every part, one after another (None when a part has none)."""
    if any(part is None for part in labels):
        return None
    return labels[0] if len(labels) == 1 else np.concatenate([np.asarray(part) for part in labels])


def _mean_error(values: np.ndarray) -> float:
    """The standard error (points of 100) of the mean of per-sample values (0 for fewer than two)."""
    if values.size < 2:
        return 0.0
    return 100.0 * float(np.std(values, ddof=1)) / math.sqrt(values.size)


def _sample_energies(ref: np.ndarray, other: np.ndarray | None, count: int) -> list[float]:
    """Each sample's energy of ``ref`` (or of ``ref - other``), the samples on the batch's axis: axis 0, or
    the first other axis ``count`` long when axis 0 is not (a time-major ``[T, N, C]`` output, whose axis 0
    holds time steps: correlated, so ``_sqnr_error`` over them would read low). The sums do not change."""
    if ref.ndim >= 2 and ref.shape[0] != count and count in ref.shape[1:]:
        axis = ref.shape.index(count, 1)
        ref = np.moveaxis(ref, axis, 0)
        other = None if other is None else np.moveaxis(other, axis, 0)
    return sample_energies(ref, other)


def _sqnr_error(signal: Sequence[float], noise: Sequence[float]) -> float:
    """The standard error (dB) of ``10 log10(sum(signal) / sum(noise))`` over its samples, by the delta
    method: the log of a ratio of two sums of per-sample energies, their variances and covariance taken
    from the samples (0 for fewer than two samples or no noise)."""
    m = len(noise)
    if m < 2 or len(signal) != m:
        return 0.0
    s, n = np.asarray(signal, dtype=np.float64), np.asarray(noise, dtype=np.float64)
    total_s, total_n = float(s.sum()), float(n.sum())
    if total_s <= 0 or total_n <= 0:
        return 0.0
    cov = np.cov(s, n)  # sample (co)variances, ddof 1
    var = m * (cov[0, 0] / total_s**2 + cov[1, 1] / total_n**2 - 2 * cov[0, 1] / (total_s * total_n))
    return float(10 / math.log(10) * math.sqrt(max(0.0, var)))
