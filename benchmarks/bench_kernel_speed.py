"""What this host measures: int8 vs float speed of the kernel shapes planning asks about.

    PYTHONPATH=. python benchmarks/bench_kernel_speed.py [--threads 1] [--rounds 7]

Prints the CPU model, its integer-relevant flags and the onnxruntime version, then for each shape
(image stems, depthwise Convs, small MatMuls static and dynamic) the ratio ``t_float / t_int8``
(above 1: the integer kernel is faster) measured by ``quantcli.verify.kernel_speed.measure_rounds``
on the shape as the planning oracle measures it (``bucket``: exact, but unknown sides and MatMul
rows), the median of the rounds and their middle half, with no cache. The stem rule keeps a stem
float when the top of that spread is below ``1 - STEM_MARGIN``. A "depthwise island" is the
depthwise Conv between two integer 1x1 Convs, integer against float with its DequantizeLinear,
QuantizeLinear and layout transposes (the figure the depthwise rule decides from, below
``1 - DEPTHWISE_MARGIN``); "depthwise" alone is the bare kernel. The PP-OCR classifier rows are its
5x5 depthwise islands at their real channels and strides; "pow2" rows are the power-of-two
channels and square strides quantcli measured them at before.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort

from quantcli.core.host import KernelKind, KernelShape, cpu_model, int8_flags
from quantcli.static.rules.stem import STEM_MARGIN
from quantcli.verify.kernel_speed import bucket, measure_rounds, spread

K = KernelKind
SHAPES: tuple[tuple[str, KernelShape], ...] = (
    ("stem, ImageNet CNN (3->16 3x3/2)", KernelShape(K.STEM_CONV, (3, 16, 3, 3, 2, 224, 224))),
    ("stem, 3->16 3x3/1 at 224", KernelShape(K.STEM_CONV, (3, 16, 3, 3, 1, 224, 224))),
    ("stem, 3->32 3x3/2 at 224", KernelShape(K.STEM_CONV, (3, 32, 3, 3, 2, 224, 224))),
    ("stem, YOLO-style (3->16 3x3/2 at 640)", KernelShape(K.STEM_CONV, (3, 16, 3, 3, 2, 640, 640))),
    ("stem, OCR line (3->8 3x3 at 48x192)", KernelShape(K.STEM_CONV, (3, 8, 3, 3, 1, 48, 192))),
    ("stem, 1-channel 64x64 (1->32 3x3)", KernelShape(K.STEM_CONV, (1, 32, 3, 3, 1, 64, 64))),
    ("stem, digits_cnn (1->32 3x3 at 16x16)", KernelShape(K.STEM_CONV, (1, 32, 3, 3, 1, 16, 16))),
    ("depthwise 3x3, 32 ch at 112", KernelShape(K.DEPTHWISE_CONV, (32, 32, 3, 3, 1, 112, 112))),
    ("depthwise 3x3, 128 ch at 28", KernelShape(K.DEPTHWISE_CONV, (128, 128, 3, 3, 1, 28, 28))),
    ("depthwise 3x3, 512 ch at 7", KernelShape(K.DEPTHWISE_CONV, (512, 512, 3, 3, 1, 7, 7))),
    ("depthwise 5x5/2, 64 ch at 56", KernelShape(K.DEPTHWISE_CONV, (64, 64, 5, 5, 2, 56, 56))),
    ("depthwise island 3x3, 32 ch at 112", KernelShape(K.DEPTHWISE_ISLAND, (32, 32, 3, 3, 1, 112, 112))),
    ("depthwise island 3x3, 128 ch at 28", KernelShape(K.DEPTHWISE_ISLAND, (128, 128, 3, 3, 1, 28, 28))),
    ("depthwise island 3x3, 512 ch at 7", KernelShape(K.DEPTHWISE_ISLAND, (512, 512, 3, 3, 1, 7, 7))),
    ("depthwise island 5x5/2, 64 ch at 56", KernelShape(K.DEPTHWISE_ISLAND, (64, 64, 5, 5, 2, 56, 56))),
    ("depthwise island 3x3, PP-OCR cls 200 ch at 3x12", KernelShape(K.DEPTHWISE_ISLAND, (200, 200, 3, 3, 1, 3, 12))),
    ("PP-OCR cls 5x5, 88 ch at 3x96", KernelShape(K.DEPTHWISE_ISLAND, (88, 88, 5, 5, 1, 3, 96))),
    ("  pow2: 128 ch", KernelShape(K.DEPTHWISE_ISLAND, (128, 128, 5, 5, 1, 3, 96))),
    ("PP-OCR cls 5x5, 40 ch at 3x96", KernelShape(K.DEPTHWISE_ISLAND, (40, 40, 5, 5, 1, 3, 96))),
    ("  pow2: 64 ch", KernelShape(K.DEPTHWISE_ISLAND, (64, 64, 5, 5, 1, 3, 96))),
    ("PP-OCR cls 5x5/2x1, 104 ch at 3x96", KernelShape(K.DEPTHWISE_ISLAND, (104, 104, 5, 5, 2, 3, 96), 1)),
    ("  pow2, square: 128 ch /2", KernelShape(K.DEPTHWISE_ISLAND, (128, 128, 5, 5, 2, 3, 96))),
    ("PP-OCR cls 5x5, 200 ch at 2x96", KernelShape(K.DEPTHWISE_ISLAND, (200, 200, 5, 5, 1, 2, 96))),
    ("  pow2: 256 ch", KernelShape(K.DEPTHWISE_ISLAND, (256, 256, 5, 5, 1, 2, 96))),
    ("MatMul 1x1x64 @ 64x64", KernelShape(K.MATMUL, (1, 64, 64))),
    ("MatMul 1x16x128 @ 128x128", KernelShape(K.MATMUL, (16, 128, 128))),
    ("MatMul 1x64x256 @ 256x256", KernelShape(K.MATMUL, (64, 256, 256))),
    ("MatMul 1x128x384 @ 384x1536", KernelShape(K.MATMUL, (128, 384, 1536))),
    ("dynamic MatMul 1x1x64 @ 64x64", KernelShape(K.DYNAMIC_MATMUL, (1, 64, 64))),
    ("dynamic MatMul 1x16x128 @ 128x128", KernelShape(K.DYNAMIC_MATMUL, (16, 128, 128))),
    ("dynamic MatMul 1x64x256 @ 256x256", KernelShape(K.DYNAMIC_MATMUL, (64, 256, 256))),
    ("dynamic MatMul 1x128x384 @ 384x1536", KernelShape(K.DYNAMIC_MATMUL, (128, 384, 1536))),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; int8 flags: {', '.join(int8_flags()) or 'none'}; onnxruntime {ort.__version__}")
    below = 1 - STEM_MARGIN
    print(f"threads {args.threads}, median of {args.rounds} alternating rounds; stem float below {below:.2f}x")
    print(f"{'shape':40s} {'measured as':34s} {'int8/float speed':>16s}  middle half of rounds")
    for label, shape in SHAPES:
        rep = bucket(shape)
        rounds = measure_rounds(rep, threads=args.threads, rounds=args.rounds, budget_s=0.2)
        low, high = spread(rounds)
        print(f"{label:40s} {rep.describe():34s} {float(np.median(rounds)):15.2f}x  {low:.2f}-{high:.2f}")


if __name__ == "__main__":
    main()
