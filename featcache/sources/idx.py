"""MNIST and Fashion-MNIST from their IDX files (as Debian, torchvision or the authors ship them)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from ..errors import UserError
from .base import Dataset
from .demo import ArraySplit

CLASSES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                      "sneaker", "bag", "ankle boot"],
}
DEFAULT_ROOTS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}
TORCHVISION_DIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def read_idx(path: Path) -> np.ndarray:
    """magic (2 zero bytes, type, ndim), big-endian uint32 dims, then uint8 data."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    ndim = raw[3]
    dims = np.frombuffer(raw[4:4 + 4 * ndim], dtype=">u4").astype(int)
    return np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8).reshape(dims)


def _find(root: Path, name: str, stem: str) -> Path | None:
    for folder in (root, root / "raw", root / TORCHVISION_DIRS[name] / "raw"):
        for suffix in ("", ".gz"):
            if (folder / (stem + suffix)).is_file():
                return folder / (stem + suffix)
    return None


def open_idx(name: str, root: Path | None) -> Dataset:
    root = root or DEFAULT_ROOTS.get(name, Path("data") / name)
    files = {stem: _find(root, name, stem) for stem in
             ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")}
    missing = [s for s, p in files.items() if p is None]
    if missing:
        raise UserError(f"{name}: IDX files {missing} not found under {root}. Point --data-root "
                        "at them, or pass --download (needs network).")
    ds = Dataset(name=name, source=f"idx:{root.resolve()}", classes=CLASSES[name])
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(files[f"{prefix}-images-idx3-ubyte"])
        y = read_idx(files[f"{prefix}-labels-idx1-ubyte"]).astype(np.int64)
        if len(x) != len(y):
            raise UserError(f"{name}: {prefix} images and labels differ in count ({len(x)} vs {len(y)})")
        ds.splits[split] = ArraySplit(x, y, [f"{name}/{split}/{i}" for i in range(len(y))])
    return ds
