"""Task-level budgets for the search: agreement, cosine and IoU on every output of their kind."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from quantcli import api
from quantcli.cli.app import app
from quantcli.cli.flags import SearchFlags
from quantcli.compare.metrics import MetricSpec
from quantcli.compare.output_kinds import KindMetrics, OutputKind
from quantcli.core.errors import QuantCliError
from quantcli.core.options import CalibrationMethod, QuantConfig
from quantcli.data.datasets import Dataset, model_input_specs
from quantcli.graph.model_io import load_model
from quantcli.graph.session import make_session
from quantcli.search.accuracy_search import (
    FLOAT_MAC_COST,
    INTEGER_MAC_COST,
    Budget,
    BudgetNotMetError,
    Candidate,
    SearchOptions,
    Trial,
    _need,
    cheapest,
    model_cost,
)
from quantcli.search.budget import DEFAULT_MARGIN, Score, key, kind_margin, meets, required_share, standard_error
from quantcli.search.evaluator import Evaluator, _sqnr_error
from tests import models
from tests.conftest import CALIBRATION_DATA, SAMPLE_MODELS
from tests.helpers import run

CONFIG = QuantConfig()
pytestmark = pytest.mark.usefixtures("fixed_speedup")


def _search(
    mlp: tuple[Path, Path, Path], out: Path, options: SearchOptions, log: Callable[[str], None] | None = None
) -> api.ConvertResult:
    model, calib, evald = mlp
    return api.convert_model(model, out, data_path=calib, config=CONFIG, search=options, eval_data=evald, log=log)


def test_min_agreement_falls_back_the_one_sensitive_node(mlp, tmp_path):
    lines: list[str] = []
    options = SearchOptions(Budget(min_agreement=0.97, margin=0.0), latency_runs=1)
    result = _search(mlp, tmp_path / "q.onnx", options, log=lines.append)
    search = result.search
    assert search is not None
    assert "output y: classifier (scores over 10 classes)" in lines  # the detected kind is said
    first = search.trials[0]
    assert not first.meets_budget and first.kinds[0].agreement is not None and first.kinds[0].agreement < 0.9
    assert search.chosen.meets_budget and search.chosen.candidate.float_nodes == ("mm2",)
    (kind,) = search.chosen.kinds
    assert kind.kind == OutputKind.CLASSIFIER and kind.agreement is not None and kind.agreement >= 0.97
    assert search.recipe("0" * 64, CONFIG, 99.99).search["budget"]["min_agreement"] == 0.97


def test_the_margin_asks_one_standard_error_more(mlp, tmp_path):
    """mm2 alone in float agrees with FP32 on at least 0.97 of the 128 scored samples but less than
    0.97 + sqrt(0.97 * 0.03 / 128) = 0.985: it meets the bound as given (margin 0), not by one standard
    error (the default), and then the search goes on to an answer that does."""
    lines: list[str] = []
    at_edge = _search(mlp, tmp_path / "a.onnx", SearchOptions(Budget(min_agreement=0.97, margin=0.0), latency_runs=1))
    safe = _search(mlp, tmp_path / "b.onnx", SearchOptions(Budget(min_agreement=0.97), latency_runs=1), lines.append)
    assert at_edge.search is not None and safe.search is not None
    need = required_share(0.97, 128, 1.0)
    assert need == pytest.approx(0.97 + math.sqrt(0.97 * 0.03 / 128))
    edge = at_edge.search.chosen
    assert edge.candidate.float_nodes == ("mm2",)
    assert edge.kinds[0].agreement is not None and 0.97 <= edge.kinds[0].agreement < need
    chosen = safe.search.chosen
    assert chosen.meets_budget and chosen.kinds[0].agreement is not None and chosen.kinds[0].agreement >= need
    assert chosen.candidate.float_nodes != ("mm2",)
    # every trial that met the budget cleared the margin; the edge candidate's trial did not meet it
    assert all(t.kinds[0].agreement >= need for t in safe.search.trials if t.meets_budget)
    assert f"agreement >= 0.97 needs {need:.3f}" in " ".join(lines)
    assert safe.search.budget.describe() == "agreement >= 0.97 (by 1 standard error)"
    assert safe.search.recipe("0" * 64, CONFIG, 99.99).search["budget"]["margin_standard_errors"] == 1.0


def test_the_margin_of_a_mean_is_its_samples_spread():
    """IoU 0.92 over 16 masks whose IoUs spread by 0.1: one standard error is 0.025, so 0.9 is not met by
    it (0.92 - 0.025 < 0.9), though it is as given; a share's error is taken at its bound, so a share
    where every sample agreed still has one (0.95 on 64 samples needs 0.977)."""
    iou = KindMetrics("map", OutputKind.MAP, "", 16, 12.0, iou=0.92, scored=16, spread=0.1)
    assert standard_error(iou, 0.9) == pytest.approx(0.025)
    assert not meets(Score(None, None, 12.0, (iou,)), Budget(min_iou=0.9))
    assert meets(Score(None, None, 12.0, (iou,)), Budget(min_iou=0.9, margin=0.0))
    assert kind_margin((iou,), Budget(min_iou=0.9)) == pytest.approx(0.92 - 0.9 - 0.025)
    every = KindMetrics("ctc", OutputKind.CTC, "", 64, 30.0, agreement=1.0, scored=64)
    assert standard_error(every, 0.95) == pytest.approx(math.sqrt(0.95 * 0.05 / 64))
    assert meets(Score(None, None, 30.0, (every,)), Budget(min_agreement=0.95))
    almost = KindMetrics("ctc", OutputKind.CTC, "", 64, 30.0, agreement=62 / 64, scored=64)
    assert required_share(0.95, 64, 1.0) == pytest.approx(0.977, abs=5e-4)
    assert not meets(Score(None, None, 30.0, (almost,)), Budget(min_agreement=0.95))
    assert meets(Score(None, None, 30.0, (almost,)), Budget(min_agreement=0.95, margin=0.0))
    # too few samples for the margin: it asks every sample to agree, never more (12 that all agree meet 0.98)
    few = KindMetrics("y", OutputKind.CLASSIFIER, "", 12, 30.0, agreement=1.0, scored=12)
    assert required_share(0.98, 12, 1.0) == 1.0
    assert meets(Score(None, None, 30.0, (few,)), Budget(min_agreement=0.98))
    one_off = KindMetrics("y", OutputKind.CLASSIFIER, "", 12, 30.0, agreement=11 / 12, scored=12)
    assert not meets(Score(None, None, 30.0, (one_off,)), Budget(min_agreement=0.9))
    wide = KindMetrics("map", OutputKind.MAP, "", 4, 12.0, iou=1.0, scored=4, spread=0.5)
    assert meets(Score(None, None, 12.0, (wide,)), Budget(min_iou=0.9))  # 1.0 is the most an IoU can read


def test_the_sqnr_error_is_the_spread_of_its_ratio_over_the_samples():
    """The delta-method error of 10 log10(sum s / sum n) agrees with a bootstrap over the samples (real
    energies: the digits CNN's logits against its int8 model, 200 samples), and is 0 without spread."""
    rng = np.random.default_rng(0)
    x = np.load(CALIBRATION_DATA / "digits_cnn_calib.npz")["input"]
    ref = run(load_model(SAMPLE_MODELS / "digits_cnn.onnx"), {"input": x})[0].astype(np.float64)
    noisy = ref + rng.normal(scale=0.3, size=ref.shape) * np.abs(ref).mean(axis=1, keepdims=True) ** 2
    signal, noise = np.sum(ref**2, axis=1), np.sum((ref - noisy) ** 2, axis=1)
    boot = [
        10 * math.log10(signal[i].sum() / noise[i].sum())
        for i in (rng.integers(0, len(x), len(x)) for _ in range(2000))
    ]
    assert _sqnr_error(list(signal), list(noise)) == pytest.approx(float(np.std(boot)), rel=0.15)
    assert _sqnr_error([1.0] * 8, [0.01] * 8) == pytest.approx(0.0, abs=1e-9)
    assert _sqnr_error([1.0], [0.5]) == 0.0  # one sample: no spread to take


def _time_major(time_major: bool, gain: np.ndarray | None) -> object:
    """y = x (* gain) of x [N, 12, 8], as [12, N, 8] when ``time_major`` (a recognizer's CTC layout)."""
    nodes = [
        helper.make_node("Mul", ["x", "g"], ["m"]) if gain is not None else helper.make_node("Identity", ["x"], ["m"])
    ]
    nodes.append(
        helper.make_node("Transpose", ["m"], ["y"], perm=[1, 0, 2])
        if time_major
        else helper.make_node("Identity", ["m"], ["y"])
    )
    shape = [12, "N", 8] if time_major else ["N", 12, 8]
    return models.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [] if gain is None else [models._init("g", gain)],
    )


