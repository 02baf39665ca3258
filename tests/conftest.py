"""Shared fixtures: seeded rng, tiny models written to tmp_path, a CliRunner with a wide terminal."""

from __future__ import annotations

from collections.abc import Iterator
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


class SpeedVerdict:
    """Stands in for ``speedcheck.check_speedup``: a set speed-up, and the feeds it was asked to time."""

    def __init__(self, speedup: float = 1.5) -> None:
        self.speedup = speedup
        self.low: float | None = None  # the rounds' lower quartile (None: the median stands in)
        self.feeds: list[dict[str, np.ndarray]] = []

    def __call__(self, speedup: float, low: float | None = None) -> None:
        self.speedup, self.low = speedup, low

    def check(self, reference: object, candidate: object, feed: dict[str, np.ndarray], **_: object):
        from quantcli.verify.speedcheck import SpeedCheck

        self.feeds.append(feed)
        return SpeedCheck(
            fp32_ms=1.0, quantized_ms=1.0 / self.speedup, speedup=self.speedup, rounds=5, margin=0.0, low=self.low
        )


@pytest.fixture
def fixed_speedup(monkeypatch: pytest.MonkeyPatch) -> SpeedVerdict:
    """Make ``convert``'s batch-1 speed check return a set verdict instead of timing (tests never time).

    ``fixed_speedup(0.8)`` makes the quantized model 0.8x FP32 (default 1.5x); ``.feeds`` holds what was timed.
    """
    from quantcli.pipeline import verdict as convert_verdict
    from quantcli.verify import speedcheck

    verdict = SpeedVerdict()
    monkeypatch.setattr(speedcheck, "check_speedup", verdict.check)
    monkeypatch.setattr(convert_verdict, "timed_speed", verdict.check)
    return verdict


@pytest.fixture(autouse=True)
def _verdict_never_times(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every convert ends with a verdict that times both models: in tests it says 1.5x without timing
    (``fixed_speedup`` sets another speed-up)."""
    from quantcli.pipeline import verdict as convert_verdict

    monkeypatch.setattr(convert_verdict, "timed_speed", SpeedVerdict().check)


@pytest.fixture(autouse=True, scope="session")
def constant_kernel_speed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Plans in tests never depend on this machine's timing: kernel speed comes from the constants.

    The pipeline hands ``make_plan`` the oracle ``kernel_speed.host_oracle()`` gives; here it answers with
    ``ConstantSpeedOracle`` (today's decisions: the golden hashes hold on any host). Session-scoped, so
    module fixtures that convert are covered too; child processes get ``QUANTCLI_KERNEL_SPEED=constant``
    and a temporary cache folder (never the user's).
    """
    from quantcli.core.host import ConstantSpeedOracle
    from quantcli.verify import kernel_speed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernel_speed, "host_oracle", ConstantSpeedOracle)
        patch.setenv(kernel_speed.MODE_ENV, "constant")
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg_cache"))
        yield


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden", action="store_true", default=False, help="record golden files instead of checking them"
    )


@pytest.fixture
def mlp(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The over-sensitive MLP (``models.sensitive_mlp``: one MatMul must stay float) with disjoint,
    non-negative calibration and evaluation inputs, for the accuracy-search tests."""
    model = tmp_path / "mlp.onnx"
    model.write_bytes(models.sensitive_mlp().SerializeToString())
    rng = np.random.default_rng(5)
    calib, evald = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, x=np.abs(rng.normal(size=(128, 32))).astype(np.float32))
    np.savez(evald, x=np.abs(rng.normal(size=(128, 32))).astype(np.float32))
    return model, calib, evald
