"""How big a store will be, said before a single byte is written."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .location import Location, is_url
from .store import STORAGE


def human_bytes(n: float) -> str:
    if abs(n) < 1000:
        return f"{int(n)} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} PB"


@dataclass
class StorePlan:
    splits: dict[str, int]
    taps: int
    tokens: int
    width: int
    itemsize: int
    scale_bytes: int  # per token per tap: the int8 scales (0 for other dtypes)
    free: int | None  # bytes free on the filesystem that will hold the store (None: a bucket)

    @property
    def bytes_per_sample(self) -> int:
        return self.taps * self.tokens * (self.width * self.itemsize + self.scale_bytes)

    @property
    def total(self) -> int:
        return sum(self.splits.values()) * self.bytes_per_sample

    def describe(self) -> str:
        n = sum(self.splits.values())
        per_split = ", ".join(f"{k} {v:,}" for k, v in self.splits.items())
        return (f"store size: {n:,} samples ({per_split}) x {self.taps} taps x {self.tokens} "
                f"tokens x {self.width} channels x {self.itemsize} B"
                + (f" (+ {self.scale_bytes} B scale per token)" if self.scale_bytes else "")
                + f" = {human_bytes(self.total)} "
                f"({human_bytes(self.bytes_per_sample)} per sample); free: "
                + ("unknown (object store)" if self.free is None else human_bytes(self.free)))

    def check_fits(self, force: bool, left: int | None = None) -> None:
        """Refuse a store larger than the free space; `left`: the samples a resumed store
        still has to write (its shards not done), else all of them."""
        needed = self.total if left is None else left * self.bytes_per_sample
        if self.free is None or needed <= self.free or force:
            return
        if left is not None:  # (a resumed store keeps its settings: only space helps)
            raise UserError(f"the store needs {human_bytes(needed)} more but only {human_bytes(self.free)} "
                            "is free. Free some space, or pass --force to write anyway.")
        raise UserError(
            f"the store needs {human_bytes(needed)} but only {human_bytes(self.free)} is free. Free "
            "some space, shrink it (--limit N samples per split, --taps last:4 or every:2, --dtype "
            "int8: half of fp16's bytes) or pass --force to write anyway.")


def free_bytes(path: Location) -> int | None:
    """Free space where `path` will be created (its nearest existing parent); None for URLs."""
    if is_url(path):
        return None
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def make_plan(splits: dict[str, int], taps: int, tokens: int, width: int, dtype: str,
              out: Location) -> StorePlan:
    """`dtype`: one of codec.DTYPES."""
    return StorePlan(splits=splits, taps=taps, tokens=tokens, width=width,
                     itemsize=np.dtype(STORAGE[dtype]).itemsize,
                     scale_bytes=4 if dtype == "int8" else 0, free=free_bytes(out))
