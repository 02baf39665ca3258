"""Audio front ends found on a real model (issue 15, Spotify Basic Pitch), as a tiny graph: the failure and the fix.

* ``log-magnitude``: strided filter Convs over raw samples, a magnitude and ``Log(|X|² + eps)`` (Basic Pitch's
  constant-Q front end): quantized, the quiet bins round to 0 and the log makes them its largest error.

The test checks the plan's reason code and that the rule recovers the fidelity the default lost (the SQNR of
the model with the rule disabled is the failure the rule repairs).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantcli.core.options import QuantConfig
from quantcli.static.plan import SkipCode
from tests.helpers import held_out_fidelity
from tests.models import make_model

SAMPLES, TAPS, STRIDE, BINS = 1024, 64, 16, 12


def _init(name: str, value: np.ndarray | float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _audio(n: int, seed: int) -> np.ndarray:
    """Tones whose loudness spans 60 dB (a loud note over quiet partials), as [N, 1, 1, SAMPLES]."""
    rng = np.random.default_rng(seed)
    t = np.arange(SAMPLES) / SAMPLES
    out = np.zeros((n, SAMPLES))
    for k in range(1, BINS + 1):
        amp = 10 ** (-3 * rng.uniform(size=(n, 1)))  # 0 to -60 dB
        out += amp * np.sin(2 * np.pi * (8 * k * t[None] + rng.uniform(size=(n, 1))))
    return out[:, None, None, :].astype(np.float32)


def spectral_model(*, relu: bool = False, seed: int = 0) -> onnx.ModelProto:
    """Raw samples -> low-pass Conv -> cos/sin filter Conv (stride 16) -> |X|² -> Log(+eps) -> 1x1 Conv.

    ``relu``: a Relu after the filters (no longer a linear chain to the Log: the rule must not fire).
    """
    rng = np.random.default_rng(seed)
    t = np.arange(TAPS) / SAMPLES
    freqs = 8 * np.arange(1, BINS + 1)
    window = np.hanning(TAPS)
    phase = 2 * np.pi * freqs[:, None] * t
    filters = np.concatenate([np.cos(phase) * window, np.sin(phase) * window])
    lowpass = np.hanning(9) / np.hanning(9).sum()
    inits = [
        _init("w_lp", lowpass.reshape(1, 1, 1, 9)),
        _init("w_bank", filters.reshape(2 * BINS, 1, 1, TAPS)),
        _init("eps", 1e-6),
        _init("w_head", rng.normal(size=(8, 2 * BINS, 1, 1)) * 0.3),
    ]
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "w_lp"], ["lp"], name="lowpass", pads=[0, 4, 0, 4]),
        n("Conv", ["lp", "w_bank"], ["bank"], name="filters", strides=[1, STRIDE]),
    ]
    spec = "bank"
    if relu:
        nodes.append(n("Relu", ["bank"], ["bank_relu"], name="relu"))
        spec = "bank_relu"
    nodes += [
        n("Mul", [spec, spec], ["power"], name="power"),
        n("Add", ["power", "eps"], ["power_eps"], name="floor"),
        n("Log", ["power_eps"], ["log_power"], name="log"),
        n("Conv", ["log_power", "w_head"], ["y"], name="head"),
    ]
    frames = (SAMPLES - TAPS) // STRIDE + 1
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 1, SAMPLES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 1, frames])],
        inits,
    )


def _fidelity(model: onnx.ModelProto, config: QuantConfig) -> tuple[float, dict[str, SkipCode]]:
    return held_out_fidelity(model, config, _audio(32, seed=1), _audio(16, seed=2))


def test_log_magnitude_front_end_stays_float() -> None:
    model = spectral_model()
    fixed, skips = _fidelity(model, QuantConfig())
    broken, broken_skips = _fidelity(model, QuantConfig(disabled_rules=frozenset({"log-magnitude"})))
    front_end = {"lowpass", "filters"}
    assert {k for k, c in skips.items() if c == SkipCode.LOG_MAGNITUDE} == front_end
    assert "head" not in skips  # the layer after the Log is quantized as before
    assert not front_end & set(broken_skips)  # the old plan quantized the filters
    assert fixed > 30 and fixed > broken + 15, (fixed, broken)


def test_log_magnitude_stops_at_a_nonlinearity() -> None:
    """A Relu between the filters and the Log ends the linear chain: the filters stay quantized."""
    _, skips = _fidelity(spectral_model(relu=True), QuantConfig())
    assert SkipCode.LOG_MAGNITUDE not in skips.values()
