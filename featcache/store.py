"""The store, format version 1: a Zarr v3 group holding every tapped block's tokens.

    <root>/            attrs["featcache"]: format_version, model, weights, transform, taps,
                       layout, dtype, precision, classes, dataset, splits, id, content_key, ...
                       (every attribute: docs/store-format.md)
      backbone/        frozen pieces sidetrain needs: norm.weight/bias, fc_norm.weight/bias
      channel_scale    (L, D) float32, int8 stores only (see codec.py)
      <split>/         attrs["featcache"]: n, fingerprint, complete, skipped {key: reason}
        tokens (N, L, T, D)  float16 | float32 | uint16 (bf16 bits) | int8; shards of S
                             samples, inner chunks of 1 sample, crc32c on every chunk
        scales (N, L, T)     float32, int8 stores only
        labels (N,)          int64; -1 marks a sample that could not be read
        keys   (N,)          string: relative path or source id
        done   (ceil(N/S),)  bool: set only after that shard's tokens, labels, keys are written

docs/store-format.md describes it for readers without this package.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import json
import math
import numbers
import uuid
from dataclasses import dataclass
from functools import cached_property
from importlib.metadata import version
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from .errors import DAMAGED_REMEDY, UserError
from .fastread import checked_read
from .fastwrite import write_samples
from .layout import TokenLayout
from .location import Location, exists, is_url, join, listing, normalize, read_json, usage
from .lock import LOCK_NAME, meta_lock

FORMAT_VERSION = 1
ATTR = "featcache"
# how each --dtype is held in zarr (bf16 as its bits: zarr has no bfloat16)
STORAGE = {"fp16": "float16", "bf16": "uint16", "int8": "int8", "fp32": "float32"}
# what to do with damage that `featcache verify --repair` cannot mend (a split's own metadata)
REDO = "Copy it again from where it came (a copy cut short, most likely), or delete it and extract again."
SHARD_BYTES = 128 * 2**20  # aim for ~128 MiB shard files: few files, cheap to copy and sync


def shard_size_for(bytes_per_sample: int, n: int) -> int:
    return int(max(1, min(n, 1024, SHARD_BYTES // max(bytes_per_sample, 1))))


def versions() -> dict[str, str]:
    return {p: version(p) for p in ("featcache", "torch", "timm", "zarr")}


@dataclass
class SplitArrays:
    """One split opened for reading. `tokens` stays a lazy zarr array; the rest is small."""

    name: str
    tokens: zarr.Array
    scales: zarr.Array | None  # int8 only: one scale per token per layer
    labels: np.ndarray
    key_array: zarr.Array
    done: np.ndarray
    attrs: dict

    @cached_property
    def keys(self) -> np.ndarray:
        """Read on first use: strings cost the most to read (seconds for a million samples),
        and training, the loaders and most checks never need them."""
        return self.key_array[:]

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def shard_size(self) -> int:
        return int(self.tokens.shards[0])

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete")) and bool(self.done.all())

    def lost_shards(self, store_path: Location) -> list[int]:
        """The shards flagged done whose files are gone (a store damaged, or copied in part):
        zarr and the memory-mapped reader would read their samples as zeros and their labels
        as -1 (skipped). A shard of unreadable inputs alone needs only its keys (zarr writes no
        chunk that holds only the fill value). Local stores only (a bucket has no cheap way
        to ask; `featcache verify` reads it all)."""
        if is_url(store_path):
            return []
        s, skipped, recorded = self.shard_size, np.zeros(self.n, bool), set(self.attrs["skipped"])
        finished = self.done[np.arange(self.n) // s]
        for i in np.flatnonzero((self.labels < 0) & finished):  # (few: -1 is an unread input's label)
            skipped[i] = self.keys[i] in recorded
        dims = {"keys": 1, "labels": 1, "tokens": self.tokens.ndim}  # array: its chunk key's length
        if self.scales is not None:  # (int8)
            dims["scales"] = self.scales.ndim
        lost = []
        for k in np.flatnonzero(self.done):
            needed = ["keys"] if skipped[k * s:(k + 1) * s].all() else dims
            if not all(Path(store_path, self.name, a, "c", str(k), *["0"] * (dims[a] - 1)).is_file()
                       for a in needed):
                lost.append(int(k))
        return lost

    def check_intact(self, store_path: Location) -> None:
        """Refuse to read a split whose finished shards have lost their files."""
        lost = self.lost_shards(store_path)
        if lost:
            raise UserError(damaged(store_path, {self.name: lost}))

    def __repr__(self) -> str:  # (not the dataclass's: it would print every key and label)
        return (f"SplitArrays({self.name!r}: {self.n} samples, tokens {tuple(self.tokens.shape)} "
                f"{self.tokens.dtype}, {'complete' if self.complete else 'incomplete'})")


class Store:
    """A format-1 store opened for reading (and, by the extractor, for appending shards)."""

    def __init__(self, group: zarr.Group, path: str):
        self.group, self.path = group, path
        self.meta: dict = dict(group.attrs[ATTR])

    def __repr__(self) -> str:
        return (f"Store({str(self.path)!r}: {self.meta['model']['name']}, {len(self.taps)} taps, "
                f"{self.dtype}, {len(self.classes)} classes, splits {', '.join(self.splits)})")

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout.from_dict(self.meta["layout"])

    @property
    def taps(self) -> list[int]:
        return list(self.meta["taps"])

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    def split(self, name: str) -> SplitArrays:
        if name not in self.splits:
            raise UserError(f"store {self.path} has no split '{name}' (it has: "
                            f"{', '.join(self.splits)}).")
        try:
            g = self.group[name]
            arrays = {a: g[a] for a in ("tokens", "labels", "keys", "done")}
            flags = {}
            for a in ("labels", "done"):
                try:
                    flags[a] = arrays[a][:]
                except Exception as e:  # bytes that do not decode, or fail their checksum
                    raise UserError(f"store {self.path} is damaged: split '{name}' has a {a} chunk that "
                                    f"cannot be read ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}). "
                                    f"{REDO}") from None
            return SplitArrays(name=name, tokens=arrays["tokens"], scales=g.get("scales"), labels=flags["labels"],
                               key_array=arrays["keys"], done=flags["done"], attrs=dict(g.attrs[ATTR]))
        except KeyError as e:  # a node's zarr.json gone: zarr finds no such array or group
            what = str(e.args[0]).rsplit("/", 1)[-1]
            what = (f"its {what} array" if what in ("tokens", "scales", "labels", "keys", "done") else
                    "its attributes" if what == ATTR else "its group")
            raise UserError(f"store {self.path} is damaged: split '{name}' has lost {what} (a zarr.json "
                            f"is gone). {REDO}") from None

    def read_tokens(self, split: str, rows: int | slice | list[int] | np.ndarray = slice(None)) -> np.ndarray:
        """Tokens of some rows of a split as float32 ((n,) L, T, D), whatever the store's dtype.

        `split(name).tokens` holds them as stored: bf16 as uint16 bits, int8 as codes that
        need their scales (docs/store-format.md "dtypes"); this is that decoding, in numpy.
        (Rows of unreadable inputs, label -1, read as zeros; rows not written yet are refused.)"""
        if isinstance(rows, numbers.Integral):
            return self.read_tokens(split, [rows])[0]
        if split not in self.splits:
            self.split(split)  # (which says which splits there are)
        g = self.group[split]  # (not split(): it reads every label and key)
        if not isinstance(rows, slice):
            rows = np.asarray(rows, dtype=np.int64)  # ([] as well)
        take = (lambda a: a[rows]) if isinstance(rows, slice) else (lambda a: a.oindex[rows])
        picked = np.arange(*rows.indices(g["tokens"].shape[0])) if isinstance(rows, slice) else rows
        shards = np.unique(picked // g["tokens"].shards[0])
        unwritten = shards[~g["done"][:][shards]]
        if len(unwritten):  # they would read as zeros
            raise UserError(f"{self.path}: rows of split '{split}' in shard(s) "
                            f"{unwritten[:10].tolist()}{' ...' if len(unwritten) > 10 else ''} are "
                            "not written yet (the store is incomplete): rerun the `featcache "
                            "extract` command that made it, or ask for written rows only.")
        x = checked_read(g["tokens"], take)
        if self.dtype == "bf16":
            return (x.astype(np.uint32) << 16).view(np.float32)
        x = x.astype(np.float32, copy=False)
        if self.dtype == "int8":
            x *= checked_read(g["scales"], take)[..., None]  # (in the loader's order: the same float32 bits)
            x *= self.channel_scale[None, :, None, :]
        return x

    @property
    def dtype(self) -> str:
        return self.meta["dtype"]

    @property
    def precision(self) -> str:
        """The backbone's compute precision; stores made before it was recorded ran fp32."""
        return self.meta.get("precision", "fp32")

    @property
    def channel_scale(self) -> np.ndarray | None:
        """int8 stores: the per-layer, per-channel calibration scale (L, D)."""
        return self.group["channel_scale"][:] if self.dtype == "int8" else None

    def norms(self) -> dict[str, dict]:
        """The backbone's frozen final norms, in the form `Backbone.final_norms` returns."""
        g = self.group["backbone"]
        out = {}
        for name, spec in g.attrs[ATTR].items():
            out[name] = dict(spec)
            if spec["type"] == "layernorm":
                out[name]["weight"] = g[f"{name}.weight"][:]
                out[name]["bias"] = g[f"{name}.bias"][:]
        return out

    @property
    def complete(self) -> bool:
        return all(self.split(s).complete for s in self.splits)

    def missing_shards(self) -> dict[str, list[int]]:
        """Per split, the finished shards whose files are gone (SplitArrays.lost_shards)."""
        return {name: lost for name in self.splits if (lost := self.split(name).lost_shards(self.path))}


