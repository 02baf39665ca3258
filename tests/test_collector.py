"""The statistics collector: several kinds of requests in one pass, memory groups, two models."""

from __future__ import annotations

import numpy as np
import pytest

from quantcli.passes.preprocess import preprocess
from quantcli.stats.collector import (
    ChannelRequest,
    CollectOptions,
    ErrorRequest,
    ErrorStats,
    RangeRequest,
    RangeStats,
    collect,
)
from tests import models
from tests.helpers import dataset, run


@pytest.fixture(scope="module")
def model():
    return preprocess(models.small_cnn())[0]


@pytest.fixture(scope="module")
def images():
    return {"x": models.structured_images(24, seed=5)}


def _requests(model):
    tensors = [model.graph.input[0].name] + [n.output[0] for n in model.graph.node]
    return [RangeRequest(t, moving_average=False, histogram_bins=256) for t in tensors] + [
        ChannelRequest(t, 1) for t in tensors[:3]
    ]


def test_ranges_and_channels_in_one_pass_match_numpy(model, images):
    ds = dataset(model, images)
    requests = _requests(model)
    got = collect([model], ds, requests, CollectOptions(batch_size=5))
    assert got.passes == 1
    x = images["x"]
    rng = got[RangeRequest("x", histogram_bins=256)]
    assert isinstance(rng, RangeStats) and rng.minmax.result() == (float(x.min()), float(x.max()))
    assert int(rng.histogram.result().counts.sum()) == x.size
    ch = got[ChannelRequest("x", 1)].result()
    np.testing.assert_allclose(ch.mean, x.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_array_equal(ch.min, x.min(axis=(0, 2, 3)))
    np.testing.assert_array_equal(ch.absmax, np.abs(x).max(axis=(0, 2, 3)))


def test_memory_groups_give_the_same_statistics(model, images):
    ds = dataset(model, images)
    requests = _requests(model)
    whole = collect([model], ds, requests, CollectOptions(batch_size=8))
    grouped = collect([model], ds, requests, CollectOptions(batch_size=8, max_memory=16 * 1024))
    assert whole.passes == 1 and grouped.passes > 2
    # onnxruntime may fuse differently when other outputs are exposed: equal up to float rounding
    for r in requests:
        if isinstance(r, RangeRequest):
            a, b = whole[r], grouped[r]
            np.testing.assert_allclose(a.minmax.result(), b.minmax.result(), rtol=1e-5, err_msg=r.tensor)
            assert a.histogram.result().counts.sum() == b.histogram.result().counts.sum()
        else:
            np.testing.assert_allclose(whole[r].result().mean, grouped[r].result().mean, rtol=1e-5, atol=1e-6)
    x = RangeRequest("x", histogram_bins=256)  # the input itself: exact whatever the grouping
    np.testing.assert_array_equal(whole[x].histogram.result().counts, grouped[x].histogram.result().counts)


def test_error_of_a_model_against_itself_and_against_a_scaled_copy(model, images):
    ds = dataset(model, images)
    out = model.graph.output[0].name
    same = collect([model, model], ds, [ErrorRequest(out, out)], CollectOptions(batch_size=7))
    stats = same[ErrorRequest(out, out)]
    assert isinstance(stats, ErrorStats) and stats.noise == 0.0 and stats.signal > 0
    ref = run(model, {"x": images["x"]})[0]
    assert stats.first is not None and stats.first.shape[0] == 7
    np.testing.assert_allclose(stats.first, ref[:7], rtol=1e-5, atol=1e-6)
    assert (stats.lo, stats.hi) == (float(ref.min()), float(ref.max()))


def test_statistics_sessions_sleep_between_runs_instead_of_spinning(model, images):
    from quantcli.graph.session import make_session
    from quantcli.stats.calibration import CalibrationOptions, expose
    from quantcli.stats.collector import CollectOptions, _session

    key = "session.intra_op.allow_spinning"

    def spinning(session) -> bool:
        try:
            return session.get_session_options().get_session_config_entry(key) != "0"
        except Exception:  # onnxruntime raises for an entry never set: its default, spinning
            return True

    assert spinning(make_session(model))  # onnxruntime's default elsewhere (latency is measured with it)
    probe = expose(model, dataset(model, images), CalibrationOptions()).probe
    collector = _session(model, [model.graph.node[0].output[0]], CollectOptions())
    assert not spinning(probe) and collector is not None and not spinning(collector)


def test_a_tiny_run_gets_one_onnxruntime_thread(monkeypatch, model, images):
    """Runs moving a few KB (a sample at a time, a small model) are faster on one intra-op thread than
    on onnxruntime's pool; larger runs, or threads asked for, keep what was asked."""
    from quantcli.stats import collector

    built: list[int] = []
    real = collector.make_session

    def spy(*args, **kwargs):
        built.append(kwargs["threads"])
        return real(*args, **kwargs)

    monkeypatch.setattr(collector, "make_session", spy)
    ds = dataset(model, images)
    requests = [RangeRequest(model.graph.node[0].output[0])]
    tiny = collect([model], ds, requests, CollectOptions(batch_size=1))
    assert built[-1] == 1
    built.clear()
    monkeypatch.setattr(collector, "ONE_THREAD_BYTES", 0)  # as if the run were large
    large = collect([model], ds, requests, CollectOptions(batch_size=1))
    assert built and 1 not in built
    built.clear()
    collect([model], ds, requests, CollectOptions(batch_size=1, threads=2))
    assert built == [2]
    assert tiny[requests[0]].minmax.result() == large[requests[0]].minmax.result()
