"""What each model output is, told from its FP32 values, and the task-level metric of each kind.

Kinds, detected on the first batch of FP32 outputs (axis 0 = samples; an output whose first axis is
not the batch is one sample), in this order:

* ``raw``: not float, or nothing below matched; measured by SQNR only.
* ``embedding``: the output's name says so (``embed``, ``pool``, ``hidden``, ``vector``,
  ``sentence``), or 1-D vectors of unit L2 norm: mean per-sample cosine.
* ``binary``: one value per sample in [0, 1] (a sigmoid), or a vector of independent [0, 1] scores
  that do not sum to 1 (multi-label): a sample agrees when every decision ``value > 0.5`` matches
  (``value > 0`` when an override calls logits binary).
* ``classifier``: a vector per sample (class scores: probabilities, log-probabilities or logits):
  a sample agrees when the argmax matches.
* ``sequence``: per-position class scores ``[T, C]`` whose rows are probabilities or log-probabilities
  (CTC recognizers, token classifiers): a sample agrees when the **whole** argmax sequence matches,
  position by position (strict: no CTC collapsing, so an agreeing recognizer also reads the same string).
  When the data has **labels per position** (``[N, T]`` beside a ``[N, T, C]`` output), only the
  positions with a label ``>= 0`` are compared, as accuracy scores them (the ignore-index convention of
  masked language models and token classifiers: padding and unmasked tokens are nobody's prediction);
  a sample without a labelled position is left out of the share.
  A **time-major** ``[T, N, C]`` output (axis 1 is the batch, axis 0 is not, ``T >= 8``: CRNN-style
  CTC heads, PyTorch's CTC layout) is read as ``[N, T, C]`` and is a sequence even when its scores are
  logits: the layout itself says "per-position class scores".
  Detection says when class 0 wins most positions, as a CTC blank does; it never reads an output as
  ``ctc`` by itself (collapsing repeats would pass a token classifier whose ``B I I`` became ``B I O``).
* ``ctc`` (given, never detected): a sequence read as a greedy CTC decoder reads it (argmax per position,
  repeats collapsed, blank class 0 dropped: PaddleOCR's, PyTorch's ``CTCLoss`` default): a sample agrees
  when the decoded strings match, as a reader of the recognizer's text sees it. A flip between a blank
  and a repeat of its neighbour changes no string; measured on PP-OCRv4's recognizer, strict sequences
  agree on 0.274 of 84 lines where the decoded strings agree on 0.488.
* ``map``: a dense map ``[C, H, W]`` (H, W >= 8) in [0, 1] (text or segmentation probability maps), or
  ``[A, B]`` (both >= 8) in [0, 1] whose rows are not distributions (a music model's frames x keys
  posteriorgram, a detector's anchors x classes sigmoid scores):
  mean per-sample IoU of the maps thresholded at ``map_threshold``, over the samples where either
  model finds a mask (a sample where neither does says nothing about the mask: counted, it made a
  text detector whose held-back images held little text pass at IoU 0.95 while its masks on text
  images fell to 0.84); 1.0 when no sample has a mask.

Every kind also gets its SQNR (dB) over all elements. ``--output-kind NAME=KIND`` overrides the
detection (``OutputKindObserver(overrides=...)``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from quantcli.compare.exact_sum import ordered_sum
from quantcli.compare.map_thresholds import DEFAULT_MAP_THRESHOLD, MapThreshold, as_thresholds
from quantcli.core.errors import InvalidOption
from quantcli.core.options import StrEnum

__all__ = [
    "AGREEMENT_KINDS",
    "CTC_BLANK",
    "DEFAULT_MAP_THRESHOLD",
    "KindMetrics",
    "KindPlan",
    "OutputKind",
    "OutputKindObserver",
    "ctc_decode",
    "detect_kind",
    "is_time_major",
    "kind_metrics",
    "parse_output_kinds",
    "reads_like_ctc",
]

_EMBEDDING_NAME = re.compile(r"embed|pool|hidden|vector|sentence", re.IGNORECASE)
_MIN_MAP_SIDE = 8
#: a time-major output needs this many positions: fewer is more likely a recurrent state [layers, N, H]
_MIN_TIME_STEPS = 8


class OutputKind(StrEnum):
    """What an output means, which decides its task-level metric."""

    CLASSIFIER = "classifier"
    SEQUENCE = "sequence"
    CTC = "ctc"
    BINARY = "binary"
    EMBEDDING = "embedding"
    MAP = "map"
    RAW = "raw"


#: the kinds measured by agreement (``min_agreement``), cosine and IoU
AGREEMENT_KINDS = frozenset({OutputKind.CLASSIFIER, OutputKind.SEQUENCE, OutputKind.CTC, OutputKind.BINARY})
#: the class a greedy CTC decoder drops (``ctc`` kind)
CTC_BLANK = 0
#: a sequence whose class 0 wins at least this share of positions reads like CTC (said, not acted on)
_BLANK_SHARE = 0.5
_CTC_LIKE = "as a CTC blank does"


def parse_output_kinds(items: Sequence[str] | None) -> dict[str, OutputKind]:
    """``["logits=classifier", "probs=map"]`` -> ``{"logits": CLASSIFIER, "probs": MAP}``.

    Raises:
        InvalidOption: an item without ``=`` or with an unknown kind.
    """
    kinds: dict[str, OutputKind] = {}
    for item in items or ():
        name, sep, kind = item.rpartition("=")
        if not sep or not name or kind not in {k.value for k in OutputKind}:
            choices = "|".join(k.value for k in OutputKind)
            raise InvalidOption(f"$output_kinds {item!r}: expected NAME={choices}", option="output_kinds")
        kinds[name] = OutputKind(kind)
    return kinds


#: rounding slack of [0, 1]: onnxruntime's vectorized Sigmoid returns 1.0000001 for large inputs
_UNIT_SLACK = 1e-5


def _in_unit(values: np.ndarray) -> bool:
    return bool(values.size) and float(values.min()) >= -_UNIT_SLACK and float(values.max()) <= 1.0 + _UNIT_SLACK


def _rows_are_distributions(values: np.ndarray) -> bool:
    """The last axis holds probabilities (>= 0, sum 1) or log-probabilities (<= 0, logsumexp 0)."""
    if values.shape[-1] < 2 or not values.size:
        return False
    v = values.astype(np.float64)
    if float(v.min()) >= 0.0 and np.allclose(v.sum(-1), 1.0, atol=1e-3):
        return True
    if float(v.max()) <= 0.0:
        peak = v.max(-1, keepdims=True)
        lse = peak[..., 0] + np.log(np.exp(v - peak).sum(-1))
        return bool(np.allclose(lse, 0.0, atol=1e-3))
    return False


def is_time_major(values: np.ndarray, batch: int) -> bool:
    """A ``[T, N, C]`` batch of ``N = batch`` samples laid out time first (``T >= 8``, ``T != N``)."""
    shape = values.shape
    return len(shape) == 3 and shape[1] == batch and shape[0] != batch and shape[0] >= _MIN_TIME_STEPS


def _per_sample(values: np.ndarray, batch: int, time_major: bool) -> np.ndarray:
    """``values`` with the samples on axis 0: a time-major ``[T, N, C]`` output transposed to ``[N, T, C]``,
    an output not batched on axis 0 made one sample."""
    values = np.asarray(values)
    if time_major:
        return values.transpose(1, 0, 2)
    if values.ndim == 0 or values.shape[0] != batch:
        return values[None]
    return values


def detect_kind(name: str, values: np.ndarray, *, time_major: bool = False) -> tuple[OutputKind, str]:
    """The kind of output ``name`` from a batch of its FP32 values (axis 0 = samples), and why.

    ``time_major``: the values were laid out ``[T, N, C]`` and are given here as ``[N, T, C]``.
    """
    if values.dtype.kind != "f":
        return OutputKind.RAW, f"{values.dtype} values"
    sample = values.shape[1:]
    if time_major and len(sample) == 2 and sample[1] >= 2:
        return OutputKind.SEQUENCE, f"time-major: {sample[0]} positions x {sample[1]} class scores{_blank_note(values)}"
    if _EMBEDDING_NAME.search(name) and math.prod(sample) > 1:
        return OutputKind.EMBEDDING, "named as an embedding"
    if math.prod(sample) == 1:
        if _in_unit(values):
            return OutputKind.BINARY, "one value in [0, 1] per sample"
        return OutputKind.RAW, "one value per sample, not in [0, 1]"
    if len(sample) == 1:
        return _detect_vector(values)
    if len(sample) == 2 and _rows_are_distributions(values):
        return OutputKind.SEQUENCE, f"{sample[0]} positions x {sample[1]} class probabilities{_blank_note(values)}"
    if len(sample) == 3 and min(sample[1:]) >= _MIN_MAP_SIDE and _in_unit(values):
        return OutputKind.MAP, f"{sample[0]}x{sample[1]}x{sample[2]} map in [0, 1]"
    if len(sample) == 2 and min(sample) >= _MIN_MAP_SIDE and _in_unit(values):
        return OutputKind.MAP, f"{sample[0]}x{sample[1]} map of independent scores in [0, 1]"
    return OutputKind.RAW, f"shape {list(sample)} per sample, no class or map semantics"


def _blank_note(values: np.ndarray) -> str:
    """``; class 0 wins 71% of positions, as a CTC blank does: ...`` or nothing."""
    if values.shape[1] < _MIN_TIME_STEPS:
        return ""
    share = float(np.mean(values.argmax(-1) == CTC_BLANK))
    if share < _BLANK_SHARE:
        return ""
    return f"; class {CTC_BLANK} wins {share:.0%} of positions, {_CTC_LIKE}: kind ctc reads decoded strings"


def reads_like_ctc(k: KindMetrics) -> bool:
    """A detected sequence whose class 0 won most positions (``_blank_note``): maybe a CTC recognizer."""
    return k.kind == OutputKind.SEQUENCE and _CTC_LIKE in k.reason


def _detect_vector(values: np.ndarray) -> tuple[OutputKind, str]:
    classes = values.shape[-1]
    if _rows_are_distributions(values):
        return OutputKind.CLASSIFIER, f"probabilities over {classes} classes"
    if _in_unit(values):
        return OutputKind.BINARY, f"{classes} independent scores in [0, 1]"
    norms = np.linalg.norm(values.astype(np.float64), axis=-1)
    if np.allclose(norms, 1.0, atol=1e-3):
        return OutputKind.EMBEDDING, f"unit-norm vectors of {classes}"
    return OutputKind.CLASSIFIER, f"scores over {classes} classes"


@dataclass(frozen=True, slots=True)
class KindMetrics:
    """One output's kind (detected or given) and its task-level metric against FP32."""

    name: str
    kind: OutputKind
    #: why the kind was chosen ("given" for an override)
    reason: str
    num_samples: int
    sqnr_db: float
    #: share of samples whose decision matches FP32's (classifier, sequence, ctc, binary)
    agreement: float | None = None
    #: mean per-sample cosine (embedding)
    cosine: float | None = None
    #: mean per-sample IoU of thresholded maps (map)
    iou: float | None = None
    #: the samples the metric is over: judged for agreement, with a mask for IoU (0: not counted)
    scored: int = 0
    #: standard deviation of the per-sample cosines or IoUs (None for agreement, and without samples)
    spread: float | None = None

    def summary(self) -> str:
        """``logits: classifier (scores over 10 classes): agreement 0.990, SQNR 31.2 dB``."""
        parts = [
            f"{label} {value:.3f}"
            for label, value in (("agreement", self.agreement), ("cosine", self.cosine), ("IoU", self.iou))
            if value is not None
        ]
        sqnr = "inf" if math.isinf(self.sqnr_db) else f"{self.sqnr_db:.1f}"
        return f"{self.name}: {self.kind} ({self.reason}): {', '.join([*parts, f'SQNR {sqnr} dB'])}"


