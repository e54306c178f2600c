"""Rebuild featcache/data/fashion_mnist_demo.npz, the embedded `demo` dataset.

The demo must be real labelled images that install offline and weigh little in git, so we
take a fixed, class-balanced slice of Fashion-MNIST (Zalando, MIT licence) from Debian's
`dataset-fashion-mnist` IDX files: the first 80 + 20 images of each class of the training
file become train/val, the first 50 of each class of the test file become test.

    apt-get install dataset-fashion-mnist
    .venv/bin/python scripts/build_demo_data.py [/usr/share/datasets/fashion-mnist]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from featcache.sources.idx import CLASSES as IDX_CLASSES
from featcache.sources.idx import read_idx

CLASSES = IDX_CLASSES["fashion-mnist"]


def first_per_class(labels: np.ndarray, start: int, count: int) -> np.ndarray:
    return np.sort(np.concatenate(
        [np.flatnonzero(labels == c)[start:start + count] for c in range(len(CLASSES))]))


def main(root: Path) -> None:
    tr_x = read_idx(root / "train-images-idx3-ubyte.gz")
    tr_y = read_idx(root / "train-labels-idx1-ubyte.gz")
    te_x = read_idx(root / "t10k-images-idx3-ubyte.gz")
    te_y = read_idx(root / "t10k-labels-idx1-ubyte.gz")
    picks = {"train": (tr_x, tr_y, first_per_class(tr_y, 0, 80)),
             "val": (tr_x, tr_y, first_per_class(tr_y, 80, 20)),
             "test": (te_x, te_y, first_per_class(te_y, 0, 50))}
    arrays = {"classes": np.array(CLASSES)}
    for split, (x, y, idx) in picks.items():
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x[idx], y[idx].astype(np.int64)
        arrays[f"{split}_index"] = idx  # position in the original file, kept as the key
    out = Path(__file__).resolve().parents[1] / "featcache" / "data" / "fashion_mnist_demo.npz"
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist"))
