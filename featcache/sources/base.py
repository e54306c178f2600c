"""What every dataset reader yields: named splits of (key, label, image loader)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from .video import FrameSampling


SPLIT_NAMES = ("train", "val", "test")


def split_order(name: str) -> tuple[int, str]:
    """Where a split goes: train, val, test, then others by name (int8 calibrates on the first)."""
    return (SPLIT_NAMES.index(name) if name in SPLIT_NAMES else len(SPLIT_NAMES), name)


# what other tools call them (matched whatever the case, as the names themselves are)
SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val", "training": "train", "testing": "test"}


def our_split_name(name: str) -> str:
    """train, val or test for another tool's name of one (Validation, TEST, ...); any other
    name (a split only `sidetrain eval` reads) as it is."""
    low = name.lower()
    return SPLIT_ALIASES.get(low, low if low in SPLIT_NAMES else name)


class Split:
    """One split: stable keys, integer labels, and a way to open sample i as a PIL image
    (or, for video, as the clip's sampled frames).

    `open` may raise any exception for an unreadable sample; the extractor records the
    sample as skipped instead of dying on it.
    """

    def __init__(self, keys: list[str], labels: np.ndarray):
        self.keys = list(keys)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def open(self, i: int) -> Image.Image | list[Image.Image]:
        """Sample i: an image, or a video split's sampled frames."""
        raise NotImplementedError

    def file(self, i: int) -> Path | None:
        """The file sample i is read from, if it comes from one (a store records a few such
        files' bytes, to tell inputs regenerated in place)."""
        return None

    def subset(self, index: np.ndarray) -> "Split":
        """The same split restricted to `index` (in that order)."""
        return _Subset(self, np.asarray(index, dtype=np.int64))

    def fingerprint(self) -> str:
        """Identifies the inputs: same keys and labels in the same order -> same fingerprint."""
        h = hashlib.sha256()
        h.update("\n".join(self.keys).encode())
        h.update(self.labels.tobytes())
        return h.hexdigest()


class FileSplit(Split):
    """Images stored as files: keys are paths relative to `root`."""

    def __init__(self, root: Path, keys: list[str], labels: np.ndarray):
        super().__init__(keys, labels)
        self.root = root

    def open(self, i: int) -> Image.Image:
        with Image.open(self.root / self.keys[i]) as img:
            img.load()
            return img

    def file(self, i: int) -> Path:
        return self.root / self.keys[i]


class _Subset(Split):
    def __init__(self, parent: Split, index: np.ndarray):
        super().__init__([parent.keys[i] for i in index], parent.labels[index])
        self.parent, self.index = parent, index

    def open(self, i: int) -> Image.Image | list[Image.Image]:
        return self.parent.open(int(self.index[i]))

    def file(self, i: int) -> Path | None:
        return self.parent.file(int(self.index[i]))


@dataclass
class Dataset:
    """What a reader (sources/*.py) returns; `open_dataset` then adds a held-out val split
    when there is none (so a reader without splits returns only "train") and applies
    --limit, --per-class and --split. Labels are 0 or more (the store's -1 is "unreadable")."""

    name: str  # short name: the default store folder, cache/<name>
    # where the inputs lie (absolute paths, and --data-root when it changes what is read):
    # part of the store's content key, so two datasets must never share one
    source: str
    classes: list[str]
    splits: dict[str, Split] = field(default_factory=dict)  # train, val, test, then others
    video: FrameSampling | None = None  # how clips become frames; None: an image dataset
    val_from_train: bool = False  # val was held out of train (--val-fraction), not given


def stratified_pick(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` indices spread evenly over classes (round-robin over shuffled classes), sorted."""
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    picked: list[int] = []
    depth = 0
    while len(picked) < count:
        row = [idx[depth] for idx in per_class if depth < len(idx)]
        if not row:
            break
        picked.extend(row[: count - len(picked)])
        depth += 1
    return np.sort(np.array(picked, dtype=np.int64))


def stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (rest, held_out) with `fraction` of every class held out."""
    held = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        held.extend(idx[:k])
    held_out = np.sort(np.array(held, dtype=np.int64))
    rest = np.setdiff1d(np.arange(len(labels)), held_out)
    return rest, held_out


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, the way a person would expect it to look.

    16-bit and 32-bit grayscale are rescaled (PIL's own convert clips them to white);
    transparency is composited over white (convert would expose whatever colour the
    transparent pixels happen to hold); CMYK, palette and grayscale convert as usual.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if img.mode.startswith("I;16") else (float(arr.min()), float(arr.max()))
        arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")
