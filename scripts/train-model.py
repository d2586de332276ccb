#!/usr/bin/env python3
"""Trains the predictor's model and writes it, its accuracy and the test fixtures.

A small CNN learns scikit-learn's bundled digits (1,797 images of 8x8 pixels, values 0..16),
brought to MNIST's form so the model serves the same requests as KServe's torchserve MNIST
example. Preprocessing, exactly (the Rust predictor and the fixtures follow it):

  1. x8 = round(v * 255 / 16) as uint8 (8x8, ink is high, background 0, like MNIST);
  2. upscale to 20x20 with PIL's bilinear resize (Image.resize((20, 20), Image.BILINEAR));
  3. paste at offset (4, 4) into a black 28x28 image: MNIST centres its 20x20 digits in 28x28;
  4. that 28x28 uint8 image is the digit: the PNG files are it (mode "L"), and the model's
     input tensor is it divided by 255, float32 in [0, 1], shape [N, 1, 28, 28]; 0 is black
     background, 1 is white ink. The model normalises internally ((x - mean) / std with the
     training set's mean and std), so callers never do.

The model's output is logits [N, 10]; the predicted class is their argmax.

Needs torch (the full wheel), scikit-learn and pillow in the running python, e.g.:
  python3 -m venv /tmp/train-venv
  /tmp/train-venv/bin/pip install torch==2.13.0 scikit-learn pillow
  /tmp/train-venv/bin/python scripts/train-model.py

Writes (paths relative to the repo, found from this script's location):
  predictor/model/mnist/model.pt          TorchScript module
  predictor/model/mnist/metrics.json      held-out accuracy and how it was made
  predictor/tests/fixtures/heldout.json   the held-out split: pixels, PNG, label, python's logits
  predictor/tests/fixtures/digits/N.png   one held-out PNG per class
  predictor/samples/mnist.json            v1 sample request (a held-out digit as PNG)
  predictor/samples/mnist_v2.json         v2 sample request, BYTES (the same PNG)
  predictor/samples/mnist_v2_tensor.json  v2 sample request, FP32 [1, 1, 28, 28]
"""

import base64
import io
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SEED = 0
EPOCHS = 40
BATCH = 64
HELDOUT_FRACTION = 0.2

REPO = Path(__file__).resolve().parent.parent
PREDICTOR = REPO / "predictor"