@dataclass(slots=True)
class _KindAccumulator:
    name: str
    kind: OutputKind
    reason: str
    threshold: float
    signals: list[float] = field(default_factory=list)
    noises: list[float] = field(default_factory=list)
    count: int = 0
    agree: int = 0
    #: samples with a decision to agree on (all of them, unless labels per position leave some without)
    judged: int = 0
    #: agreement was taken over labelled positions only (labels per position came with the data)
    labelled: bool = False
    scores: list[np.ndarray] = field(default_factory=list)

    def update(self, ref: np.ndarray, q: np.ndarray, labels: np.ndarray | None = None) -> None:
        """One batch (axis 0 = samples); ``labels``: the batch's labels, used by a sequence when they are
        per position."""
        ref64, q64 = ref.astype(np.float64), q.astype(np.float64)
        self.signals.append(float(np.sum(ref64 * ref64)))
        self.noises.append(float(np.sum((ref64 - q64) ** 2)))
        self.count += ref.shape[0]
        if self.kind in AGREEMENT_KINDS:
            scored = _scored_positions(self.kind, ref, labels)
            equal = _decisions_equal(self.kind, ref64, q64, self.threshold, scored)
            if scored is None:
                self.agree += int(np.sum(equal))
                self.judged += ref.shape[0]
            else:
                some = scored.any(axis=1)
                self.agree += int(np.sum(equal & some))
                self.judged += int(np.sum(some))
                self.labelled = True
        elif self.kind == OutputKind.EMBEDDING:
            self.scores.append(_cosines(ref64, q64))
        elif self.kind == OutputKind.MAP:
            self.scores.append(_ious(ref64 > self.threshold, q64 > self.threshold))

    def merge(self, later: _KindAccumulator) -> None:
        """Append the same output's statistics over the batches that follow these."""
        self.signals += later.signals
        self.noises += later.noises
        self.count += later.count
        self.agree += later.agree
        self.judged += later.judged
        self.labelled = self.labelled or later.labelled
        self.scores += later.scores

    def result(self) -> KindMetrics:
        signal, noise = ordered_sum(self.signals), ordered_sum(self.noises)
        sqnr = 10 * math.log10(signal / noise) if noise > 0 else float("inf")
        values = _said(self.scores)
        mean = _mean_score(values) if self.scores else None
        reason = f"{self.reason}; agreement at labelled positions" if self.labelled else self.reason
        agreement = None
        if self.kind in AGREEMENT_KINDS and self.count:
            agreement = self.agree / self.judged if self.judged else 1.0  # no labelled position: nothing moved
        return KindMetrics(
            self.name,
            self.kind,
            reason,
            self.count,
            sqnr,
            agreement=agreement,
            cosine=mean if self.kind == OutputKind.EMBEDDING else None,
            iou=mean if self.kind == OutputKind.MAP else None,
            scored=self.judged if self.kind in AGREEMENT_KINDS else int(values.size),
            spread=float(values.std()) if values.size else None,
        )


