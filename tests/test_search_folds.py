"""The search's second fold: each part of the scored samples is run by the candidate calibrated without it."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from quantcli import api
from quantcli.data.datasets import model_input_specs, open_dataset
from quantcli.graph.model_io import load_model
from quantcli.graph.session import make_session
from quantcli.pipeline.holdout import second_fold, spread
from quantcli.search.accuracy_search import Budget, SearchOptions
from quantcli.search.evaluator import Evaluator
from tests.conftest import CALIBRATION_DATA, SAMPLE_MODELS

DIGITS = SAMPLE_MODELS / "digits_cnn.onnx"
DIGITS_EVAL = CALIBRATION_DATA / "digits_cnn_eval.npz"  # real digits with their labels


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> object:
    out = tmp_path_factory.mktemp("folds") / "q.onnx"
    api.convert_model(DIGITS, out, data_path=CALIBRATION_DATA / "digits_cnn_calib.npz", verdict=False)
    return load_model(out)


@pytest.fixture(scope="module")
def blurred() -> object:
    """The digits CNN with noise on its classifier's weights: it reads some digits differently."""
    model = load_model(DIGITS)
    (fc,) = [t for t in model.graph.initializer if t.name == "fc.weight"]
    w = numpy_helper.to_array(fc)
    noisy = w + np.random.default_rng(0).normal(scale=0.5 * float(w.std()), size=w.shape).astype(w.dtype)
    fc.CopyFrom(numpy_helper.from_array(noisy, fc.name))
    return model


def _parts() -> tuple[object, object, object]:
    reference = load_model(DIGITS)
    whole = open_dataset(DIGITS_EVAL, model_input_specs(reference))
    kept, second = second_fold(whole, spread(whole.num_samples, 40))
    return reference, kept, second


def test_two_parts_scored_by_one_model_read_as_the_whole_data(quantized):
    reference, kept, second = _parts()
    split = Evaluator(reference, kept, folds=(second,))
    session = make_session(quantized)
    both = split.score(session, session)
    assert split.num_samples == kept.num_samples + second.num_samples
    # the same samples in another order: the same share of changed top-1 and accuracy, summed energies
    whole = Evaluator(reference, open_dataset(DIGITS_EVAL, model_input_specs(reference)))
    alone = whole.score(session)
    assert both.accuracy_drop == pytest.approx(alone.accuracy_drop)
    assert both.accuracy == pytest.approx(alone.accuracy)
    assert both.sqnr_db == pytest.approx(alone.sqnr_db, abs=1e-9)


def test_each_part_is_run_by_its_own_model(blurred):
    reference, kept, second = _parts()
    split = Evaluator(reference, kept, folds=(second,), kinds=({}, 0.5))
    quant, fp32 = make_session(blurred), make_session(reference)
    first_only = Evaluator(reference, kept, kinds=({}, 0.5)).score(quant)
    mixed = split.score(quant, fp32)  # the second part read exactly: only the first part's changes count
    n1, n2 = kept.num_samples, second.num_samples
    (kind,) = mixed.kinds
    (alone,) = first_only.kinds
    assert alone.agreement is not None and alone.agreement < 1.0  # the noise changes some digits
    assert kind.agreement == pytest.approx((alone.agreement * n1 + n2) / (n1 + n2))
    assert kind.scored == n1 + n2
    assert mixed.sqnr_db > first_only.sqnr_db  # the same noise over more signal
    with pytest.raises(ValueError, match="1 sessions for 2 parts"):
        split.score(quant)


def test_the_second_fold_holds_other_samples_and_calibrates_on_the_rest():
    _, kept, second = _parts()  # kept: what the second fold's calibration reads
    whole = open_dataset(DIGITS_EVAL, model_input_specs(load_model(DIGITS)))
    assert second.num_samples == 40 and kept.num_samples == whole.num_samples - 40
    x = np.load(DIGITS_EVAL)["input"]
    rest = np.delete(np.arange(whole.num_samples), spread(whole.num_samples, 40))
    picked = rest[spread(len(rest), 40)]
    got = np.concatenate([next(iter(f.values())) for f in second.batches(8)])
    np.testing.assert_array_equal(got, x[picked])
    assert not set(picked) & set(spread(whole.num_samples, 40))


def test_a_search_on_its_own_data_reports_both_folds_samples(tmp_path):
    logs: list[str] = []
    calib = CALIBRATION_DATA / "digits_cnn_calib.npz"
    result = api.convert_model(
        DIGITS, tmp_path / "q.onnx", data_path=calib, eval_data=calib,
        search=SearchOptions(Budget(min_agreement=0.98)), log=logs.append, verdict=False,
    )  # fmt: skip
    assert result.search is not None and result.search.num_samples == 128
    assert "the budget is met on 128 samples" in " ".join(logs)
    assert result.search.recipe("0" * 64, result.search.base.config, 99.99).search["evaluation_samples"] == 128