def test_the_sqnr_error_of_a_time_major_output_is_over_its_samples():
    """The same outputs as [N, T, C] and as [T, N, C]: the error is over the 48 samples either way, not over
    the 12 time steps."""
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(48, 12, 8)) * rng.uniform(0.2, 3.0, size=(48, 1, 1))).astype(np.float32)
    gain = (1 + 0.05 * rng.normal(size=(12, 8))).astype(np.float32)
    errors = []
    for time_major in (False, True):
        reference = _time_major(time_major, None)
        data = Dataset.from_arrays(model_input_specs(reference), {"x": x})
        score = Evaluator(reference, data, batch_size=16).score(make_session(_time_major(time_major, gain)))
        errors.append(score.sqnr_error_db)
    assert errors[0] > 0 and errors[1] == pytest.approx(errors[0], rel=1e-9)
    # taken over the 12 time steps (axis 0 of [T, N, C], as before), it is another figure
    noise = (x * (gain - 1)).astype(np.float64)
    steps = _sqnr_error(list(np.sum(x.astype(np.float64) ** 2, axis=(0, 2))), list(np.sum(noise**2, axis=(0, 2))))
    assert steps != pytest.approx(errors[0], rel=0.5)


def test_min_sqnr_holds_by_its_standard_error():
    """30.5 dB with a 1 dB error misses 30 by one standard error but meets it as given; the key ranks by the
    same floor, so ranking and meeting agree."""
    score = Score(None, None, 30.5, sqnr_error_db=1.0)
    assert not meets(score, Budget(min_sqnr_db=30.0)) and meets(score, Budget(min_sqnr_db=30.0, margin=0.0))
    assert meets(Score(None, None, 31.5, sqnr_error_db=1.0), Budget(min_sqnr_db=30.0))
    assert meets(Score(None, None, math.inf, sqnr_error_db=0.0), Budget(min_sqnr_db=30.0))
    assert key(score, Budget(min_sqnr_db=30.0))[0] == pytest.approx(29.5)
    assert Budget(min_sqnr_db=30.0).describe() == "SQNR >= 30 dB (by 1 standard error)"
    assert Budget(max_accuracy_drop=1.0).describe() == "accuracy drop <= 1 points (by 1 standard error)"


