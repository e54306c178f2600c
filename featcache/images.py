"""The extraction's inputs as tensors: decoded and transformed in DataLoader workers.

An input that cannot be read becomes a reason, never an exception: one corrupt JPEG
among a million must not stop a run (the store records it as skipped).
"""

from __future__ import annotations

import random

import numpy as np
import timm.data
import torch

from .sources import Split
from .sources.base import to_rgb

# --views: random 60-100 % crops and flips, no colour jitter (a crop can cut away what
# sets the label, so measure per task; docs/losa.md).
VIEW_POLICY = {"scale": (0.6, 1.0), "hflip": 0.5, "color_jitter": None}


class Images(torch.utils.data.Dataset):
    """Items are (split id, index); each yields (item, tensor or None, reason or "").

    A video sample is its frames, transformed one by one and stacked: (F, C, H, W).

    `transforms[k]` is split k's transform; a split listed in `augmented` gets a random one
    seeded by (seed, sample index), so its views are the same on every run and resume.
    """

    def __init__(self, splits: list[Split], transforms: list, augmented: set[int], seed: int):
        self.splits, self.transforms, self.augmented, self.seed = splits, transforms, augmented, seed

    def __len__(self) -> int:
        return sum(len(s) for s in self.splits)

    def __getitem__(self, item: tuple[int, int]):
        split, i = item
        if split in self.augmented:
            torch.manual_seed(self.seed * 1_000_003 + i)
            random.seed(self.seed * 1_000_003 + i)
        try:
            sample, transform = self.splits[split].open(i), self.transforms[split]
            if isinstance(sample, list):
                return item, torch.stack([transform(to_rgb(f)) for f in sample]), ""
            return item, transform(to_rgb(sample)), ""
        except Exception as e:  # any decoder failure: record it, never stop the run
            return item, None, f"{type(e).__name__}: {e}"


def make_images(splits: dict[str, Split], data_config: dict, augment: str | None, seed: int) -> Images:
    """The splits in their order, each with the model's eval transform, except `augment`
    (the train split under --views), which gets VIEW_POLICY's random views."""
    names = list(splits)
    plain = timm.data.create_transform(**data_config, is_training=False)
    augmented = {names.index(augment)} if augment in names else set()
    views = timm.data.create_transform(**data_config, is_training=True, **VIEW_POLICY) if augmented else None
    return Images(list(splits.values()), [views if k in augmented else plain for k in range(len(names))],
                  augmented, seed)


def repeat(split: Split, k: int) -> Split:
    """Each sample k times in a row (same key, same label): the slots of k augmented views."""
    return split.subset(np.repeat(np.arange(len(split)), k))


def collate(batch: list) -> tuple[list, torch.Tensor | None, np.ndarray, list[str]]:
    """(items, the readable ones' tensors stacked or None, which were readable, reasons)."""
    items = [b[0] for b in batch]
    ok = [b[1] is not None for b in batch]
    images = torch.stack([b[1] for b in batch if b[1] is not None]) if any(ok) else None
    return items, images, np.array(ok), [b[2] for b in batch]
