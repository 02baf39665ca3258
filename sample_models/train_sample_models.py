"""Train and export the bundled sample models (needs the ``models`` extra: torch 2.13.0 CPU, scikit-learn).

    pip install -e ".[models]"
    python sample_models/train_sample_models.py

Writes ``sample_models/digits_cnn.onnx``, ``sample_models/digits_transformer.onnx``, their calibration
and evaluation splits in ``calibration_data/``, and ``sample_models/metrics.json`` (accuracy measured
with onnxruntime on the evaluation split, sizes, sha256, op histograms).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from digits_data import splits, to_patches  # noqa: E402

OPSET = 17


class ResidualBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class DigitsCNN(nn.Module):
    """Conv+BN+ReLU stem, residual blocks at 32 and 64 channels, max pool, global average pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            ResidualBlock(32),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            ResidualBlock(64),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )  # fmt: skip
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = self.q(x).reshape(b, t, self.heads, self.dh).transpose(1, 2)
        k = self.k(x).reshape(b, t, self.heads, self.dh).transpose(1, 2)
        v = self.v(x).reshape(b, t, self.heads, self.dh).transpose(1, 2)
        att = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.dh)), dim=-1)
        y = torch.matmul(att, v).transpose(1, 2).reshape(b, t, d)
        return self.o(y)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.att = Attention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.att(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class DigitsTransformer(nn.Module):
    """Patch embedding, learned positions, 3 pre-LN encoder blocks, mean pooling, linear head."""

    def __init__(self, d: int = 128, heads: int = 4, ff: int = 256, depth: int = 3, tokens: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(16, d)
        self.pos = nn.Parameter(torch.zeros(1, tokens, d))
        self.blocks = nn.Sequential(*(Block(d, heads, ff) for _ in range(depth)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.embed(x) + self.pos)
        return self.head(self.ln(h).mean(dim=1))


def shift_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels (roll plus zero fill) of [N,1,16,16] images."""
    out = torch.zeros_like(x)
    dy, dx = torch.randint(-2, 3, (2,), generator=gen).tolist()
    src = x[:, :, max(0, -dy) : 16 - max(0, dy), max(0, -dx) : 16 - max(0, dx)]
    out[:, :, max(0, dy) : max(0, dy) + src.shape[2], max(0, dx) : max(0, dx) + src.shape[3]] = src
    return out


def train(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, epochs: int, lr: float, patches: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x_all) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x_all), generator=gen)
        for i in range(0, len(x_all), 64):
            idx = perm[i : i + 64]
            xb = shift_augment(x_all[idx], gen)
            if patches:
                xb = torch.from_numpy(to_patches(xb.numpy()))
            loss = nn.functional.cross_entropy(model(xb), y_all[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def export(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        model, (example,), str(path), input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=OPSET,
        training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True, dynamo=False,
    )  # fmt: skip
    m = onnx.load(str(path))
    m.producer_name, m.producer_version, m.doc_string = "quantcli sample_models/train_sample_models.py", "", ""
    for node in m.graph.node:
        node.doc_string = ""
    onnx.checker.check_model(m, full_check=True)
    path.write_bytes(m.SerializeToString())


def evaluate(path: Path, model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(None, {"input": x[i : i + 7]})[0] for i in range(0, len(x), 7)])
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    diff = float(np.abs(ref - logits).max())
    if diff > 1e-4:
        raise SystemExit(f"{path}: onnxruntime and torch disagree by {diff}")
    for bs in (1, 32):
        assert sess.run(None, {"input": x[:bs]})[0].shape == (bs, 10)
    return float((logits.argmax(1) == y).mean())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", type=Path, default=HERE.parent)
    args = parser.parse_args()
    models_dir, data_dir = args.out_dir / "sample_models", args.out_dir / "calibration_data"
    models_dir.mkdir(exist_ok=True)
    data_dir.mkdir(exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    data = splits()
    metrics: dict[str, dict] = {}
    for name, make, patches, epochs, lr in (
        ("digits_cnn", DigitsCNN, False, 30, 3e-3),
        ("digits_transformer", DigitsTransformer, True, 150, 2e-3),
    ):
        t0 = time.time()
        torch.manual_seed(0)
        model = make()
        train(model, *data["train"], epochs=epochs, lr=lr, patches=patches)
        prep = to_patches if patches else (lambda a: a)
        calib_x = prep(data["calib"][0])
        eval_x, eval_y = prep(data["eval"][0]), data["eval"][1]
        path = models_dir / f"{name}.onnx"
        export(model, torch.from_numpy(eval_x[:2]), path)
        acc = evaluate(path, model, eval_x, eval_y)
        np.savez(data_dir / f"{name}_calib.npz", input=calib_x)
        np.savez(data_dir / f"{name}_eval.npz", input=eval_x, labels=eval_y)
        onnx_model = onnx.load(str(path))
        metrics[name] = {
            "eval_top1_accuracy": acc,
            "eval_samples": len(eval_y),
            "opset": OPSET,
            "train_seconds": round(time.time() - t0, 1),
            "bytes": path.stat().st_size,
            "sha256": sha256(path),
            "op_histogram": dict(sorted(Counter(n.op_type for n in onnx_model.graph.node).items())),
            "data_sha256": {f.name: sha256(f) for f in (data_dir / f"{name}_calib.npz", data_dir / f"{name}_eval.npz")},
        }
        print(f"{name}: eval top-1 {100 * acc:.2f}% ({len(eval_y)} samples), {path.stat().st_size} bytes")
    (models_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")


if __name__ == "__main__":
    main()
