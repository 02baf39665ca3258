"""The ``ctc`` output kind: a sequence judged by its greedy-CTC decoded strings, and the detection's hint."""

from __future__ import annotations

import numpy as np
import pytest

from quantcli.compare.output_kinds import (
    OutputKind,
    OutputKindObserver,
    ctc_decode,
    detect_kind,
    kind_metrics,
    parse_output_kinds,
    reads_like_ctc,
)

CLASSES = 5


def _scores(*paths: list[int]) -> np.ndarray:
    """``[N, T, C]`` one-hot-ish probabilities whose argmax per position is ``paths``."""
    out = np.full((len(paths), len(paths[0]), CLASSES), 0.05, np.float32)
    for n, path in enumerate(paths):
        out[n, np.arange(len(path)), path] = 0.8
    return out


def test_decode_collapses_repeats_and_drops_the_blank():
    decoded = ctc_decode(_scores([1, 1, 0, 2, 2], [0, 3, 0, 3, 0], [4, 4, 4, 4, 4]))
    assert [d.tolist() for d in decoded] == [[1, 2], [3, 3], [4]]


def test_ctc_agrees_where_the_strings_do_and_strict_sequences_do_not():
    ref = _scores([1, 1, 0, 2, 0, 0], [3, 0, 3, 0, 0, 0], [1, 2, 0, 0, 0, 0])
    # sample 0: blank/repeat flips, same string; sample 1: "33" read as "3"; sample 2: "12" read as "13"
    cand = _scores([1, 0, 0, 2, 2, 0], [3, 3, 3, 0, 0, 0], [1, 3, 0, 0, 0, 0])
    (strict,) = kind_metrics(["y"], [ref], [cand], overrides={"y": OutputKind.SEQUENCE})
    (ctc,) = kind_metrics(["y"], [ref], [cand], overrides={"y": OutputKind.CTC})
    assert strict.agreement == 0.0
    assert ctc.kind == OutputKind.CTC and ctc.agreement == pytest.approx(1 / 3)


def test_ctc_reads_a_time_major_output_per_sample():
    ref = _scores([1, 1, 0, 2, 0, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0, 0, 0, 0]).transpose(1, 0, 2)  # [T, N, C]
    cand = _scores([1, 0, 2, 2, 0, 0, 0, 0, 0], [0, 2, 0, 0, 0, 0, 0, 0, 0]).transpose(1, 0, 2)
    observer = OutputKindObserver({"y": OutputKind.CTC})
    observer(["y"], [ref], [cand], 2)  # a batch of 2 samples, laid out [T, N, C]
    (m,) = observer.results()
    assert (m.num_samples, m.agreement) == (2, 1.0)


def test_ctc_is_given_never_detected_but_a_blank_heavy_sequence_is_said_to_look_like_one():
    blank_heavy = _scores(*([[1, 0, 0, 2, 0, 0, 3, 0, 0, 0]] * 2))
    kind, reason = detect_kind("probs", blank_heavy)
    assert kind == OutputKind.SEQUENCE and "class 0 wins 70% of positions" in reason
    (m,) = kind_metrics(["probs"], [blank_heavy], [blank_heavy])
    assert reads_like_ctc(m)
    tokens = _scores(*([[1, 2, 3, 4, 1, 0, 2, 3, 4, 1]] * 2))  # class 0 rare: a token classifier
    (t,) = kind_metrics(["probs"], [tokens], [tokens])
    assert t.kind == OutputKind.SEQUENCE and not reads_like_ctc(t)
    short = _scores(*([[0, 0, 1]] * 2))  # too few positions to say
    assert "CTC" not in detect_kind("probs", short)[1]


def test_parse_accepts_ctc():
    assert parse_output_kinds(["softmax_11.tmp_0=ctc"]) == {"softmax_11.tmp_0": OutputKind.CTC}


def test_the_verdict_points_a_ctc_like_sequence_to_the_ctc_kind():
    from quantcli.cli.flags import flag
    from quantcli.compare.output_kinds import KindMetrics
    from quantcli.modes.common import ConvertMode
    from quantcli.pipeline import verdict as v

    class _Ctx:
        class request:
            mode = ConvertMode.STATIC

    reason = "40 positions x 6625 class probabilities; class 0 wins 80% of positions, as a CTC blank does: ..."
    like = KindMetrics("softmax", OutputKind.SEQUENCE, reason, 41, 12.9, agreement=0.46)
    given = KindMetrics("softmax", OutputKind.CTC, "given", 41, 12.9, agreement=0.66)
    (hint,) = v._warnings([like], None, _Ctx())  # type: ignore[arg-type]
    (plain,) = v._warnings([given], None, _Ctx())  # type: ignore[arg-type]
    text = v.Verdict("s", 41, (like,), None, (hint,), (), v._OPTIONS).render(flag)
    assert "--output-kind softmax=ctc judges its decoded strings" in text[1]
    assert "=ctc" not in plain