def _scored_positions(kind: OutputKind, ref: np.ndarray, labels: np.ndarray | None) -> np.ndarray | None:
    """``[N, T]``: the positions of a sequence ``[N, T, C]`` whose label is ``>= 0``; None when the labels
    are not one integer per position (then every position counts)."""
    if kind != OutputKind.SEQUENCE or labels is None or ref.ndim != 3:
        return None
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu" or labels.shape != ref.shape[:2]:
        return None
    return labels >= 0


def _decisions_equal(
    kind: OutputKind, ref: np.ndarray, q: np.ndarray, threshold: float, scored: np.ndarray | None = None
) -> np.ndarray:
    """Per sample: does the quantized decision equal FP32's (at the ``scored`` positions of a sequence)?"""
    if kind == OutputKind.BINARY:
        return ((ref > threshold) == (q > threshold)).reshape(ref.shape[0], -1).all(axis=1)
    if kind == OutputKind.CTC:
        return np.array([np.array_equal(a, b) for a, b in zip(ctc_decode(ref), ctc_decode(q), strict=True)], dtype=bool)
    # classifier [N, C] or sequence [N, T, C]: the argmax at every position
    same = ref.argmax(-1) == q.argmax(-1)
    if scored is not None:
        same |= ~scored
    return same.reshape(ref.shape[0], -1).all(axis=1)