def test_the_accuracy_drop_holds_by_its_standard_error():
    """A drop of 0.5 points with a 1-point error misses a 1-point budget by one standard error, meets it as
    given; the key ranks by the same ceiling."""
    score = Score(95.0, 0.5, 30.0, accuracy_error=1.0)
    assert not meets(score, Budget(max_accuracy_drop=1.0)) and meets(score, Budget(max_accuracy_drop=1.0, margin=0.0))
    assert meets(Score(95.0, 0.5, 30.0, accuracy_error=0.4), Budget(max_accuracy_drop=1.0))
    assert key(score, Budget(max_accuracy_drop=1.0))[0] == pytest.approx(-1.5)
    assert score.drop_ceiling(Budget(max_accuracy_drop=1.0, margin=2.0)) == pytest.approx(2.5)


def _gain_model(gain: np.ndarray | None) -> object:
    """y = x (* gain), x [N, 8]: a classifier's scores, moved by ``gain``."""
    mul = helper.make_node("Mul", ["x", "g"], ["y"])
    node = mul if gain is not None else helper.make_node("Identity", ["x"], ["y"])
    return models.make_model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [] if gain is None else [models._init("g", gain)],
    )


def _agreement(outputs: dict[str, np.ndarray], labels: np.ndarray | None, reference: dict[str, np.ndarray]) -> float:
    return float(np.mean(outputs["y"].argmax(-1) == reference["y"].argmax(-1)))


