"""Datasets by name through torchvision: files under --data-root, fetched with --download.

Each entry: torchvision class, the constructor arguments of each split, where the labels
and class names live. Splits a dataset does not ship (val, mostly) are made by
open_dataset with a seeded stratified split of train.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError
from .base import Dataset, Split

TRAIN_TEST = {"train": {"train": True}, "test": {"train": False}}
REGISTRY: dict[str, tuple[str, dict[str, dict]]] = {
    "cifar10": ("CIFAR10", TRAIN_TEST),
    "cifar100": ("CIFAR100", TRAIN_TEST),
    "svhn": ("SVHN", {"train": {"split": "train"}, "test": {"split": "test"}}),
    "stl10": ("STL10", {"train": {"split": "train"}, "test": {"split": "test"}}),
    "flowers102": ("Flowers102", {s: {"split": s} for s in ("train", "val", "test")}),
    "dtd": ("DTD", {s: {"split": s} for s in ("train", "val", "test")}),
    "food101": ("Food101", {"train": {"split": "train"}, "test": {"split": "test"}}),
    "oxford-pets": ("OxfordIIITPet", {"train": {"split": "trainval"}, "test": {"split": "test"}}),
    "eurosat": ("EuroSAT", {"train": {}}),
    "caltech101": ("Caltech101", {"train": {}}),
    "places365": ("Places365", {"train": {"split": "train-standard", "small": True},
                                "val": {"split": "val", "small": True}}),
}
LABEL_ATTRS = ("targets", "_labels", "labels", "y")


class TorchvisionSplit(Split):
    def __init__(self, data, name: str, split: str, labels: np.ndarray):
        super().__init__([f"{name}/{split}/{i}" for i in range(len(labels))], labels)
        self.data = data

    def open(self, i: int) -> Image.Image:
        img = self.data[i][0]
        return img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))


def _labels(data) -> np.ndarray:
    for attr in LABEL_ATTRS:
        if getattr(data, attr, None) is not None:
            return np.asarray(getattr(data, attr), dtype=np.int64)
    return np.array([data[i][1] for i in range(len(data))], dtype=np.int64)


def open_torchvision(name: str, root: Path | None, download: bool) -> Dataset:
    import torchvision.datasets as tvd

    cls_name, splits = REGISTRY[name]
    root = root or Path("data") / name
    ds = Dataset(name=name, source=f"torchvision:{cls_name}:{root.resolve()}", classes=[])
    for split, kwargs in splits.items():
        try:
            data = getattr(tvd, cls_name)(str(root), download=download, **kwargs)
        except (RuntimeError, FileNotFoundError, OSError) as e:
            hint = ("the download failed (offline?)" if download else
                    "pass --download to fetch it (needs network)")
            raise UserError(f"{name}: files not found under {root} ({e}); {hint}, or point "
                            "--data-root at a folder that has them.") from None
        labels = _labels(data)
        ds.splits[split] = TorchvisionSplit(data, name, split, labels)
        if not ds.classes:
            names = getattr(data, "classes", None) or getattr(data, "categories", None)
            ds.classes = list(names) if names else [str(i) for i in range(int(labels.max()) + 1)]
    return ds
