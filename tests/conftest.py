"""Shared fixtures: tiny images and tiny stores, made on the fly (no network, no big files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featcache import ExtractConfig, extract

TINY = dict(model="vit_tiny", random_init=True, img_size=32, workers=0, batch_size=4)


def make_image_folder(root: Path, classes: int = 3, per_class: int = 6, size: int = 40,
                      seed: int = 0) -> Path:
    """Class c = a bright square at a class-specific place on noise: learnable, varied."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
            o = 4 + c * (size - 16) // max(classes - 1, 1)
            img[o:o + 12, o:o + 12] = 230
            Image.fromarray(img).save(root / f"class{c}" / f"img{i:02d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def fp32_store(tmp_path_factory) -> Path:
    """24 demo images per split, a random-init ViT-Ti at 32 px, every block, exact fp32,
    shards of 5 samples (the last one partial)."""
    out = tmp_path_factory.mktemp("stores") / "demo32"
    extract(ExtractConfig(dataset="demo", out=out, dtype="fp32", limit=24, shard_size=5, **TINY))
    return out
