"""Shared by the benchmark scripts: the backbone to measure and where results go."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import torch

# BENCH_RESULTS (set by `make bench QUICK=1`) keeps quick figures apart from the full ones
RESULTS = Path(os.environ.get("BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
WORK = Path(__file__).resolve().parent / "work"  # git-ignored: stores, images, runs
DINOV2_FILE = Path(__file__).resolve().parents[2] / "shared" / "weights" / \
    "vit_small_patch14_dinov2.imgfocus.safetensors"


def scratch() -> tempfile.TemporaryDirectory:
    """A temporary folder on the repository's disk (not a tmpfs /tmp), under the ignored
    work/ folder, so that what a killed run leaves behind is never committed."""
    WORK.mkdir(exist_ok=True)
    return tempfile.TemporaryDirectory(dir=WORK)


def backbone_args(weights: Path | None, model: str | None = None) -> dict:
    """Real DINOv2 ViT-S/14 weights when the file is there, else a random-init ViT-S; or
    `model` (random init unless `weights`: a GPU machine that cannot download can still
    time a ViT-B or ViT-L)."""
    if model:
        return {"model": model, "weights": weights} if weights else {"model": model, "random_init": True}
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


def bar_chart(name: str, labels: list[str], values: list[float], ylabel: str, title: str,
              target: float | None = None) -> Path:
    """benchmarks/results/<name>.png: one bar per measured ratio, the issue's target dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 2), 3.4))
    ax.bar(labels, values, color="#4c72b0")
    for x, v in enumerate(values):
        ax.annotate(f"{v:.2g}", (x, v), ha="center", va="bottom", fontsize=8)
    if target is not None:
        ax.axhline(target, ls="--", color="#c44e52", label=f"target {target:g}")
        ax.legend(fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