def test_a_custom_metrics_error_is_its_spread_over_runs_of_samples():
    """A metric that is not a mean over samples (a detector's F1) has no per-sample spread: its error is that
    of its values on 10 runs of consecutive samples (batch means), the runs cut across the search's batches
    of 16. FP32 against itself reads 0."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(48, 8)).astype(np.float32)
    gain = (1 + 0.3 * rng.normal(size=(8,))).astype(np.float32)
    reference = _gain_model(None)
    data = Dataset.from_arrays(model_input_specs(reference), {"x": x})
    ev = Evaluator(reference, data, batch_size=16, metric=MetricSpec("agreement.py:agreement", function=_agreement))
    assert ev.score(make_session(reference)).accuracy_error == 0.0
    score = ev.score(make_session(_gain_model(gain)))
    agree = x.argmax(-1) == (x * gain).argmax(-1)
    assert 0 < agree.mean() < 1 and score.accuracy_drop == pytest.approx(100 * (1 - agree.mean()))
    runs = [agree[part].mean() for part in np.array_split(np.arange(48), 10)]
    assert score.accuracy_error == pytest.approx(100 * np.std(runs, ddof=1) / math.sqrt(10))


def test_the_top1_drops_error_is_its_paired_changes():
    """With labels, the error of the top-1 drop is that of the per-sample changes (FP32 right minus
    quantized right); without, that of the share of samples whose top-1 moved."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    gain = (1 + 0.3 * rng.normal(size=(8,))).astype(np.float32)
    labels = np.where(rng.random(64) < 0.8, x.argmax(-1), rng.integers(0, 8, 64))
    reference = _gain_model(None)
    for given in (labels, None):
        data = Dataset.from_arrays(model_input_specs(reference), {"x": x}, labels=given)
        score = Evaluator(reference, data, batch_size=16).score(make_session(_gain_model(gain)))
        moved = (x * gain).argmax(-1)
        if given is None:
            changes = (moved != x.argmax(-1)).astype(float)
        else:
            changes = (x.argmax(-1) == labels).astype(float) - (moved == labels).astype(float)
        assert changes.std() > 0 and score.accuracy_drop == pytest.approx(100 * changes.mean())
        assert score.accuracy_error == pytest.approx(100 * np.std(changes, ddof=1) / 8.0)


def test_the_sqnr_margin_asks_more_of_the_search(mlp, tmp_path):
    """sensitive_mlp: mm2 alone in float meets 25 dB as given; by one standard error of the 128 scored
    samples the search asks more, and every trial it lets meet clears the floor."""
    given = _search(mlp, tmp_path / "a.onnx", SearchOptions(Budget(min_sqnr_db=25.0, margin=0.0), latency_runs=1))
    safe = _search(mlp, tmp_path / "b.onnx", SearchOptions(Budget(min_sqnr_db=25.0), latency_runs=1))
    assert given.search is not None and safe.search is not None
    assert given.search.chosen.candidate.float_nodes == ("mm2",)
    edge = given.search.chosen
    assert edge.sqnr_error_db > 0 and edge.sqnr_db - edge.sqnr_error_db < 25.0  # as given only
    assert safe.search.chosen.candidate != edge.candidate
    assert all(t.sqnr_db - t.sqnr_error_db >= 25.0 for t in safe.search.trials if t.meets_budget)