def open_store(path: Location, mode: str = "r") -> Store:
    """Open an existing store ("r", or "r+" to add shards), or explain why `path` is not one.

    `path` is a folder or an fsspec URL (location.py)."""
    p = normalize(path)
    try:
        if not exists(p):
            raise UserError(f"no store at {path}: the path does not exist.{near(p)} Create one with "
                            "`featcache extract` (where it found an identical store beside --out, it "
                            "reused that one and said so: `featcache ls` lists them).")
        group = zarr.open_group(str(p), mode=mode)
        meta = group.attrs[ATTR]
    except PermissionError as e:
        raise UserError(f"cannot read {path}: permission denied ({e.filename}). Its owner can share "
                        f"it with `chmod -R a+rX {path}` (or g+rX for a group).") from None
    except UserError:
        raise
    except Exception:
        if is_partial_layout(p):
            raise UserError(f"{path} is a store that `featcache extract` began to lay out and did "
                            "not finish (stopped, or at it now): rerun that command to finish it.") from None
        raise UserError(f"{path} is not a featcache store (no Zarr group with featcache "
                        "attributes): give the folder that `featcache extract` wrote (its --out)"
                        f"{_inside(p)}.") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has store format {meta.get('format_version')}; this version "
                        f"of featcache reads format {FORMAT_VERSION}.")
    return Store(group, str(p))


