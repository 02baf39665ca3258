"""Detection F1 against FP32, as quantcli Python metrics: the search's budget for detector heads.

A detector's outputs are raw tensors (boxes, objectness, class scores) that no built-in output kind reads,
and their pooled SQNR is a poor proxy: ddddocr det's search met SQNR 20 dB (22.4 dB held out) while its
objectness field read 7.8 dB and its detections' F1 against FP32 fell to 0.903. These functions decode
both models' outputs as each package does (``bench_models``) and score the candidate's boxes against
FP32's (same class, IoU >= 0.5), so a budget can be stated in detections::

    quantcli convert benchmarks/models/ddddocr_det.onnx -o det.int8.onnx \\
        --data benchmarks/models/ddddocr_det_calib.npz --eval-data benchmarks/models/ddddocr_det_calib.npz \\
        --search-metric benchmarks/detection_f1.py:ddddocr_det --max-accuracy-drop 5

A function with a ``reference`` parameter receives FP32's outputs (``quantcli.compare.metrics``); FP32
against itself reads 1.0, so ``--max-accuracy-drop 5`` asks F1 >= 0.95.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import Detections, Outputs, detection_f1, yolov8_dets, yolox_dets


def _f1(
    decode: Callable[[Outputs], Detections], outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]
) -> float:
    """F1 of ``outputs``' decoded detections against ``reference``'s (both stacked over samples, in the
    model's output order: one batch of all samples for the decoders)."""
    return detection_f1(decode([list(reference.values())]), decode([list(outputs.values())]))[0]


def ddddocr_det(outputs: dict[str, np.ndarray], labels: np.ndarray | None, reference: dict[str, np.ndarray]) -> float:
    """ddddocr's YOLOX text detector (grid offsets, strides 8/16/32; score = objectness x class)."""
    return _f1(yolox_dets, outputs, reference)


def nudenet(outputs: dict[str, np.ndarray], labels: np.ndarray | None, reference: dict[str, np.ndarray]) -> float:
    """NudeNet's YOLOv8 head (centre boxes, 18 class scores, threshold 0.25)."""
    return _f1(yolov8_dets, outputs, reference)
