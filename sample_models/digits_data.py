"""The digits data used by the sample models: scikit-learn's bundled 8x8 digits, prepared with numpy only.

Preprocessing: pixel / 16 as float32, nearest-neighbour upsampling to 16x16 (each pixel becomes a
2x2 block). Split: ``np.random.default_rng(0).permutation(1797)``; the first 1097 samples train, the
next 200 calibrate, the last 500 evaluate. The three splits are disjoint.
"""

from __future__ import annotations

import numpy as np

TRAIN, CALIB, EVAL = 1097, 200, 500


def load_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 images as float32 [N,1,16,16] in [0,1], and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    images = np.stack([np.kron(img, np.ones((2, 2), dtype=np.float32)) for img in images])
    return images[:, None, :, :], digits.target.astype(np.int64)


def splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``train``, ``calib`` and ``eval`` splits of (images, labels)."""
    images, labels = load_images()
    order = np.random.default_rng(0).permutation(len(images))
    bounds = {"train": (0, TRAIN), "calib": (TRAIN, TRAIN + CALIB), "eval": (TRAIN + CALIB, TRAIN + CALIB + EVAL)}
    return {k: (images[order[a:b]], labels[order[a:b]]) for k, (a, b) in bounds.items()}


def to_patches(images: np.ndarray, patch: int = 4) -> np.ndarray:
    """[N,1,16,16] images to [N,16,16] tokens: 4x4 patches in row-major order, each flattened."""
    n, _, h, w = images.shape
    x = images.reshape(n, h // patch, patch, w // patch, patch)
    return np.ascontiguousarray(x.transpose(0, 1, 3, 2, 4).reshape(n, (h // patch) * (w // patch), patch * patch))
