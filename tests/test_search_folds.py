"""The search's second fold: each part of the scored samples is run by the candidate calibrated without it."""

from __future__ import annotations

import jsonschema
import numpy as np
import pytest
from onnx import numpy_helper

from quantcli import api
from quantcli.cli.flags import flag
from quantcli.core.options import CalibrationMethod, QuantConfig
from quantcli.data.datasets import Dataset, InputSpec, model_input_specs, open_dataset
from quantcli.graph.model_io import load_model
from quantcli.graph.session import make_session
from quantcli.pipeline.holdout import second_fold, spread
from quantcli.schemas import convert_document, load_schema
from quantcli.search.accuracy_search import (
    Budget,
    BudgetNotMetError,
    SearchBase,
    SearchOptions,
    SearchResult,
    SecondFold,
    search_quantization,
)
from quantcli.search.evaluator import Evaluator
from quantcli.stats.calibration import calibrate
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
    kept, second, unscored = second_fold(whole, spread(whole.num_samples, 40))
    assert unscored is not None and unscored.num_samples == whole.num_samples - 80
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


def _search_with_confirmation(confirm_scale: float) -> tuple[SearchResult | None, list[str]]:
    """A search on the real digits (calibration on 136, two folds of 32 scored) whose confirmation samples
    are 32 other digits times ``confirm_scale``: scaled up, past every range calibration saw, they clip."""
    model = load_model(DIGITS)
    specs = model_input_specs(model)
    x = np.load(CALIBRATION_DATA / "digits_cnn_calib.npz")["input"]

    def data(rows: np.ndarray) -> Dataset:
        return Dataset.from_arrays(specs, {"input": rows})

    def base(rows: np.ndarray) -> SearchBase:
        calibration = calibrate(model, data(rows), model_sha256="0" * 64, method=CalibrationMethod.PERCENTILE)
        return SearchBase(model, calibration, QuantConfig())

    fold = SecondFold((base(np.concatenate([x[:104], x[136:168]])),), data(x[104:136]), data(x[168:] * confirm_scale))
    logs: list[str] = []
    options = SearchOptions(Budget(min_sqnr_db=30.0), max_fallback=0)  # no node to float: the methods decide
    try:
        result = search_quantization(base(x[32:168]), data(x[:32]), options, log=logs.append, second_fold=fold)
    except BudgetNotMetError:
        return None, logs
    return result, logs


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_a_trial_meets_the_budget_only_when_the_unscored_samples_confirm_it(scale):
    result, logs = _search_with_confirmation(scale)
    first = next(line for line in logs if "step 1 " in line)
    assert any("the budget is met on 64 samples, and confirmed on 32 others" in line for line in logs)
    if scale == 1.0:  # like the scored samples: what meets on the folds is confirmed
        assert result is not None and result.chosen.confirmation is not None
        assert "confirmed on the samples the search does not choose on" in first and "meets budget" in first
    else:  # clipped there: the trials that meet on the folds are not confirmed, and none is returned
        assert "not confirmed on the samples the search does not choose on" in first and "misses budget" in first
        assert result is None


def test_the_folds_keep_whole_batches_of_a_fixed_batch_model():
    """A model whose batch axis is fixed at 4 runs only whole batches: 22 samples, 4 held a share, 14 left
    for the confirmation, which keeps 12 (three batches); 10 samples leave 2, under one batch: none."""
    specs = [InputSpec("x", np.dtype(np.float32), (4, 3))]
    x = np.arange(22 * 3, dtype=np.float32).reshape(22, 3)
    data = Dataset.from_arrays(specs, {"x": x})
    kept, second, unscored = second_fold(data, spread(22, 4))
    assert second.num_samples == 4 and kept.num_samples == 18
    assert unscored is not None and unscored.num_samples == 12
    assert sum(1 for _ in unscored.batches(1)) == 3
    small = Dataset.from_arrays(specs, {"x": x[:10]})
    assert second_fold(small, spread(10, 4))[2] is None


def test_the_algorithm_stage_has_a_second_fold_too(tmp_path):
    """With --search-algorithms the second base (every algorithm, MSE weight clipping) is built again from the
    second fold's data, so its candidates are scored on both shares like the plain ones."""
    calib = CALIBRATION_DATA / "digits_cnn_calib.npz"
    result = api.convert_model(
        DIGITS, tmp_path / "q.onnx", data_path=calib, eval_data=calib, verdict=False,
        search=SearchOptions(Budget(min_sqnr_db=30.0), try_algorithms=True, max_fallback=0),
    )  # fmt: skip
    search = result.search
    assert search is not None and search.num_samples == 128
    algorithm_trials = [t for t in search.trials if "(+ all algorithms)" in t.action]
    assert algorithm_trials and all(t.sqnr_error_db > 0 for t in algorithm_trials)  # scored on 128 samples


