"""Mutate a valid model's bytes many times and push each through quantcli; report what happened.

Runs in its own process (a crash in a native library would end only this process, and the test that
started it fails with the seed). Prints one JSON line: counts of clean errors, successes, and any
other exception (a bug).

    python -m tests.fuzz_worker SEED COUNT
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np

from quantcli.api import convert_model
from quantcli.core.errors import QuantCliError
from tests import models


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    kind = rng.integers(0, 4)
    if kind == 0:  # flip bytes
        for _ in range(int(rng.integers(1, 16))):
            buf[int(rng.integers(0, len(buf)))] = int(rng.integers(0, 256))
    elif kind == 1:  # truncate
        buf = buf[: int(rng.integers(0, len(buf)))]
    elif kind == 2:  # insert junk
        pos = int(rng.integers(0, len(buf)))
        buf[pos:pos] = rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    else:  # duplicate a slice
        a = int(rng.integers(0, len(buf)))
        b = min(len(buf), a + int(rng.integers(1, 200)))
        buf[a:a] = buf[a:b]
    return bytes(buf)


def main() -> None:
    seed, count = int(sys.argv[1]), int(sys.argv[2])
    rng = np.random.default_rng(seed)
    original = models.small_cnn(channels=4).SerializeToString()
    outcome = {"clean_error": 0, "converted": 0, "bug": 0, "bugs": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "d.npz"
        np.savez(data, x=models.structured_images(4, seed=0))
        for i in range(count):
            path = work / f"m{i}.onnx"
            path.write_bytes(mutate(original, rng))
            try:
                convert_model(path, work / f"q{i}.onnx", data_path=data)
                outcome["converted"] += 1
            except QuantCliError:
                outcome["clean_error"] += 1
            except Exception:
                outcome["bug"] += 1
                outcome["bugs"].append(f"#{i}: {traceback.format_exc().splitlines()[-1]}")
            path.unlink()
    print(json.dumps(outcome))


if __name__ == "__main__":
    main()
