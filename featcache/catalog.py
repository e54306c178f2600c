"""`featcache ls`: the stores under a folder, one line each."""

from __future__ import annotations

import json
from pathlib import Path

from .store import ATTR, disk_usage

MAX_DEPTH = 4  # cache roots are shallow: <root>/<dataset>/ or <root>/<user>/<dataset>/


def find_stores(root: Path) -> list[dict]:
    """Every featcache store at or below `root` (not looking inside stores)."""
    found = []

    def walk(d: Path, depth: int) -> None:
        meta_file = d / "zarr.json"
        if meta_file.is_file():
            try:
                meta = json.loads(meta_file.read_text()).get("attributes", {}).get(ATTR)
            except (OSError, ValueError):
                meta = None
            if meta:
                found.append(_summary(d, meta))
                return
        if depth < MAX_DEPTH:
            try:
                children = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:  # an unreadable folder in a shared cache root: skip it
                return
            for child in children:
                walk(child, depth + 1)

    walk(Path(root), 0)
    return found


def _summary(path: Path, meta: dict) -> dict:
    splits = {}
    for name in meta.get("splits", []):
        try:
            splits[name] = json.loads((path / name / "zarr.json").read_text())["attributes"][ATTR]["n"]
        except (OSError, ValueError, KeyError):
            splits[name] = None
    return {"path": str(path), "model": meta["model"]["name"], "dataset": meta["dataset"]["name"],
            "splits": splits, "dtype": meta["dtype"], "taps": len(meta["taps"]),
            "bytes_on_disk": disk_usage(path), "complete": bool(meta.get("complete")),
            "content_key": meta.get("content_key")}
