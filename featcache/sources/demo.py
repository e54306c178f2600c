"""The embedded `demo` dataset: 1,500 real Fashion-MNIST images (Zalando, MIT licence).

800 train / 200 val / 500 test, balanced over 10 classes, 28x28 grayscale; 0.7 MB in the
package, so the whole pipeline runs offline. scripts/build_demo_data.py rebuilds it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .base import Dataset, Split

DEMO_FILE = Path(__file__).resolve().parents[1] / "data" / "fashion_mnist_demo.npz"


class ArraySplit(Split):
    def __init__(self, images: np.ndarray, labels: np.ndarray, keys: list[str]):
        super().__init__(keys, labels)
        self.images = images

    def open(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i], mode="L")


def open_demo() -> Dataset:
    data = np.load(DEMO_FILE)
    ds = Dataset(name="demo", source="demo:fashion-mnist", classes=[str(c) for c in data["classes"]])
    for split in ("train", "val", "test"):
        keys = [f"fashion-mnist/{split}/{i}" for i in data[f"{split}_index"]]
        ds.splits[split] = ArraySplit(data[f"{split}_images"], data[f"{split}_labels"], keys)
    return ds
