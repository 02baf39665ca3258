"""The batch-1 speed check adds rounds while their middle half spans 1.0, and a search's answer must clear
1.0 in its lower quartile (``SpeedCheck.shown_faster``). The timings are set, not measured."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from quantcli.verify import speedcheck
from quantcli.verify.speedcheck import MAX_ROUNDS, SpeedCheck


def _rounds(monkeypatch: pytest.MonkeyPatch, speedups: list[float]) -> list[float]:
    """``check_speedup`` on a script of per-round speed-ups; returns the list it consumes from."""
    script = list(speedups)

    def measure(ref: object, cand: object, feed: object, **_: object) -> SimpleNamespace:
        s = script.pop(0)
        return SimpleNamespace(
            speedup=s, reference=SimpleNamespace(median_ms=1.0), candidate=SimpleNamespace(median_ms=1.0 / s)
        )

    monkeypatch.setattr(speedcheck, "make_session", lambda *a, **k: None)
    monkeypatch.setattr(speedcheck, "measure_latency", measure)
    return script


def test_clear_rounds_are_not_extended(monkeypatch):
    left = _rounds(monkeypatch, [1.5, 1.6, 1.4, 1.5, 1.55, 9.0, 9.0])
    check = speedcheck.check_speedup(None, None, {}, rounds=5)  # type: ignore[arg-type]
    assert check.rounds == 5 and left == [9.0, 9.0] and check.shown_faster
    assert check.low == pytest.approx(1.5)


def test_a_coin_toss_gets_more_rounds_up_to_the_cap(monkeypatch):
    _rounds(monkeypatch, [1.03, 0.97, 1.02, 0.98, 1.01] + [0.99, 1.02] * 10)
    check = speedcheck.check_speedup(None, None, {}, rounds=5)  # type: ignore[arg-type]
    assert check.rounds == MAX_ROUNDS
    assert check.faster and not check.shown_faster  # median 1.01, lower quartile 0.99


def test_extra_rounds_stop_once_the_answer_is_clear(monkeypatch):
    left = _rounds(monkeypatch, [1.2, 0.9, 1.2, 0.95, 1.2, 1.2, 1.2, 1.2, 1.2])
    check = speedcheck.check_speedup(None, None, {}, rounds=5)  # type: ignore[arg-type]
    assert check.rounds == 7 and len(left) == 2 and check.shown_faster


def test_shown_faster_without_a_quartile_is_the_median():
    assert SpeedCheck(1.0, 0.9, 1.1, 1, 0.0).shown_faster
    assert not SpeedCheck(1.0, 1.0, 1.0, 1, 0.0).shown_faster
    assert not SpeedCheck(1.0, 0.9, 1.1, 5, 0.0, low=1.0).shown_faster