def near(path: Location) -> str:
    """" Did you mean <sibling>?" for a local path that does not exist (cache/colour: colors)."""
    try:
        names = [] if is_url(path) else [p.name for p in Path(path).parent.iterdir() if p.is_dir()]
    except OSError:  # (no such folder either, or not ours to list)
        return ""
    close = difflib.get_close_matches(Path(path).name, names, n=1)
    return f" Did you mean {Path(path).with_name(close[0])}?" if close else ""


def root_meta(node: dict) -> dict | None:
    """A zarr.json's featcache attributes if it is a store's root: not a split's group (which
    has attributes of ours too), nor a store that another process is still laying out."""
    meta = node.get("attributes", {}).get(ATTR)
    return meta if isinstance(meta, dict) and "format_version" in meta else None


def _inside(path: Location) -> str:
    """The stores one or two levels under a local folder given instead of one of them (a
    cache root; not deeper: a home folder given by mistake is not walked)."""
    if is_url(path) or not Path(path).is_dir():
        return ""
    found = []
    for node in sorted(Path(path).glob("*/zarr.json")) + sorted(Path(path).glob("*/*/zarr.json")):
        try:
            if root_meta(json.loads(node.read_text())):
                found.append(str(node.parent))
        except (OSError, ValueError, AttributeError):
            continue
    return (f"; it holds {len(found)} store(s): {', '.join(found[:5])}{' ...' if len(found) > 5 else ''}"
            if found else "")


