"""ImageFolder layout: one folder per class, optionally under train/ val/ test/ folders.

The same layout of video files (Kinetics-style class folders of clips) is a video dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..console import note
from ..errors import UserError
from .base import SPLIT_ALIASES, SPLIT_NAMES, Dataset, FileSplit, our_split_name, split_order
from .video import VIDEO_SUFFIXES, FrameSampling, VideoSplit

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _class_dirs(folder: Path) -> list[str]:
    """The folders under `folder`, less hidden ones and stores (zarr.json): a store
    extracted into its own dataset's folder is no class of it when extract runs again."""
    return sorted(d.name for d in folder.iterdir()
                  if d.is_dir() and not d.name.startswith(".") and not (d / "zarr.json").exists())


def _scan(root: Path, folder: Path, classes: list[str], suffixes: set[str]
          ) -> tuple[list[str], np.ndarray]:
    keys, labels = [], []
    for label, name in enumerate(classes):
        cdir = folder / name
        if not cdir.is_dir():
            continue
        for p in sorted(cdir.rglob("*")):
            if p.suffix.lower() in suffixes and p.is_file():
                keys.append(p.relative_to(root).as_posix())
                labels.append(label)
    return keys, np.array(labels, dtype=np.int64)


def _split_folders(root: Path) -> dict[str, Path]:
    """The split level's folders by our split name (train/, Valid/, testing/ ...), or {}
    where the top level holds the classes: it is a split level when it has a train folder,
    or when every folder is named as a split (test/ alone: an evaluation set); else classes
    named test or dev stay classes. A folder beside the splits is left out, and said."""
    top = _class_dirs(root)
    splits: dict[str, list[str]] = {}
    for name in top:
        if our_split_name(name) in SPLIT_NAMES:
            splits.setdefault(our_split_name(name), []).append(name)
    if "train" not in splits and sum(map(len, splits.values())) < len(top):
        return {}
    twice = {s: names for s, names in splits.items() if len(names) > 1}
    if twice:
        s, names = next(iter(twice.items()))
        raise UserError(f"{root} has {len(names)} folders for the {s} split ({', '.join(names)}): "
                        "merge them or move one out.")
    renamed = sorted(f"{names[0]}/ as {s}" for s, names in splits.items() if names[0] != s)
    if renamed:
        note(f"{root}: split folder(s) {', '.join(renamed)}.")
    others = [name for name in top if our_split_name(name) not in SPLIT_NAMES]
    if others:
        note(f"{root}: {', '.join(f'{o}/' for o in others[:5])}{' ...' if len(others) > 5 else ''} "
             f"beside the split folders {'is' if len(others) == 1 else 'are'} not a split "
             f"({', '.join(SPLIT_NAMES)}, or {', '.join(SPLIT_ALIASES)}): left out.")
    return {s: root / names[0] for s, names in sorted(splits.items(), key=lambda kv: split_order(kv[0]))}


def open_imagefolder(root: Path, video: FrameSampling = FrameSampling()) -> Dataset:
    """Read a class-per-folder tree of images (or of videos, sampled by `video`) with its
    train/val/test level if it has one (other tools' names too: Validation, testing ...);
    without one, every file is in train."""
    root = root.resolve()
    folders = _split_folders(root)
    if folders:  # the classes: train's, or, without a train split, all that the splits hold
        classes = _class_dirs(folders["train"]) if "train" in folders else sorted(
            {c for f in folders.values() for c in _class_dirs(f)})
    else:
        classes = _class_dirs(root)
        folders = {"train": root}
    if not classes:
        raise UserError(f"{root} has no class folders: expected ImageFolder layout "
                        "(root/<class>/<image>, optionally root/train/<class>/<image>).")
    found = {}
    for split, folder in folders.items():
        extra = set(_class_dirs(folder)) - set(classes)
        if extra:
            raise UserError(f"{folder} has classes not in {folders['train']}: {sorted(extra)[:5]}")
        found[split] = _scan(root, folder, classes, IMAGE_SUFFIXES | VIDEO_SUFFIXES)
        if not found[split][0]:
            raise UserError(f"no images or videos found under {folder} (suffixes: "
                            f"{', '.join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))}).")
    keys = [k for split_keys, _ in found.values() for k in split_keys]
    videos = [k for k in keys if Path(k).suffix.lower() in VIDEO_SUFFIXES]
    if 0 < len(videos) < len(keys):
        images = [k for k in keys if Path(k).suffix.lower() not in VIDEO_SUFFIXES]
        fewer = min(images, videos, key=len)  # the strays, most likely
        raise UserError(f"{root} mixes {len(images)} image(s) and {len(videos)} video(s) (e.g. "
                        f"{', '.join(fewer[:3])}); a dataset holds one kind: move the others out.")
    kind = "video" if videos else "image"
    ds = Dataset(name=root.name, source=f"{kind}folder:{root}", classes=classes,
                 video=video if videos else None)
    for split, (keys, labels) in found.items():
        ds.splits[split] = (VideoSplit(root, keys, labels, video) if videos
                            else FileSplit(root, keys, labels))
    return ds
