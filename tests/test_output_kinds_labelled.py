"""Sequence outputs with labels per position (masked language models, token classifiers): agreement
counts only the positions whose label is >= 0, as accuracy does — in ``kind_metrics``, in compare's
gates, in the accuracy search's evaluator and in convert's verdict."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper
from typer.testing import CliRunner

from quantcli.cli.app import EXIT_GATE_FAILED, app
from quantcli.compare.output_kinds import OutputKind, OutputKindObserver, kind_metrics
from quantcli.data.datasets import model_input_specs, open_dataset
from quantcli.graph.session import make_session
from quantcli.pipeline.verdict import _fidelity
from quantcli.search.evaluator import Evaluator
from tests import models

runner = CliRunner()
RNG = np.random.default_rng(3)
T, D, C = 6, 4, 5


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def test_only_labelled_positions_decide_a_sequence_sample():
    ref = _softmax(RNG.normal(size=(4, T, C)) * 3)
    cand = ref.copy()
    cand[0, 5] = np.roll(cand[0, 5], 1)  # sample 0: an unlabelled position flips
    cand[1, 0] = np.roll(cand[1, 0], 1)  # sample 1: a labelled position flips
    cand[3, 2] = np.roll(cand[3, 2], 1)  # sample 3 has no label at all: left out
    labels = np.full((4, T), -1, np.int64)
    labels[0, :3] = labels[1, :3] = labels[2, :3] = 1
    (whole,) = kind_metrics(["mlm"], [ref], [cand])
    assert whole.agreement == 1 / 4  # every position counts without labels
    (m,) = kind_metrics(["mlm"], [ref], [cand], labels=labels)
    assert m.kind == OutputKind.SEQUENCE and m.num_samples == 4
    assert m.agreement == 2 / 3  # samples 0 and 2 agree; sample 1 does not; sample 3 is not judged
    assert "labelled positions" in m.reason
    # labels that are not one per position (a CTC transcript, a class per sample) change nothing
    (other,) = kind_metrics(["mlm"], [ref], [cand], labels=np.ones(4, np.int64))
    assert other.agreement == 1 / 4 and "labelled" not in other.reason


def test_batches_take_their_own_labels_and_shards_merge_to_one_run():
    ref = _softmax(RNG.normal(size=(8, T, C)) * 3)
    cand = ref.copy()
    labels = RNG.integers(-1, C, size=(8, T))
    for i in range(8):  # flip one unlabelled position in every sample, and a labelled one in samples 5 and 6
        j = int(np.flatnonzero(labels[i] < 0)[0]) if (labels[i] < 0).any() else None
        if j is not None:
            cand[i, j] = np.roll(cand[i, j], 1)
    labels[5, 1] = labels[6, 4] = 2
    cand[5, 1] = np.roll(cand[5, 1], 1)
    cand[6, 4] = np.roll(cand[6, 4], 1)
    (one,) = kind_metrics(["mlm"], [ref], [cand], labels=labels)
    batched = OutputKindObserver(labels=labels)
    for lo in range(0, 8, 3):
        batched(["mlm"], [ref[lo : lo + 3]], [cand[lo : lo + 3]], len(ref[lo : lo + 3]))
    first, second = OutputKindObserver(labels=labels[:4]), OutputKindObserver(labels=labels[4:])
    first(["mlm"], [ref[:4]], [cand[:4]], 4)
    second(["mlm"], [ref[4:]], [cand[4:]], 4)
    first.merge(second)
    assert one.agreement == 6 / 8
    assert batched.results()[0].agreement == one.agreement == first.results()[0].agreement


def _token_model(bias: np.ndarray) -> onnx.ModelProto:
    """x [N, T, D] -> softmax(x W + bias) [N, T, C]. Padding rows (x = 0) take the bias's argmax; real
    rows have logit margins far above the bias, so two biases differ at padding positions only."""
    w = np.zeros((D, C), np.float32)
    w[np.arange(D), np.arange(D)] = 20.0
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, D])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", T, C])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["z"]),
        helper.make_node("Add", ["z", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    return models.make_model(nodes, [x], [y], [models._init("W", w), models._init("b", bias)])


def _token_data(n: int) -> tuple[np.ndarray, np.ndarray]:
    """One-hot tokens, the last positions of each sample padding (zeros, label -1)."""
    x = np.zeros((n, T, D), np.float32)
    labels = np.full((n, T), -1, np.int64)
    for i in range(n):
        length = 2 + i % 3
        tokens = RNG.integers(0, D, size=length)
        x[i, np.arange(length), tokens] = 1.0
        labels[i, :length] = tokens
    return x, labels


def _pair(tmp_path):
    ref = _token_model(np.array([0.1, 0, 0, 0, 0], np.float32))
    cand = _token_model(np.array([0, 0.1, 0, 0, 0], np.float32))  # padding argmax 0 -> 1
    paths = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    for p, m in zip(paths, (ref, cand), strict=True):
        p.write_bytes(m.SerializeToString())
    return ref, cand, paths


def test_compare_gate_judges_labelled_positions(tmp_path):
    _, _, (ref_path, cand_path) = _pair(tmp_path)
    x, labels = _token_data(12)
    with_labels, without = tmp_path / "l.npz", tmp_path / "u.npz"
    np.savez(with_labels, x=x, labels=labels)
    np.savez(without, x=x)
    report = tmp_path / "r.json"
    args = ["compare", str(ref_path), str(cand_path), "--runs", "2", "--no-memory", "--min-agreement", "0.99"]
    ok = runner.invoke(app, [*args, "--data", str(with_labels), "--batch-size", "5", "--json", str(report)])
    assert ok.exit_code == 0, ok.output
    (kind,) = json.loads(report.read_text())["output_kinds"]
    assert kind["kind"] == "sequence" and kind["agreement"] == 1.0
    assert "labelled positions" in kind["reason"]
    # the same models without labels: every sample has a padding position that moved
    failed = runner.invoke(app, [*args, "--data", str(without)])
    assert failed.exit_code == EXIT_GATE_FAILED, failed.output


def test_search_evaluator_and_verdict_use_the_labels(tmp_path):
    ref, cand, _ = _pair(tmp_path)
    x, labels = _token_data(10)
    data = tmp_path / "d.npz"
    np.savez(data, x=x, labels=labels)
    specs = model_input_specs(ref)
    ev = Evaluator(ref, open_dataset(data, specs), batch_size=4, kinds=({}, 0.5))
    (kind,) = ev.score(make_session(cand)).kinds
    assert kind.agreement == 1.0
    np.savez(tmp_path / "u.npz", x=x)
    ev_whole = Evaluator(ref, open_dataset(tmp_path / "u.npz", specs), batch_size=4, kinds=({}, 0.5))
    assert ev_whole.score(make_session(cand)).kinds[0].agreement == 0.0
    # the verdict's held-back samples bring the labels from where they start
    dataset = open_dataset(data, specs)
    start = 6
    feeds = ((f, dataset.batch_length(f)) for i, f in enumerate(dataset.batches(1)) if i >= start)
    held = dataset.yielded_labels()
    assert held is not None
    kinds, count, _ = _fidelity(ref, cand, feeds, (None, 0.5), held[start:])
    assert count == 4 and kinds[0].agreement == 1.0
    feeds = ((f, dataset.batch_length(f)) for i, f in enumerate(dataset.batches(1)) if i >= start)
    shifted = np.roll(held, 1, axis=0)[start:]  # labels of other samples: padding positions labelled
    assert _fidelity(ref, cand, feeds, (None, 0.5), shifted)[0][0].agreement < 1.0