def test_the_search_says_what_each_bound_needs():
    assert _need("min-agreement", 0.95, 64, 1.0) == "agreement >= 0.95 needs 0.977"
    assert (
        _need("min-agreement", 0.98, 12, 1.0)
        == "agreement >= 0.98 needs all 12 to agree (too few to show it by the margin)"
    )
    assert "standard error of its samples" in _need("min-iou", 0.9, 16, 1.0)


def test_search_margin_flag_reaches_the_budget():
    flags = SearchFlags(min_agreement=0.95, margin=0.0)
    options = flags.options()
    assert options is not None and options.budget.margin == 0.0
    default = SearchFlags(min_agreement=0.95).options()
    assert default is not None and default.budget.margin == DEFAULT_MARGIN == 1.0


def test_an_unreachable_agreement_is_not_met(mlp, tmp_path):
    with pytest.raises(BudgetNotMetError, match="agreement >= 1"):
        _search(mlp, tmp_path / "q.onnx", SearchOptions(Budget(min_agreement=1.0), max_fallback=0, probe=1))
    assert not (tmp_path / "q.onnx").exists()


def test_no_fallback_means_no_float_node_in_any_trial(mlp, tmp_path):
    """``max_fallback`` 0: mm2 in float would meet 25 dB, but no stage (not even a probe, which the cheapest
    met trial could be) floats a node: the search exits 1."""
    with pytest.raises(BudgetNotMetError, match="SQNR >= 25 dB"):
        _search(mlp, tmp_path / "q.onnx", SearchOptions(Budget(min_sqnr_db=25.0, margin=0.0), max_fallback=0))
    assert not (tmp_path / "q.onnx").exists()
    allowed = _search(mlp, tmp_path / "f.onnx", SearchOptions(Budget(min_sqnr_db=25.0, margin=0.0), max_fallback=1))
    assert allowed.search is not None and allowed.search.chosen.candidate.float_nodes == ("mm2",)


def test_every_output_must_hold(tmp_path):
    """Two outputs: the class scores (agreement) and the hidden layer (an embedding by override)."""
    m = models.sensitive_mlp()
    m.graph.output.append(helper.make_tensor_value_info("r2", TensorProto.FLOAT, ["N", 32]))
    model = tmp_path / "two.onnx"
    model.write_bytes(m.SerializeToString())
    rng = np.random.default_rng(5)
    calib, evald = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, x=np.abs(rng.normal(size=(128, 32))).astype(np.float32))
    np.savez(evald, x=np.abs(rng.normal(size=(128, 32))).astype(np.float32))
    options = SearchOptions(
        Budget(min_agreement=0.9, min_cosine=0.999), output_kinds={"r2": OutputKind.EMBEDDING}, latency_runs=1
    )
    result = _search((model, calib, evald), tmp_path / "q.onnx", options)
    search = result.search
    assert search is not None and search.chosen.meets_budget
    kinds = {k.name: k for k in search.chosen.kinds}
    assert kinds["y"].kind == OutputKind.CLASSIFIER and kinds["r2"].kind == OutputKind.EMBEDDING
    assert kinds["y"].agreement is not None and kinds["y"].agreement >= 0.9
    assert kinds["r2"].cosine is not None and kinds["r2"].cosine >= 0.999
    # a trial where one output held and the other did not was not accepted
    for t in search.trials:
        by_name = {k.name: k for k in t.kinds}
        both = (by_name["y"].agreement or 0) >= 0.9 and (by_name["r2"].cosine or 0) >= 0.999
        assert t.meets_budget == both


