"""A CSV or JSON-lines manifest: one image per row with `path`, `label` and optional `split`.

Rows of video files make a video dataset; they may also give `start` and `end` (seconds) to
take one segment of a longer video, as Kinetics and Something-Something ship them.

Paths are relative to --data-root (default: the manifest's folder). Labels are class
names or integers. `split` is train, val or test (or another name: a split that only
`sidetrain eval` reads; validation, Train, ... are read as ours) on every row or on none;
without val, open_dataset holds one out of train. A missing file is not an error here: like any unreadable input it is
skipped and recorded by the extractor. A row without a usable label is an error.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from ..console import note
from ..errors import UserError
from .base import SPLIT_NAMES, Dataset, FileSplit, our_split_name
from .video import VIDEO_SUFFIXES, FrameSampling, VideoSplit


def _rows(path: Path) -> list[dict]:
    if path.suffix.lower() == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise UserError(f"{path}:{n}: not a JSON object: {line[:80]}") from None
        return rows
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _splits(path: Path, rows: list[dict], first: int) -> dict[str, list[int]]:
    """Row indices per split, in sorted order (--limit and --per-class draw from one seeded
    generator split after split: this order fixes what stores made before hold); all rows
    are train when the manifest names no splits. Other tools' names for train, val and test
    (validation, Train, ...) are read as ours, and said so, also beside ours."""
    names = [str(r.get("split") or "").strip() for r in rows]
    if not any(names):
        return {"train": list(range(len(rows)))}
    if not all(names):
        n = names.index("")
        raise UserError(f"{path} row {n + first}: no split, while other rows name one; give "
                        f"every row a split ({', '.join(SPLIT_NAMES)}) or none (then "
                        "--val-fraction of train is held out as val).")
    ours = {name: our_split_name(name) for name in set(names)}
    renamed = sorted(f"'{a}' as '{b}'" for a, b in ours.items() if a != b)
    if renamed:  # 'Train' beside 'train' is one split spelt two ways: merged, and said so
        note(f"{path}: split {', '.join(renamed)}.")
    names = [ours[name] for name in names]
    return {s: [i for i, name in enumerate(names) if name == s] for s in sorted(set(names))}


def _seconds(path: Path, n: int, value) -> float | None:
    if value in (None, ""):
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise UserError(f"{path} row {n}: start/end must be seconds, not {value!r}")
    return seconds


def open_manifest(path: Path, data_root: Path | None, video: FrameSampling = FrameSampling()) -> Dataset:
    """The manifest as a Dataset, split as its `split` column says (all train without one)."""
    rows = _rows(path)
    if not rows:
        raise UserError(f"{path} has no rows")
    if "path" not in rows[0] or "label" not in rows[0]:
        raise UserError(f"{path} must have the columns path and label (and optionally split); "
                        f"it has {sorted(rows[0])}")
    first = 2 if path.suffix.lower() == ".csv" else 1  # the file's line of rows[0]
    for n, r in enumerate(rows, first):
        if r.get("label") in (None, "") or not r.get("path"):
            raise UserError(f"{path} row {n}: missing path or label: {r}")
    names = [str(r["label"]).strip() for r in rows]
    if all(n.lstrip("-").isdigit() for n in names):
        ints = [int(n) for n in names]
        if min(ints) < 0:
            raise UserError(f"{path}: integer labels must be 0 or more")
        classes = [str(i) for i in range(max(ints) + 1)]
        labels = np.array(ints)
    else:
        classes = sorted(set(names))
        labels = np.array([classes.index(n) for n in names])
    root = (data_root or path.parent).resolve()
    is_video = [Path(str(r["path"])).suffix.lower() in VIDEO_SUFFIXES for r in rows]
    if any(is_video) and not all(is_video):
        n = is_video.index(not is_video[0]) + first
        raise UserError(f"{path} mixes images and videos (row {n}); one manifest holds one kind.")
    spans = [(_seconds(path, n, r.get("start")), _seconds(path, n, r.get("end")))
             for n, r in enumerate(rows, first)]
    for n, (start, end) in enumerate(spans, first):
        if all(is_video) and ((start or 0) < 0 or end is not None and end <= (start or 0)):
            raise UserError(f"{path} row {n}: the clip runs from start {start} s to end {end} s: "
                            "start must be 0 or more, and end after it.")
    # the root too when named: the same manifest then reads other files
    source = f"manifest:{path.resolve()}" + (f" under {root}" if data_root else "")
    ds = Dataset(name=path.stem, source=source, classes=classes,
                 video=video if all(is_video) else None)
    for split, idx in _splits(path, rows, first).items():
        paths = [str(rows[i]["path"]) for i in idx]
        ds.splits[split] = (VideoSplit(root, paths, labels[idx], video, [spans[i] for i in idx])
                            if ds.video else FileSplit(root, paths, labels[idx]))
    return ds
