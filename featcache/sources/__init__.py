"""Dataset readers. `open_dataset` turns a --dataset argument into named splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from .base import Dataset, Split, stratified_pick
from .demo import open_demo
from .imagefolder import open_imagefolder

__all__ = ["Dataset", "Split", "open_dataset"]


def open_dataset(spec: str, seed: int = 0, val_fraction: float = 0.2,
                 limit: int | None = None) -> Dataset:
    """`demo` or an ImageFolder directory; `limit` keeps at most that many samples per split,
    class-balanced and seeded, for quick tries on big sets."""
    if spec == "demo":
        ds = open_demo()
    else:
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise UserError(f"dataset not found: '{spec}' is neither 'demo' nor an existing "
                            "folder (ImageFolder layout: <root>/<class>/<image>).")
        ds = open_imagefolder(path, seed, val_fraction)
    if limit is not None:
        if limit < 1:
            raise UserError("--limit must be at least 1")
        rng = np.random.default_rng(seed)
        ds.splits = {name: s.subset(stratified_pick(s.labels, limit, rng)) if len(s) > limit else s
                     for name, s in ds.splits.items()}
    return ds