def test_a_bound_without_an_output_of_its_kind_is_refused(mlp, tmp_path):
    with pytest.raises(QuantCliError, match="min_iou needs a map output; detected y: classifier"):
        _search(mlp, tmp_path / "q.onnx", SearchOptions(Budget(min_iou=0.9)))
    model, calib, evald = mlp
    base = ["convert", str(model), "-o", str(tmp_path / "c.onnx"), "--data", str(calib), "--eval-data", str(evald)]
    res = CliRunner().invoke(app, [*base, "--min-cosine", "0.99"])
    assert res.exit_code == 3 and "--min-cosine needs an embedding output" in res.output
    # named as an embedding, the same output takes the cosine budget
    res = CliRunner().invoke(app, [*base, "--min-cosine", "0.99", "--output-kind", "y=embedding"])
    assert res.exit_code == 0, res.output
    assert "output y: embedding (given)" in res.output and (tmp_path / "c.onnx").exists()


def test_min_agreement_on_the_bundled_digits_cnn(tmp_path):
    """Real model, held-out data: the written model agrees with FP32 on at least 99% of the samples."""
    out = tmp_path / "cnn.onnx"
    res = CliRunner().invoke(
        app, ["convert", str(SAMPLE_MODELS / "digits_cnn.onnx"), "-o", str(out),
              "--data", str(CALIBRATION_DATA / "digits_cnn_calib.npz"),
              "--eval-data", str(CALIBRATION_DATA / "digits_cnn_eval.npz"), "--min-agreement", "0.99"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "output" in res.output and ": classifier (" in res.output
    assert out.exists()


def test_an_answer_with_no_integer_macs_is_not_a_quantized_model(mlp, tmp_path):
    """SQNR >= 200 dB holds only with all three MatMuls in float: not written, the closest quantized
    candidate is named; with --force it is written."""
    out = tmp_path / "q.onnx"
    with pytest.raises(BudgetNotMetError, match="runs none of its 3 Conv/MatMul/Gemm in integer kernels") as info:
        _search(mlp, out, SearchOptions(Budget(min_sqnr_db=200.0), latency_runs=1))
    assert not out.exists()
    text = str(info.value)
    closest = text.split("Closest quantized candidate: ")[1]
    assert "misses budget" in closest and "float nodes: mm1, mm2, mm3" not in closest
    model, calib, evald = mlp
    base = ["convert", str(model), "-o", str(out), "--data", str(calib), "--eval-data", str(evald), "--min-sqnr", "200"]
    res = CliRunner().invoke(app, base)
    assert res.exit_code == 1 and "not a quantized model" in res.output and "--force" in res.output
    assert not out.exists()
    res = CliRunner().invoke(app, [*base, "--force"])
    assert res.exit_code == 0, res.output
    assert out.exists() and "written anyway" in res.output


def _trial(step: int, float_nodes: tuple[str, ...], *, meets: bool = True, sqnr: float = 30.0) -> Trial:
    cand = Candidate(CalibrationMethod.MINMAX, float_nodes=float_nodes)
    return Trial(step, "fallback", "", cand, None, None, sqnr, 1.0, meets)


def test_the_cheaper_model_wins_at_equal_fidelity():
    """8 float element-wise nodes cost no float MACs; 3 float compute nodes cost all of theirs."""
    macs: dict[str, int | None] = {"conv": 1000, "mm1": 500, "mm2": 300}
    compute = _trial(2, ("conv", "mm1", "mm2"), sqnr=40.0)  # better fidelity, same budget met
    elementwise = _trial(5, tuple(f"add{i}" for i in range(8)))
    missed = _trial(1, (), meets=False)  # nothing in float, but misses the budget
    assert model_cost(compute.candidate, macs) == FLOAT_MAC_COST * 1800
    assert model_cost(elementwise.candidate, macs) == INTEGER_MAC_COST * 1800
    assert cheapest([missed, compute, elementwise], macs) is elementwise
    # one float MatMul of 300 MACs is cheaper than two of 500 + 300, and than the conv alone
    one = _trial(3, ("mm2",))
    assert cheapest([compute, _trial(4, ("conv",)), one], macs) is one
    assert cheapest([missed], macs) is None
    # equal cost and float nodes: the better fidelity, as the method stage chose
    a, b = _trial(6, (), sqnr=30.0), _trial(7, (), sqnr=35.0)
    assert cheapest([a, b], macs) is b