def create_store(path: Location, meta: dict, splits: dict[str, tuple[int, str]],
                 norms: dict[str, dict], shard: int, channel_scale: np.ndarray | None = None
                 ) -> Store:
    """Lay out an empty store: every array is created up front, filled shard by shard.

    `splits` maps split name -> (sample count, source fingerprint); `shard` is S.
    """
    # mode "a" + overwrite: a layout interrupted half-way is simply laid out again, and the
    # writer's lock file in the folder survives (mode "w" would delete it).
    root = zarr.open_group(str(path), mode="a")
    if meta["dtype"] == "int8":
        root.create_array("channel_scale", data=np.asarray(channel_scale, dtype=np.float32),
                          overwrite=True)
    backbone = root.create_group("backbone", overwrite=True)
    norm_attrs = {}
    for name, spec in norms.items():
        norm_attrs[name] = {k: v for k, v in spec.items() if k not in ("weight", "bias")}
        if spec["type"] == "layernorm":
            for part in ("weight", "bias"):
                arr = np.asarray(spec[part], dtype=np.float32)
                backbone.create_array(f"{name}.{part}", data=arr, overwrite=True)
    backbone.attrs[ATTR] = norm_attrs
    for name, (n, fingerprint) in splits.items():
        _lay_out_split(root, name, n, fingerprint, shard, meta)
    root.attrs[ATTR] = {**meta, "format_version": FORMAT_VERSION, "shard_size": shard,
                        "splits": list(splits), "versions": versions(),
                        "created": _now(),
                        "id": uuid.uuid4().hex,  # this extraction: a run is not continued on another
                        "complete": False}
    return Store(root, str(path))


def add_splits(store: Store, splits: dict[str, tuple[int, str]], shards: dict[str, int], meta: dict) -> None:
    """Lay out new, empty splits in a store opened "r+" (a test set that came later), with
    shards of `shards[name]` samples, then list them in the root attributes, updated with
    `meta` (its new content key and input digests): a run stopped in between lays them out
    again. The store is incomplete until they are written; its other splits are left as
    they are."""
    for name, (n, fingerprint) in splits.items():
        _lay_out_split(store.group, name, n, fingerprint, shards[name], store.meta)
    added = dict.fromkeys(splits, _now())
    store.meta = {**store.meta, **meta, "splits": store.splits + list(splits), "complete": False,
                  "shard_size": max(store.meta["shard_size"], *(min(shards[k], n) for k, (n, _) in splits.items())),
                  "splits_added": {**store.meta.get("splits_added", {}), **added}}
    store.group.attrs[ATTR] = store.meta


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _lay_out_split(root: zarr.Group, name: str, n: int, fingerprint: str, shard: int, meta: dict) -> None:
    """One split's empty arrays (replacing any a layout stopped half-way left)."""
    layout = TokenLayout.from_dict(meta["layout"])
    shape_tail = (len(meta["taps"]), layout.tokens, layout.width)
    s = min(shard, n)
    g = root.create_group(name, overwrite=True)
    g.create_array("tokens", shape=(n, *shape_tail), dtype=STORAGE[meta["dtype"]], chunks=(1, *shape_tail),
                   shards=(s, *shape_tail), compressors=[Crc32cCodec()], fill_value=0,
                   attributes={ATTR: {"encoding": meta["dtype"]}})
    if meta["dtype"] == "int8":
        g.create_array("scales", shape=(n, *shape_tail[:2]), dtype="float32",
                       chunks=(1, *shape_tail[:2]), shards=(s, *shape_tail[:2]),
                       compressors=[Crc32cCodec()], fill_value=0)
    # zstd, then a checksum: a label flipped to another class would otherwise pass unseen
    g.create_array("labels", shape=(n,), dtype="int64", chunks=(s,), fill_value=-1,
                   compressors=[ZstdCodec(), Crc32cCodec()])
    g.create_array("keys", shape=(n,), dtype=str, chunks=(s,), compressors=[ZstdCodec(), Crc32cCodec()])
    g.create_array("done", shape=(math.ceil(n / s),), dtype=bool, chunks=(1,), fill_value=False)
    g.attrs[ATTR] = {"n": n, "fingerprint": fingerprint, "complete": False, "skipped": {}}