def to_mnist(image8x8: np.ndarray) -> np.ndarray:
    """One digit (8x8, values 0..16) to a 28x28 uint8 image (steps 1-3 in the module doc)."""
    x8 = np.round(image8x8 * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
    small = Image.fromarray(x8, mode="L").resize((20, 20), Image.BILINEAR)
    canvas = Image.new("L", (28, 28), 0)
    canvas.paste(small, (4, 4))
    return np.asarray(canvas, dtype=np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


class Net(nn.Module):
    """Two conv layers and two dense ones: about 110k parameters, ~1.1 M multiply-adds."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 7 * 7, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 16 x 14 x 14
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 32 x 7 x 7
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def shifted(batch: torch.Tensor) -> torch.Tensor:
    """Augmentation: each image moved by up to 2 pixels in x and y (zero fill)."""
    out = torch.zeros_like(batch)
    for i in range(batch.shape[0]):
        dy, dx = random.randint(-2, 2), random.randint(-2, 2)
        src = batch[i, 0]
        dst = out[i, 0]
        ys, yd = (slice(0, 28 - dy), slice(dy, 28)) if dy >= 0 else (slice(-dy, 28), slice(0, 28 + dy))
        xs, xd = (slice(0, 28 - dx), slice(dx, 28)) if dx >= 0 else (slice(-dx, 28), slice(0, 28 + dx))
        dst[yd, xd] = src[ys, xs]
    return out


def main() -> None:
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))

    digits = load_digits()
    images = np.stack([to_mnist(im) for im in digits.images])  # [1797, 28, 28] uint8
    labels = digits.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=HELDOUT_FRACTION, random_state=SEED, stratify=labels
    )

    def tensor(idx):
        return torch.from_numpy(images[idx].astype(np.float32) / 255.0).unsqueeze(1)

    x_train, y_train = tensor(idx_train), torch.from_numpy(labels[idx_train])
    x_test, y_test = tensor(idx_test), torch.from_numpy(labels[idx_test])
    mean, std = float(x_train.mean()), float(x_train.std())

    model = Net(mean, std)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(x_train))
        for start in range(0, len(perm), BATCH):
            b = perm[start : start + BATCH]
            loss = F.cross_entropy(model(shifted(x_train[b])), y_train[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        if epoch % 10 == 9 or epoch == EPOCHS - 1:
            model.eval()
            with torch.no_grad():
                acc = (model(x_test).argmax(1) == y_test).float().mean().item()
            print(f"epoch {epoch + 1}: loss {loss.item():.4f} held-out accuracy {acc:.4f}")

    model.eval()
    model_dir = PREDICTOR / "model" / "mnist"
    model_dir.mkdir(parents=True, exist_ok=True)
    scripted = torch.jit.script(model)
    scripted.save(str(model_dir / "model.pt"))

    # Evaluate what was written, not the object in memory.
    loaded = torch.jit.load(str(model_dir / "model.pt"))
    with torch.no_grad():
        logits = loaded(x_test)
    predicted = logits.argmax(1)
    correct = int((predicted == y_test).sum())
    accuracy = correct / len(y_test)
    print(f"held-out accuracy of the exported model: {accuracy:.4f} ({correct}/{len(y_test)})")

    (model_dir / "metrics.json").write_text(
        json.dumps(
            {
                "dataset": "sklearn.datasets.load_digits, 8x8 upscaled to 28x28 (see scripts/train-model.py)",
                "heldout_images": len(y_test),
                "heldout_correct": correct,
                "heldout_accuracy": round(accuracy, 4),
                "seed": SEED,
                "epochs": EPOCHS,
                "torch": torch.__version__,
            },
            indent=2,
        )
        + "\n"
    )

    fixtures = PREDICTOR / "tests" / "fixtures"
    (fixtures / "digits").mkdir(parents=True, exist_ok=True)
    heldout = []
    for k, i in enumerate(idx_test):
        heldout.append(
            {
                "label": int(labels[i]),
                "predicted": int(predicted[k]),
                "pixels": base64.b64encode(images[i].tobytes()).decode(),
                "png": base64.b64encode(png_bytes(images[i])).decode(),
                "logits": [round(float(v), 5) for v in logits[k]],
            }
        )
    (fixtures / "heldout.json").write_text(
        json.dumps(
            {
                "about": "held-out digits; pixels: base64 of 784 uint8 row-major (tensor = pixels / 255); "
                "png: base64 of the same image as 28x28 grayscale PNG; logits: the exported model's output in python",
                "images": heldout,
            }
        )
        + "\n"
    )

    first_of_class = {}
    for item, i in zip(heldout, idx_test):
        if item["label"] == item["predicted"] and item["label"] not in first_of_class:
            first_of_class[item["label"]] = i
    for label, i in sorted(first_of_class.items()):
        (fixtures / "digits" / f"{label}.png").write_bytes(png_bytes(images[i]))

    samples = PREDICTOR / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    sample = images[first_of_class[2]]
    b64 = base64.b64encode(png_bytes(sample)).decode()
    (samples / "mnist.json").write_text(json.dumps({"instances": [{"data": b64}]}) + "\n")
    (samples / "mnist_v2.json").write_text(
        json.dumps({"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES", "data": [b64]}]}) + "\n"
    )
    flat = [round(float(v) / 255.0, 6) for v in sample.reshape(-1)]
    (samples / "mnist_v2_tensor.json").write_text(
        json.dumps({"inputs": [{"name": "input-0", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": flat}]})
        + "\n"
    )
    print(f"wrote {model_dir / 'model.pt'}, fixtures in {fixtures}, samples in {samples}")


if __name__ == "__main__":
    main()