def _own_data(tmp_path, blend: bool) -> tuple[object, object]:
    """The 200 real digits as a search's own data (64 + 64 scored, 72 confirm); with ``blend``, each of the 72
    is a mix of two digits where FP32's top class changes (bisected): a quantized model reads many otherwise."""
    d = dict(np.load(CALIBRATION_DATA / "digits_cnn_calib.npz"))
    first = spread(200, 64)
    rest = sorted(set(range(200)) - set(first))
    unscored = sorted(set(rest) - {rest[i] for i in spread(len(rest), 64)})
    x = d["input"].copy()
    if blend:
        a, b = x[unscored], x[unscored][::-1]
        fp32 = make_session(load_model(DIGITS))

        def top(w: np.ndarray) -> np.ndarray:
            return fp32.run(None, {"input": w[:, None, None, None] * a + (1 - w[:, None, None, None]) * b})[0].argmax(1)

        low, high = np.zeros(len(a), np.float32), np.ones(len(a), np.float32)  # top(high) is a's class
        for _ in range(24):
            mid = (low + high) / 2
            same = top(mid) == top(high)
            high, low = np.where(same, mid, high), np.where(same, low, mid)
        x[unscored] = high[:, None, None, None] * a + (1 - high[:, None, None, None]) * b
    data = tmp_path / "own.npz"
    np.savez(data, **{**d, "input": x})
    return data, x[unscored]


def test_the_verdict_after_a_search_also_checks_the_samples_it_did_not_choose_on(tmp_path):
    data, rows = _own_data(tmp_path, blend=False)
    result = api.convert_model(
        DIGITS, tmp_path / "q.onnx", data_path=data, eval_data=data, search=SearchOptions(Budget(min_agreement=0.98))
    )
    verdict = result.verdict
    assert verdict is not None and verdict.confirmation is not None and verdict.passed
    assert verdict.num_samples == 64 and verdict.confirmation.num_samples == 72
    # the written model against FP32 on exactly those 72 digits
    fp32, quant = make_session(load_model(DIGITS)), make_session(load_model(tmp_path / "q.onnx"))
    ref, got = fp32.run(None, {"input": rows})[0], quant.run(None, {"input": rows})[0]
    (kind,) = verdict.confirmation.kinds
    assert kind.agreement == pytest.approx(float((ref.argmax(1) == got.argmax(1)).mean()))
    lines = verdict.render(flag)
    assert lines[1].startswith(
        "verdict: also on 72 --data samples the search did not choose on (calibration read them): logits classifier "
        "agreement"
    )
    doc = convert_document(result, name=flag)
    jsonschema.validate(doc, load_schema(doc["schema"]))
    assert doc["verdict"]["confirmation"]["num_samples"] == 72 and doc["verdict"]["warnings"] == []
    assert doc["verdict"]["unchecked"] == lines[2:]  # the confirmation's line is not among them


def test_a_confirmation_below_the_verdicts_bound_warns(tmp_path):
    """An SQNR budget, met on the scored digits and confirmed on the mixed ones (their SQNR holds), whose top
    class flips on many of those: the verdict passes the scored share and warns on the confirmation's."""
    data, _ = _own_data(tmp_path, blend=True)
    options = SearchOptions(Budget(min_sqnr_db=20.0), methods=(CalibrationMethod.PERCENTILE,), max_fallback=0)
    result = api.convert_model(DIGITS, tmp_path / "q.onnx", data_path=data, eval_data=data, search=options)
    verdict = result.verdict
    assert verdict is not None and verdict.confirmation is not None
    (scored,), (confirmed,) = verdict.kinds, verdict.confirmation.kinds
    assert scored.agreement is not None and scored.agreement >= 0.98
    assert confirmed.agreement is not None and confirmed.agreement < 0.98
    (warning,) = verdict.warnings
    assert not verdict.passed
    assert f"logits (classifier) agreement {confirmed.agreement:.3f} < 0.98 on the 72 samples the search" in warning
    doc = convert_document(result, name=flag)
    jsonschema.validate(doc, load_schema(doc["schema"]))
    assert doc["verdict"]["warnings"] == [verdict.substitute(warning, flag)]


def test_without_confirmation_samples_the_verdict_has_none(tmp_path):
    eval_data = CALIBRATION_DATA / "digits_cnn_eval.npz"  # other data: the search chose on it, no folds
    result = api.convert_model(
        DIGITS, tmp_path / "q.onnx", data_path=CALIBRATION_DATA / "digits_cnn_calib.npz", eval_data=eval_data,
        search=SearchOptions(Budget(min_agreement=0.98)),
    )  # fmt: skip
    assert result.verdict is not None and result.verdict.confirmation is None
    assert convert_document(result)["verdict"]["confirmation"] is None