def write_shard(store: Store, split: str, index: int, tokens: np.ndarray,
                scales: np.ndarray | None, labels: np.ndarray, keys: list[str],
                skipped: dict[str, str]) -> None:
    """Write shard `index` of `split` whole (one shard file, no read-modify-write), then flag it
    done: a shard whose flag is set is durable, one whose flag is not is rewritten on resume."""
    g = store.group[split]
    s = g["tokens"].shards[0]
    lo, hi = index * s, index * s + len(labels)
    folder = None if is_url(store.path) else Path(store.path) / split
    write_samples(g["tokens"], folder and folder / "tokens", lo, tokens)  # fastwrite.py
    if scales is not None:
        write_samples(g["scales"], folder and folder / "scales", lo, scales)
    g["labels"][lo:hi] = labels
    g["keys"][lo:hi] = np.array(keys, dtype=str)
    if skipped:
        with meta_lock(store.path):  # the parts of a sharded run share these attributes
            g = zarr.open_group(str(join(store.path, split)), mode="r+")
            attrs = dict(g.attrs[ATTR])
            attrs["skipped"] = {**attrs["skipped"], **skipped}
            g.attrs[ATTR] = attrs
        g = store.group[split]
    g["done"][index] = True


def mark_complete(store: Store, split: str | None = None) -> None:
    """Flag a split (or, with None, the whole store) complete once every shard is done."""
    g = store.group[split] if split else store.group
    attrs = dict(g.attrs[ATTR])
    attrs["complete"] = True
    g.attrs[ATTR] = attrs
    if split is None:
        store.meta = attrs


def damaged(path: Location, lost: dict[str, list[int]]) -> str:
    """What to say of a store whose finished shards have lost their files."""
    where = "; ".join(f"{name}: {ks[:10]}{' ...' if len(ks) > 10 else ''}" for name, ks in lost.items())
    return (f"store {path} is damaged: finished shards have lost their files ({where}), so "
            f"their samples would read as zeros. {DAMAGED_REMEDY}")


def is_partial_layout(path: Location) -> bool:
    """A folder where create_store began but never wrote the root attributes: a Zarr group
    without attributes that is empty (a bucket's layout cut short at once), lies beside
    featcache's lock file (taken before a local layout) or holds a split group of ours.
    Another tool's Zarr group, with data of its own, is not one."""
    try:
        if read_json(join(path, "zarr.json")).get("attributes"):
            return False
        everything = listing(path)
        names = [n for n in everything if n != "zarr.json" and not n.startswith(".featcache.")]
        return not names or LOCK_NAME in everything or any(
            ATTR in read_json(join(path, n, "zarr.json")).get("attributes", {})
            for n in names if exists(join(path, n, "zarr.json")))
    except Exception:  # (no zarr.json, or not JSON: no layout of ours)
        return False


def disk_usage(path: Location) -> int:
    return usage(normalize(path))
