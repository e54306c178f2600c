"""Dataset readers. `open_dataset` turns a --dataset argument into named splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from .base import Dataset, Split, our_split_name, split_order, stratified_pick, stratified_split
from .demo import open_demo
from .idx import CLASSES as IDX_SETS
from .idx import open_idx
from .imagefolder import open_imagefolder
from .manifest import open_manifest
from .torchvision_sets import REGISTRY as TORCHVISION_SETS
from .torchvision_sets import open_torchvision
from .video import FrameSampling
from .vtab import open_vtab1k

__all__ = ["Dataset", "FrameSampling", "Split", "open_dataset", "KNOWN"]

KNOWN = sorted(set(IDX_SETS) | set(TORCHVISION_SETS))


def _source(spec: str, data_root: Path | None, download: bool, video: FrameSampling) -> Dataset:
    if spec == "demo":
        return open_demo()
    if spec.startswith("vtab1k:"):
        return open_vtab1k(spec.split(":", 1)[1], data_root)
    if spec in IDX_SETS:
        return open_idx(spec, _fetch_idx(spec, data_root) if download else data_root)
    if spec in TORCHVISION_SETS:
        return open_torchvision(spec, data_root, download)
    path = Path(spec).expanduser()
    if path.suffix.lower() in (".csv", ".jsonl") and not path.is_file():
        raise UserError(f"dataset not found: no manifest file {path}"
                        f"{'' if path.parent.is_dir() else f' (no folder {path.parent} either)'}.")
    if path.is_file() and path.suffix.lower() in (".csv", ".jsonl"):
        return open_manifest(path, data_root, video)
    if path.is_dir():
        return open_imagefolder(path, video)
    raise UserError(f"dataset not found: '{spec}' is not 'demo', a folder (ImageFolder layout: "
                    "<root>/<class>/<image or video>), a .csv/.jsonl manifest, vtab1k:<task>, or one of: "
                    f"{', '.join(KNOWN)}.")


def _fetch_idx(name: str, data_root: Path | None) -> Path:
    """Download an IDX dataset through torchvision (into <root>/<Name>/raw); return root."""
    import torchvision.datasets as tvd
    root = data_root or Path("data") / name
    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}[name]
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except (RuntimeError, OSError) as e:
        raise UserError(f"{name}: download failed ({e}); offline machines can point --data-root "
                        "at the IDX files.") from None
    return root


def open_dataset(spec: str | Path, seed: int = 0, val_fraction: float = 0.2, limit: int | None = None,
                 per_class: int | None = None, split: list[str] | None = None,
                 data_root: Path | None = None, download: bool = False,
                 video: FrameSampling = FrameSampling()) -> Dataset:
    """Resolve --dataset into named splits (train, val and usually test).

    A source without a val split gets one: a seeded stratified `val_fraction` of train, so
    the held-out split never depends on file order. `per_class` keeps at most N samples of
    each class and `limit` at most N samples per split (both class-balanced and seeded);
    `split` keeps only the named splits. `video` says how a video dataset's clips become
    frames (ignored for images).
    """
    ds = _source(str(spec), Path(data_root) if data_root else None, download, video)
    if "train" in ds.splits and "val" not in ds.splits:
        train, val = stratified_split(ds.splits["train"].labels, val_fraction, np.random.default_rng(seed))
        whole = ds.splits.pop("train")
        ds.splits = {"train": whole.subset(train), "val": whole.subset(val), **ds.splits}
        ds.val_from_train = True
    empty = [name for name, s in ds.splits.items() if len(s) == 0]
    if empty:
        raise UserError(f"{ds.name}: split(s) {', '.join(empty)} would be empty (too few images per "
                        "class to hold some out?); add images or raise --val-fraction.")
    rng = np.random.default_rng(seed)
    for name, cap in (("--per-class", per_class), ("--limit", limit)):
        if cap is not None and cap < 1:
            raise UserError(f"{name} must be at least 1")
    if per_class is not None:
        ds.splits = {k: s.subset(_per_class(s.labels, per_class, rng)) for k, s in ds.splits.items()}
    if limit is not None:
        ds.splits = {k: s.subset(stratified_pick(s.labels, limit, rng)) if len(s) > limit else s
                     for k, s in ds.splits.items()}
    if split:  # after the draws, which follow one another in the order a reader gave: a split
        # drawn with --split is the one drawn without it (as a store made without --split drew it)
        split = [our_split_name(s) for s in split]  # --split validation, as a manifest may say
        unknown = [s for s in split if s not in ds.splits]
        if unknown:
            raise UserError(f"--split {','.join(unknown)}: {ds.name} has splits {', '.join(ds.splits)}")
        ds.splits = {s: ds.splits[s] for s in split}
    # train, val, test, then others (int8 calibrates on the first)
    ds.splits = {k: ds.splits[k] for k in sorted(ds.splits, key=split_order)}
    return ds


def _per_class(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n]
                                   for c in np.unique(labels)]))
