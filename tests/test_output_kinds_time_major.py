"""Time-major ``[T, N, C]`` outputs (CRNN-style CTC heads such as ddddocr's) are sequences, read per sample;
probability maps rounded just past 1 stay maps."""

from __future__ import annotations

import numpy as np

from quantcli.compare.output_kinds import OutputKind, OutputKindObserver, detect_kind, is_time_major

RNG = np.random.default_rng(3)


def test_time_major_logits_are_a_sequence_judged_per_sample():
    # 4 samples, 32 positions, 50 classes of logits (not distributions), laid out [T, N, C]
    logits = (RNG.normal(size=(32, 4, 50)) * 5).astype(np.float32)
    flipped = logits.copy()
    flipped[10, 2] = -flipped[10, 2]  # sample 2's argmax changes at position 10
    observer = OutputKindObserver()
    observer(["387"], [logits], [flipped], 4)
    (m,) = observer.results()
    assert m.kind == OutputKind.SEQUENCE, m.reason
    assert "time-major" in m.reason
    assert m.num_samples == 4 and m.agreement == 0.75


def test_batch_one_time_major_output_is_detected():
    logits = (RNG.normal(size=(32, 1, 8210)) * 5).astype(np.float32)
    observer = OutputKindObserver()
    observer(["387"], [logits], [logits], 1)
    (m,) = observer.results()
    assert (m.kind, m.num_samples, m.agreement) == (OutputKind.SEQUENCE, 1, 1.0)


def test_other_layouts_are_not_time_major():
    assert is_time_major(np.zeros((32, 1, 10)), 1)
    assert not is_time_major(np.zeros((2, 4, 128)), 4)  # a recurrent state [layers, N, H]
    assert not is_time_major(np.zeros((8, 8, 10)), 8)  # batch first when T equals N
    assert not is_time_major(np.zeros((1, 32, 10)), 1)  # batch-first [N, T, C]
    assert not is_time_major(np.zeros((32, 1, 64, 64)), 1)  # 4-D
    # batch-first logits keep their detection: raw without the layout to say "per position"
    assert detect_kind("yolo", RNG.normal(size=(8, 84, 100)).astype(np.float32))[0] == OutputKind.RAW


def test_a_sigmoid_map_rounded_past_one_is_still_a_map():
    # onnxruntime's Sigmoid gives 1.0000001 for large logits (PP-OCRv4 det on its held-out crops)
    probs = (1 / (1 + np.exp(-RNG.normal(size=(4, 1, 16, 16)) * 4))).astype(np.float32)
    probs[0, 0, 0, 0] = np.float32(1.0000001)
    assert detect_kind("sigmoid_0.tmp_0", probs)[0] == OutputKind.MAP
    probs[0, 0, 0, 0] = 1.5  # past the rounding slack: not a probability
    assert detect_kind("sigmoid_0.tmp_0", probs)[0] == OutputKind.RAW
