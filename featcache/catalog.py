"""`featcache ls`: the stores under a folder or a bucket prefix, one line each."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .console import note
from .errors import UserError
from .location import Location, filesystem, is_url, join, normalize, read_json
from .lock import writer
from .store import ATTR, disk_usage, is_partial_layout, open_store, root_meta

MAX_DEPTH = 4  # cache roots are shallow: <root>/<dataset>/ or <root>/<user>/<dataset>/


def find_stores(root: Location, health: bool = True) -> list[dict]:
    """Every featcache store at or below `root` (not looking inside stores). `health`: check
    each local store as `featcache info` does (see _health); without it, only the root's
    word is taken (a twin search checks the one store it picks)."""
    root = normalize(root)
    if is_url(root):
        return _find_remote(root)
    found = []

    def walk(d: Path, depth: int) -> None:
        meta_file = d / "zarr.json"
        try:
            if meta_file.is_file():  # a zarr node: a store, or not ours; never looked inside
                try:
                    meta = root_meta(json.loads(meta_file.read_text()))
                except ValueError:
                    meta = None
                if meta:  # (a link: what a reused twin leaves at --out; its bytes are the target's)
                    found.append(_summary(d, meta, os.readlink(d) if d.is_symlink() else None, health))
                elif is_partial_layout(d):
                    note(f"{d}: a store whose layout was begun and not finished (stopped, or at "
                         "it now; rerun the `featcache extract` command that began it): left out.")
                return
            entries = list(d.iterdir()) if depth < MAX_DEPTH else []
            children = sorted(p for p in entries if p.is_dir() and not p.name.startswith("."))
            dangling = [p for p in entries if p.is_symlink() and not p.exists()]
        except OSError as e:  # a colleague's private folder in a shared cache root
            note(f"{d}: cannot be read ({(e.strerror or str(e)).lower()}): left out.")
            return
        for child in children:
            walk(child, depth + 1)
        for link in dangling:  # (a reused twin's link at --out, the twin deleted since)
            note(f"{link}: a link to {os.readlink(link)}, which no longer exists: left out.")

    walk(root, 0)
    return found


def _find_remote(root: str) -> list[dict]:
    """The same walk over an object store's prefixes."""
    fs, base = filesystem(root)
    protocol = root.split("://", 1)[0]
    found = []

    def walk(path: str, depth: int) -> None:
        try:
            node = json.loads(fs.cat_file(f"{path}/zarr.json"))
        except FileNotFoundError:  # not a zarr node: look inside
            node = None
        except ValueError:  # a zarr.json that is not JSON: not ours
            return
        if node is not None:
            meta = root_meta(node)
            if meta:
                found.append(_summary(f"{protocol}://{path}", meta))
            return
        if depth < MAX_DEPTH:
            children = sorted(e["name"] for e in fs.ls(path, detail=True)
                              if e["type"] == "directory" and not e["name"].rsplit("/", 1)[-1].startswith("."))
            for child in children:
                walk(child, depth + 1)

    try:
        walk(base.rstrip("/"), 0)
    except UserError:
        raise
    except Exception as e:  # no such bucket, no credentials, no network: botocore's are not OSError
        raise UserError(f"cannot list {root}: {type(e).__name__}: {e}") from None
    return found


def _summary(path: Location, meta: dict, link: str | None = None, health: bool = False) -> dict:
    splits, unreadable = {}, {}  # samples per split; the inputs among them that could not be read
    for name in meta.get("splits", []):
        try:
            attrs = read_json(join(path, name, "zarr.json"))["attributes"][ATTR]
            splits[name], unreadable[name] = attrs["n"], len(attrs.get("skipped", {}))
        except (OSError, ValueError, KeyError):
            splits[name] = unreadable[name] = None
    layout = meta["layout"]
    summary = {"path": str(path), "model": meta["model"]["name"], "weights": meta["weights"]["source"],
                "img_size": meta["transform"]["input_size"][-1],
                "frames": layout["frames"] if "video" in meta["transform"] else None,
                "sampling": meta["transform"].get("video"),  # (video stores: frames, sampling, fps)
                "dataset": meta["dataset"]["name"], "classes": len(meta["classes"]),
                "splits": splits, "unreadable_inputs": unreadable, "dtype": meta["dtype"], "precision": meta.get("precision", "fp32"),
                "taps": len(meta["taps"]),
                "bytes_on_disk": 0 if link else disk_usage(path), "content_key": meta.get("content_key"),
                "link": link}
    complete, lost, damaged = _health(path, meta) if health and not link else (bool(meta.get("complete")), {}, None)
    return {**summary, "complete": complete, "lost_shards": lost, "damaged": damaged,
            "writer": None if complete or link or is_url(path) else writer(path)}


def _health(path: Location, meta: dict) -> tuple[bool, dict[str, list[int]], str | None]:
    """(complete, per split the finished shards whose files are gone, what else is wrong),
    as `featcache info` and training see the store: a listing never calls complete a store
    that training would refuse. Local stores only, one stat per array and shard (a bucket's
    store says what its root says; `featcache verify` reads it all)."""
    if is_url(path):
        return bool(meta.get("complete")), {}, None
    try:
        store = open_store(path)
        splits = [store.split(name) for name in store.splits]  # (each read once)
        lost = {s.name: gone for s in splits if (gone := s.lost_shards(path))}
        return bool(meta.get("complete")) and all(s.complete for s in splits) and not lost, lost, None
    except PermissionError:  # a colleague's store that is not ours to read inside: its root's word
        return bool(meta.get("complete")), {}, None
    except UserError as e:  # (a part's zarr.json gone, say; open_store words a permission error so)
        if isinstance(e.__context__, PermissionError):
            return bool(meta.get("complete")), {}, None
        return False, {}, str(e)
    except Exception as e:  # a chunk that does not decode: a listing goes on
        return False, {}, f"unreadable: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
