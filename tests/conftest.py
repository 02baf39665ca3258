"""Shared fixtures: seeded rng, tiny models written to tmp_path, a CliRunner with a wide terminal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests import models

REPO = Path(__file__).resolve().parent.parent
SAMPLE_MODELS = REPO / "sample_models"
CALIBRATION_DATA = REPO / "calibration_data"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def cnn_path(tmp_path: Path) -> Path:
    """A small conv net (Conv+BN+Relu, residual Add, MaxPool, GAP, Flatten, Gemm) saved to disk."""
    path = tmp_path / "cnn.onnx"
    path.write_bytes(models.small_cnn().SerializeToString())
    return path


@pytest.fixture
def cnn_data(tmp_path: Path) -> Path:
    """Structured (not white-noise) inputs for ``small_cnn``: smooth images with a few bright strokes."""
    path = tmp_path / "cnn_data.npz"
    np.savez(path, x=models.structured_images(96, seed=7))
    return path


@pytest.fixture
def fixed_speedup(monkeypatch: pytest.MonkeyPatch):
    """Make ``convert``'s batch-1 speed check return a set verdict instead of timing (tests never time).

    Returns a setter: ``fixed_speedup(0.8)`` makes the quantized model 0.8x FP32; the default is 1.5x.
    """
    from quantcli import speedcheck

    state = {"speedup": 1.5}

    def check(reference, candidate, feed, **_: object) -> speedcheck.SpeedCheck:
        return speedcheck.SpeedCheck(
            fp32_ms=1.0, quantized_ms=1.0 / state["speedup"], speedup=state["speedup"], rounds=5, margin=0.0
        )

    monkeypatch.setattr(speedcheck, "check_speedup", check)

    def set_speedup(value: float) -> None:
        state["speedup"] = value

    return set_speedup
