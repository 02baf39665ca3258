"""Check ``compare --html`` in a real headless browser, and save a screenshot of the page.

Builds the report of the bundled digits CNN (calibrate -> convert with the Python API, then
``quantcli compare --per-layer --html`` on its held-out data, with a gate), opens it in headless
Chromium, and asserts on the DOM the browser parsed (``--dump-dom``):

1. the page title and heading name both models;
2. the verdict says the gate passed;
3. the sections Accuracy, Latency, Per-layer error and Activations of the worst layers are there;
4. at least three inline SVG plots are drawn (per-layer error, activation histograms, latency);
5. the worst layer's full node name (from the ``--json`` document of the same run) is written, uncut, on
   the error plot ("1: NAME (OP), ... dB") and in the worst-layers table;
6. the page needs nothing from outside: no <script>, no external src/href;
7. the plots have their titles and labelled axes: "Where the error comes from" with "SQNR (dB), higher
   is better" over "quantized tensor, in model order ...", and one "Latency distribution, batch N" per
   batch size with "time per run (ms)", "runs" and its median and p90 marked in ms.

Then it saves a screenshot (``benchmarks/report_screenshot.png`` by default; the window is 1280 pixels
wide and tall enough for the page, and the white below the page is cropped when Pillow is there) and
asserts it is a PNG as wide as the window that is not blank (more than 2% of its pixels are not white).

Needs Chromium (Debian: ``apt-get install chromium``); exits 2 with a message when it is missing.

Usage:
    python benchmarks/screenshot_report.py [--out benchmarks/report_screenshot.png] [--chromium PATH]
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import quantcli  # noqa: E402

MODEL = REPO / "sample_models" / "digits_cnn.onnx"
CALIB = REPO / "calibration_data" / "digits_cnn_calib.npz"
EVAL = REPO / "calibration_data" / "digits_cnn_eval.npz"
WINDOW = (1280, 3600)
SECTIONS = ("Accuracy", "Latency", "Per-layer error", "Activations of the worst layers")
PLOT_LABELS = (
    "Where the error comes from",
    "SQNR (dB), higher is better",
    "quantized tensor, in model order from input to output",
    "time per run (ms)",
    ">runs<",
)


def build_report(folder: Path) -> tuple[Path, dict]:
    """The HTML report and the JSON document of one comparison of the digits CNN."""
    quantized, page, doc = folder / "digits_cnn.int8.onnx", folder / "report.html", folder / "report.json"
    calib = quantcli.calibrate(MODEL, CALIB)
    quantcli.convert(MODEL, quantized, calibration=calib, force=True)
    cmd = [sys.executable, "-m", "quantcli", "compare", str(MODEL), str(quantized), "--data", str(EVAL)]
    cmd += ["--per-layer", "--runs", "30", "--max-accuracy-drop", "1", "--html", str(page), "--json", str(doc)]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL)
    return page, json.loads(doc.read_text())


def chromium(binary: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium with a throw-away profile (``--no-sandbox``: containers run it as root)."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}"]
        return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120, check=True)


def check_dom(dom: str, doc: dict) -> list[str]:
    """What the browser parsed: one line per check passed; AssertionError on the first that fails."""
    candidate, reference = Path(doc["candidate"]["path"]).name, Path(doc["reference"]["path"]).name
    assert re.search(rf"<title>[^<]*{re.escape(candidate)}", dom), "the page title does not name the model"
    assert f"{candidate} vs {reference}" in dom, "the heading does not name both models"
    assert re.search(r"Passes all \d+ gates", dom), "no passing verdict"
    missing = [s for s in SECTIONS if f"<h2>{s}</h2>" not in dom]
    assert not missing, f"sections missing: {missing}"
    svgs = dom.count("<svg")
    assert svgs >= 3, f"{svgs} SVG plots"
    worst = html.escape(doc["layers"][0]["node"], quote=False)
    assert re.search(rf">1: {re.escape(worst)} \(", dom), f"the plot does not name {worst}"
    assert f"<code>{worst}</code>" in dom.replace("<wbr>", ""), f"the table does not name the worst layer {worst}"
    assert "<script" not in dom and not re.search(r'(src|href)="https?:', dom), "the page loads something"
    batches = [lat["batch_size"] for lat in doc["latency"]]
    labels = [*PLOT_LABELS, *(f"Latency distribution, batch {b}" for b in batches)]
    absent = [text for text in labels if text not in dom]
    assert not absent, f"plot titles or axis labels missing: {absent}"
    marks = len(re.findall(r">median [0-9.e+-]+ ms<", dom)), len(re.findall(r">p90 [0-9.e+-]+ ms<", dom))
    assert marks == (2 * len(batches), 2 * len(batches)), f"median and p90 marks {marks} for batches {batches}"
    return [
        f"title and heading name {candidate} and {reference}",
        "the verdict says the gate passed",
        f"sections present: {', '.join(SECTIONS)}",
        f"{svgs} inline SVG plots",
        f"worst layer {worst} named in full on the error plot and in the table",
        "self-contained: no script, no external src/href",
        f"plot titles and axis labels: {'; '.join(labels)}; median and p90 marked in ms for both models",
    ]


def check_png(path: Path) -> str:
    """A PNG as wide as the window, not blank; the white below the page cropped (with Pillow)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == WINDOW, f"screenshot is {width}x{height}, window {WINDOW}"
    try:
        from PIL import Image, ImageOps
    except ImportError:
        return f"{width}x{height} PNG, {len(data)} bytes (Pillow missing: blankness not checked)"
    with Image.open(path) as img:
        grey = img.convert("L")
        inked = sum(grey.histogram()[:250]) / (width * height)
        box = ImageOps.invert(grey).getbbox()  # the part that is not white
        if box is not None:
            img.crop((0, 0, width, min(height, box[3] + 24))).save(path)
    assert inked > 0.02, f"only {100 * inked:.2f}% of the pixels are not white: a blank page"
    assert box is not None and box[3] + 24 < height, "the page is taller than the window: raise WINDOW"
    return f"{width}x{height} window, page {box[3]} px tall, {100 * inked:.1f}% of pixels not white"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "report_screenshot.png")
    parser.add_argument("--chromium", default=None, help="browser binary (default: chromium on PATH)")
    args = parser.parse_args()
    binary = args.chromium or next(
        (b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )
    if binary is None:
        print("no Chromium found: apt-get install chromium (or give --chromium PATH)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        page, doc = build_report(Path(tmp))
        dom = chromium(binary, "--dump-dom", page.as_uri()).stdout
        for line in check_dom(dom, doc):
            print(f"ok: {line}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        chromium(binary, f"--screenshot={args.out}", f"--window-size={WINDOW[0]},{WINDOW[1]}", page.as_uri())
    print(f"ok: {check_png(args.out)}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
