"""Which store a run writes: the one at --out when it was made the same way (a resume),
an identical complete store beside it (reused, nothing written), or a new one.

A store's settings are its root attributes that define its contents; its content key is
a hash of what it holds however it was batched, so that a lab finds a twin by listing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .catalog import find_stores
from .errors import UserError
from .location import Location, exists, is_url, join, listing, normalize, parent
from .models import Backbone
from .plan import StorePlan
from .sources import Dataset
from .sources.base import split_order
from .store import Store, add_splits, create_store, is_partial_layout, open_store, shard_size_for


def content_key(settings: dict, ds: Dataset, kept: dict[str, str] | None = None,
                calibrated_on: str | None = None) -> str:
    """What a store holds, however it was batched: model, weights hash, transform, taps,
    layout, dtype, precision, video decoding, classes, each split's inputs (keys and
    labels) and where those lie. The place counts because keys and labels do not identify
    the images: a resized or edited copy of a dataset elsewhere keeps both, and was once
    handed the original's store. `kept`: the fingerprints of splits a store holds beside
    `ds`'s (a split added later), so that it keys as one extraction of them all would;
    `calibrated_on`: the split an int8 store's scale came from, when one extraction of them
    all would have calibrated on another (it takes the first split)."""
    what = {k: settings[k] for k in ("transform", "taps", "layout", "dtype", "classes")}
    splits = {**(kept or {}), **{name: s.fingerprint() for name, s in ds.splits.items()}}
    what |= {"model": settings["model"]["name"], "weights": settings["weights"]["sha256"],
             "source": ds.source, "splits": splits}
    if calibrated_on is not None and calibrated_on != min(splits, key=split_order):
        what["calibrated_on"] = calibrated_on
    if settings["precision"] != "fp32":  # (stores from before --precision keep their key)
        what["precision"] = settings["precision"]
    if settings["dataset"].get("decoder") not in (None, "decord"):  # (nor video stores from before auto)
        what["decoder"] = settings["dataset"]["decoder"]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def link(out: Location, twin: Location) -> bool:
    """Make a local --out a relative symlink to the twin that serves it, so that `extract
    --out X` then `fit --cache X` works whichever store holds the tokens; False where that
    cannot be (a bucket, a name already taken, a file system without links)."""
    if is_url(out) or is_url(twin) or os.path.lexists(out):
        return False
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.symlink_to(os.path.relpath(Path(twin).resolve(), out.parent.resolve()), target_is_directory=True)
    except OSError:
        return False
    return True


def drop_link(out: Location, reuse: bool) -> str | None:
    """Remove a link at a local --out (what `link` leaves) that points nowhere now, or that
    --no-reuse asks to replace with a store of its own; say what was removed, or None."""
    if is_url(out) or not Path(out).is_symlink():
        return None
    target, gone = os.readlink(out), not Path(out).exists()
    if not gone and reuse:
        return None
    Path(out).unlink()
    return (f"{out} was a link to {target}{', which no longer exists' if gone else ' (--no-reuse)'}: "
            f"removed, and {out} is extracted anew.")


def identical_store(out: Location, key: str, usable: Callable[[Location], bool] = lambda _: True
                    ) -> Location | None:
    """A complete store with this content key elsewhere under out's parent folder (or
    prefix), the first one that is `usable`."""
    if not exists(parent(out)):
        return None
    here = out if is_url(out) else Path(out).resolve()
    for s in find_stores(parent(out), health=False):
        there = normalize(s["path"])
        if s["complete"] and not s.get("link") and s.get("content_key") == key and (
                there if is_url(there) else Path(there).resolve()) != here and usable(there):
            return there
    return None


def differences(store: Store, settings: dict, ds: Dataset) -> list[str]:
    """Why `store` cannot be resumed by a run with these settings (empty when it can)."""
    hints = {"batch_size": " (leave --batch-size out to resume with the store's)"}
    diffs = [f"{k}: store has {was!r}, this run {now!r}{hints.get(k.split('.')[0], '')}"
             for key, v in settings.items()
             # content_key is derived from these settings and the dataset's source, which a
             # resume only notes (a dataset moved between runs); older stores lack the key
             if key not in ("dataset", "weights", "content_key", "precision", "device")
             for k, was, now in _changed(key, store.meta.get(key), v)]
    if store.precision != settings["precision"]:
        diffs.append(f"precision: store has {store.precision!r}, this run {settings['precision']!r}")
    was, now = store.meta["dataset"].get("decoder"), settings["dataset"].get("decoder")
    if was != now:  # (decoders may give other frames: a store holds one decoding)
        diffs.append(f"video decoder: store read its clips with {was!r}, this run {now!r} "
                     f"(FEATCACHE_VIDEO_DECODER={was} continues it alike)")
    if store.meta["weights"]["sha256"] != settings["weights"]["sha256"]:
        diffs.append(f"weights: store has sha256 {store.meta['weights']['sha256'][:12]}..., "
                     f"this run {settings['weights']['sha256'][:12]}...")
    new = [name for name in ds.splits if name not in store.splits]
    if new and store.meta["dataset"]["source"] != settings["dataset"]["source"] and not set(store.splits) & set(ds.splits):
        # (a moved dataset is known by the splits it shares with the store, checked below)
        diffs.append(f"splits: this run would add {', '.join(new)} from {settings['dataset']['source']} to a "
                     f"store made from {store.meta['dataset']['source']}, and names none of the splits the "
                     "store holds to show it is the same dataset: run it without --split, or with "
                     f"--dataset {store.meta['dataset']['source'].split(':', 1)[-1]}")
    for name in set(store.splits) & set(ds.splits):
        if store.split(name).attrs["fingerprint"] != ds.splits[name].fingerprint():
            diffs.append(f"split {name}: different inputs (keys or labels) than the store's (with --limit "
                         "and --per-class together, a split the dataset gained since draws other subsets "
                         "of the others)")
    return diffs


def _changed(key: str, was: object, now: object) -> list[tuple[str, object, object]]:
    """(name, stored, this run's) for each value that differs, naming the entries of a
    dict (transform.input_size, not the whole transform)."""
    if isinstance(was, dict) and isinstance(now, dict):
        return [(f"{key}.{k}", was.get(k), now.get(k)) for k in sorted(was.keys() | now.keys(), key=str)
                if was.get(k) != now.get(k)]
    return [] if was == now else [(key, was, now)]


def stored_batch_size(out: Location) -> int | None:
    """The batch size of the store at `out`, if one is there: a resume keeps it by default
    (batch composition changes a forward's low bits, so a resume must batch alike)."""
    if not exists(join(out, "zarr.json")) or is_partial_layout(out):
        return None
    return open_store(out).meta.get("batch_size")  # (absent in the earliest stores)


def existing_store(out: Location, settings: dict, ds: Dataset, shard_size: int | None, mode: str = "r"
                   ) -> tuple[Store | None, list[str]]:
    """The store at `out` when this run may continue it (None when there is none, or only a
    layout of ours interrupted half-way), with notes for the user on what the resume keeps
    of the store rather than of this run; refused when it was made otherwise, or when `out`
    holds something else."""
    if not exists(join(out, "zarr.json")):
        # laying out a store replaces whatever lies under its split names: never over other
        # data (a layout of ours interrupted half-way, with its zarr.json, is simply redone)
        if any(not name.startswith(".featcache.") for name in listing(out)):  # our lock files
            raise UserError(f"{out} exists, is not empty and is not a featcache store; choose "
                            "another --out.")
        return None, []
    if is_partial_layout(out):
        return None, []
    store = open_store(out, mode=mode)
    diffs = differences(store, settings, ds)
    if diffs:  # an --out named for what differs: the model, the image size, the dtype
        meta, model, size = store.meta, settings["model"]["name"], settings["transform"]["input_size"]
        parts = ([model.split(".")[0]] if meta["model"]["name"] != model else []) + (
            [f"{size[-1]}px"] if meta["transform"].get("input_size") != size else []) + (
            [settings["dtype"]] if meta["dtype"] != settings["dtype"] else [])
        other = f" (e.g. --out {out}-{'-'.join(parts)})" if parts else ""
        raise UserError(f"{out} already holds a store made with other settings; use another "
                        f"--out{other} or delete it. Differences: " + "; ".join(diffs))
    notes = []
    new = {name: len(s) for name, s in ds.splits.items() if name not in store.splits}
    if new and not is_url(out) and Path(out).is_symlink():
        raise UserError(f"{out} is a link to {os.readlink(out)}, a store reused from elsewhere: adding "
                        f"{', '.join(new)} would write into that store. Pass --out {Path(out).resolve()} "
                        "if it is yours to extend, or --no-reuse to extract a store of your own here.")
    if new:
        notes.append(f"{out} holds {', '.join(store.splits)}; this run adds "
                     + " and ".join(f"{name} ({n:,} samples)" for name, n in new.items())
                     + ", and leaves the splits it holds as they are.")
    if store.meta["dataset"]["source"] != settings["dataset"]["source"]:
        notes.append(f"{out} was made from {store.meta['dataset']['source']}; this run reads "
                     f"{settings['dataset']['source']} (same keys and labels).")
    if shard_size and shard_size != store.meta["shard_size"]:
        notes.append(f"{out} keeps its shard size {store.meta['shard_size']}"
                     + (" for the splits it holds; those it adds take --shard-size." if new else "."))
    return store, notes


def open_or_create(out: Location, settings: dict, ds: Dataset, backbone: Backbone, plan: StorePlan,
                   shard_size: int | None, calibration: Callable[[], np.ndarray | None],
                   digests: dict[str, dict[str, str]]) -> tuple[Store, list[str]]:
    """The existing store at `out`, opened for writing, when this run may continue it (see
    existing_store, and its notes), with the splits of `ds` it lacks laid out; else a new
    one. Either records `digests` (input_digests) of the splits it lays out."""
    store, notes = existing_store(out, settings, ds, shard_size, mode="r+")
    if store is not None:
        new = {name: (len(s), s.fingerprint()) for name, s in ds.splits.items() if name not in store.splits}
        if new:
            kept = {name: store.split(name).attrs["fingerprint"] for name in store.splits}
            calibrated_on = store.splits[0] if store.dtype == "int8" else None  # (create_store: the first)
            shards = {name: shard_size or shard_size_for(plan.bytes_per_sample, n) for name, (n, _) in new.items()}
            add_splits(store, new, shards, {
                "content_key": content_key(settings, ds, kept, calibrated_on),
                "dataset": settings["dataset"],  # (where the splits are now, a moved dataset's too)
                "input_digests": {**store.meta.get("input_digests", {}),
                                  **{k: v for k, v in digests.items() if k in new}}})
        return store, notes
    splits = {name: (len(s), s.fingerprint()) for name, s in ds.splits.items()}
    shard = shard_size or shard_size_for(plan.bytes_per_sample, max(n for n, _ in splits.values()))
    meta = {**settings, "input_digests": digests}  # (not a setting: never compared)
    return create_store(out, meta, splits, backbone.final_norms(), shard, calibration()), []
