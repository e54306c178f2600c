"""Shared fixtures: tiny images and tiny stores, made on the fly (no network, no big files)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featcache import ExtractConfig, extract

TINY = dict(model="vit_tiny", random_init=True, img_size=32, workers=0, batch_size=4)
# `--device auto` would take a GPU where there is one: the suite checks what CI checks, on the
# CPU (subprocesses and dask workers inherit this; FEATCACHE_DEVICE=cuda runs it on a GPU),
# and test_cuda.py names cuda itself
os.environ.setdefault("FEATCACHE_DEVICE", "cpu")
# the threads torch takes anyway, said: a crowded CI machine then gets no note (precision.py)
# in the output that tests compare
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run a command as its entry point does, in this process (a subprocess spends 5 s
    importing torch): run_cli("sidetrain", "eval", ...) -> CompletedProcess with the exit
    status and what went to stdout and stderr. Any exception but an exit fails the test."""
    from rich.console import Console

    from featcache_cli import featcache, sidetrain
    from featcache_cli.common import run

    for module in (featcache, sidetrain):  # plain text, whatever the terminal was at import
        monkeypatch.setattr(module, "out", Console(color_system=None, highlight=False))

    def call(*argv: str) -> subprocess.CompletedProcess:
        capsys.readouterr()  # what came before is not this command's
        monkeypatch.setattr(sys, "argv", list(argv))
        try:
            run({"featcache": featcache.app, "sidetrain": sidetrain.app}[argv[0]])
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out = capsys.readouterr()
        return subprocess.CompletedProcess(list(argv), code, out.out, out.err)
    return call


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


def assert_predict_equals_cached(run: Path, store_path: Path, files: list[Path], device: str = "cpu",
                                 atol: float = 1e-4) -> None:
    """`sidetrain predict` on the raw files of the store's val split (in its order) gives
    the classes and probabilities that the run's adapter gives on the stored tokens (the
    likeliest two)."""
    import json

    import torch
    from safetensors.torch import load_file

    from featcache import open_store
    from sidetrain import ModelSpec, build_classifier, predict

    store = open_store(store_path)
    preds = predict(run, files, device=device, top=2)
    config = json.loads((run / "config.json").read_text())
    model = build_classifier(ModelSpec(**{k: v for k, v in config.items()
                                          if k in ModelSpec.__dataclass_fields__}), store, seed=0)
    model.load_state_dict(load_file(str(run / "adapter.safetensors")))
    with torch.no_grad():
        cached = model.eval()(torch.from_numpy(store.split("val").tokens[:])).softmax(1)
    probs, labels = cached.topk(2)
    assert [p["label"] for p in preds] == labels[:, 0].tolist()
    np.testing.assert_allclose([p["prob"] for p in preds], probs[:, 0].numpy(), atol=atol)
    for p, cached_p, best in zip(preds, cached, probs):  # (a near-tie for second may go either way)
        np.testing.assert_allclose([c["prob"] for c in p["top"]], best.numpy(), atol=atol)
        np.testing.assert_allclose([cached_p[c["label"]] for c in p["top"]], best.numpy(), atol=atol)