def ctc_decode(scores: np.ndarray) -> list[np.ndarray]:
    """Greedy CTC of ``[N, T, C]`` class scores: per sample, the argmax classes with repeats collapsed and
    the blank (``CTC_BLANK``) dropped."""
    best = scores.reshape(scores.shape[0], -1, scores.shape[-1]).argmax(-1)
    new = np.ones_like(best, dtype=bool)
    new[:, 1:] = best[:, 1:] != best[:, :-1]
    keep = new & (best != CTC_BLANK)
    return [row[k] for row, k in zip(best, keep, strict=True)]


def _cosines(ref: np.ndarray, q: np.ndarray) -> np.ndarray:
    r, c = ref.reshape(ref.shape[0], -1), q.reshape(q.shape[0], -1)
    norms = np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1)
    both_zero = ~r.any(axis=1) & ~c.any(axis=1)
    cos = np.sum(r * c, axis=1) / np.where(norms > 0, norms, 1.0)
    return np.where(norms > 0, cos, np.where(both_zero, 1.0, 0.0))


def _ious(ref: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per sample; NaN where neither mask has a pixel (nothing to compare: left out of the mean)."""
    r, c = ref.reshape(ref.shape[0], -1), q.reshape(q.shape[0], -1)
    inter, union = np.sum(r & c, axis=1), np.sum(r | c, axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def _mean_score(values: np.ndarray) -> float:
    """The mean of the per-sample scores that say something (``_said``: NaN is an IoU of two empty masks);
    1.0 when none does (every sample is empty on both sides: they agree)."""
    return float(values.mean()) if values.size else 1.0


def _said(scores: list[np.ndarray]) -> np.ndarray:
    """The per-sample scores that say something (not NaN), in one array."""
    values = np.concatenate(scores) if scores else np.zeros(0)
    return values[~np.isnan(values)]


@dataclass(frozen=True, slots=True)
class KindPlan:
    """What an output was found to be on the first FP32 batch: its kind, why, and its decision threshold.

    Shards of the data start from the plan the whole data's first batch gave (``OutputKindObserver.plan``),
    so that every shard measures each output as one process would.
    """

    kind: OutputKind
    reason: str
    threshold: float


class OutputKindObserver:
    """Streams batches of both models' outputs into per-output task metrics (``compare_outputs``'s
    ``observe`` hook): the kind of each output is detected on its first FP32 batch unless given.

    ``plan``: the kinds found on the data's first batch by another observer (``plan()``), for a shard
    of the data that does not start there; ``merge`` then appends a later shard's observer.
    ``labels``: the labels of the samples the batches bring, in their order (``Dataset.yielded_labels``);
    a sequence with labels per position is judged at the labelled positions only.
    """

    def __init__(
        self,
        overrides: Mapping[str, OutputKind] | None = None,
        *,
        map_threshold: MapThreshold = DEFAULT_MAP_THRESHOLD,
        plan: Mapping[str, KindPlan] | None = None,
        labels: np.ndarray | None = None,
    ) -> None:
        self.overrides = dict(overrides or {})
        self.map_threshold = as_thresholds(map_threshold)
        self._accs: dict[str, _KindAccumulator] = {}
        self._plan = dict(plan or {})
        self._labels = None if labels is None else np.asarray(labels)
        self._seen = 0  # samples observed so far: where the next batch's labels start

    def __call__(self, names: Sequence[str], ref: Sequence[np.ndarray], cand: Sequence[np.ndarray], n: int) -> None:
        """One batch of ``n`` samples: the outputs ``names`` of the FP32 and the quantized model."""
        for option, given in (("output_kinds", self.overrides), ("map_threshold", self.map_threshold.named())):
            unknown = sorted(set(given) - set(names))
            if unknown:
                raise InvalidOption(
                    f"${option} names {', '.join(unknown)}, not outputs of the model ({', '.join(names)})",
                    option=option,
                )
        labels = None
        if self._labels is not None and self._labels.ndim and self._seen + n <= self._labels.shape[0]:
            labels = self._labels[self._seen : self._seen + n]
        self._seen += n
        for name, r, c in zip(names, ref, cand, strict=True):
            time_major = is_time_major(np.asarray(r), n)
            r, c = _per_sample(r, n, time_major), _per_sample(c, n, time_major)
            if r.dtype.kind in "fiub":  # numbers (strings and objects are not compared)
                (self._accs.get(name) or self._start(name, r, time_major)).update(r, c, labels)

    def _start(self, name: str, ref: np.ndarray, time_major: bool) -> _KindAccumulator:
        if name in self._plan:
            p = self._plan[name]
            acc = self._accs[name] = _KindAccumulator(name, p.kind, p.reason, p.threshold)
            return acc
        if name in self.overrides:
            kind, reason = self.overrides[name], "given"
        else:
            kind, reason = detect_kind(name, ref, time_major=time_major)
        threshold = self.map_threshold.of(name) if kind == OutputKind.MAP else 0.5
        if kind == OutputKind.BINARY and not _in_unit(ref):
            threshold = 0.0  # logits called binary: the sign decides
        acc = self._accs[name] = _KindAccumulator(name, kind, reason, threshold)
        return acc

    def start(self, names: Sequence[str], ref: Sequence[np.ndarray], n: int) -> dict[str, KindPlan]:
        """Detect the kinds on a first batch of FP32 outputs (nothing is measured) and return the plan."""
        for name, r in zip(names, ref, strict=True):
            time_major = is_time_major(np.asarray(r), n)
            r = _per_sample(r, n, time_major)
            if r.dtype.kind in "fiub" and name not in self._accs:
                self._start(name, r, time_major)
        return self.plan()

    def plan(self) -> dict[str, KindPlan]:
        """The kind, reason and threshold of every output started so far, in the order first seen."""
        return {n: KindPlan(a.kind, a.reason, a.threshold) for n, a in self._accs.items()}

    def merge(self, later: OutputKindObserver) -> None:
        """Append ``later``'s statistics: the same outputs over the batches that follow these."""
        for name, acc in later._accs.items():
            if name in self._accs:
                self._accs[name].merge(acc)
            else:
                self._accs[name] = acc

    def results(self) -> list[KindMetrics]:
        """Each output's kind and metrics, in the order first seen."""
        return [acc.result() for acc in self._accs.values() if acc.count]


def kind_metrics(
    names: Sequence[str],
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    *,
    overrides: Mapping[str, OutputKind] | None = None,
    map_threshold: MapThreshold = DEFAULT_MAP_THRESHOLD,
    labels: np.ndarray | None = None,
) -> list[KindMetrics]:
    """The kinds and metrics of outputs already in memory (axis 0 = samples), for scripts and tests."""
    observer = OutputKindObserver(overrides, map_threshold=map_threshold, labels=labels)
    n = np.asarray(reference[0]).shape[0] if reference and np.asarray(reference[0]).ndim else 1
    observer(names, reference, candidate, n)
    return observer.results()
