"""A folder of images as calibration data: decoded with Pillow (optional extra ``quantcli[images]``)
and preprocessed the way most vision models expect, one batch at a time.

Steps, in order: convert to RGB (or BGR with ``channel_order="bgr"``; to grey for a model input with
one channel, using the first value of ``mean`` and ``std``), resize so the shorter side is
``resize`` (bilinear; skipped when None), centre-crop to the model's H×W (or resize straight to it when
``resize`` is None), divide by ``scale``, subtract ``mean`` and divide by ``std`` per channel, lay out as
NCHW or NHWC (``auto`` follows the model's input shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantcli.core.errors import CalibrationDataError

__all__ = ["IMAGE_SUFFIXES", "ImageFolder", "ImagePreprocess", "image_files"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True, slots=True)
class ImagePreprocess:
    """How images become model input."""

    resize: int | None = None
    size: tuple[int, int] | None = None  # H, W; default: the model input's fixed H, W
    scale: float = 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channel_order: str = "rgb"
    layout: str = "auto"


def image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@dataclass(frozen=True, slots=True)
class ImageFolder:
    """An ``ArraySource`` over image files: rows are decoded and preprocessed when read."""

    path: Path
    files: tuple[Path, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    prep: ImagePreprocess
    nchw: bool

    @classmethod
    def open(cls, folder: Path, model_shape: tuple[int | str | None, ...], prep: ImagePreprocess) -> ImageFolder:
        """Check Pillow, the files and the model input (4-D, 1 or 3 channels) before anything is decoded."""
        try:
            import PIL.Image  # noqa: F401
        except ImportError:
            raise CalibrationDataError(
                f"{folder}: reading images needs Pillow; install it with: pip install 'quantcli[images]'"
            ) from None
        files = tuple(image_files(folder))
        if not files:
            raise CalibrationDataError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        if len(model_shape) != 4:
            raise CalibrationDataError(f"{folder}: images need a 4-D model input, this one is {list(model_shape)}")
        layout = prep.layout
        if layout == "auto":
            layout = "nhwc" if model_shape[3] in (1, 3) and model_shape[1] not in (1, 3) else "nchw"
        nchw = layout == "nchw"
        channels = model_shape[1] if nchw else model_shape[3]
        if channels not in (1, 3):
            raise CalibrationDataError(
                f"{folder}: images feed a model input with 1 or 3 channels; this one is {list(model_shape)} "
                f"({layout.upper()}); give --layout if that is wrong"
            )
        dims = model_shape[2:4] if nchw else model_shape[1:3]
        size = prep.size or (
            (dims[0], dims[1])
            if isinstance(dims[0], int) and isinstance(dims[1], int) and dims[0] > 0 and dims[1] > 0
            else None
        )
        if size is None:
            raise CalibrationDataError(f"{folder}: the model's height/width are dynamic; give --image-size HxW")
        shape = (len(files), channels, *size) if nchw else (len(files), *size, channels)
        return cls(folder, files, shape, np.dtype(np.float32), prep, nchw)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Decode and preprocess images ``start`` to ``stop``."""
        return (
            np.stack([self._load(f) for f in self.files[start:stop]])
            if stop > start
            else np.zeros((0, *self.shape[1:]), np.float32)
        )

    def _load(self, file: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        h, w = (self.shape[2], self.shape[3]) if self.nchw else (self.shape[1], self.shape[2])
        grey = (self.shape[1] if self.nchw else self.shape[3]) == 1
        try:
            with Image.open(file) as opened:
                img = opened.convert("L" if grey else "RGB")
                if self.prep.resize:
                    short = min(img.size)
                    factor = self.prep.resize / short
                    img = img.resize(
                        (max(w, round(img.size[0] * factor)), max(h, round(img.size[1] * factor))),
                        Image.Resampling.BILINEAR,
                    )
                    left, top = (img.size[0] - w) // 2, (img.size[1] - h) // 2
                    img = img.crop((left, top, left + w, top + h))
                else:
                    img = img.resize((w, h), Image.Resampling.BILINEAR)
                arr = np.asarray(img, dtype=np.float32)
        except (UnidentifiedImageError, OSError) as exc:
            raise CalibrationDataError(f"{file}: not a readable image ({exc})") from exc
        if grey:
            arr = arr[..., None]
        elif self.prep.channel_order == "bgr":
            arr = arr[..., ::-1]
        channels = arr.shape[-1]
        mean = np.asarray(self.prep.mean[:channels], np.float32)
        std = np.asarray(self.prep.std[:channels], np.float32)
        arr = (arr / self.prep.scale - mean) / std
        return np.ascontiguousarray(arr.transpose(2, 0, 1) if self.nchw else arr).astype(np.float32)
