"""Shared by the benchmark scripts: the backbone to measure and where results go."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DINOV2_FILE = Path(__file__).resolve().parents[2] / "shared" / "weights" / \
    "vit_small_patch14_dinov2.imgfocus.safetensors"


def backbone_args(weights: Path | None) -> dict:
    """Real DINOv2 ViT-S/14 weights when the file is there, else a random-init ViT-S."""
    weights = weights or (DINOV2_FILE if DINOV2_FILE.is_file() else None)
    if weights:
        return {"model": "dinov2_small", "weights": weights}
    return {"model": "vit_small", "random_init": True}


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path
