"""Stage one: stream a dataset through a frozen ViT once and write its taps to a store.

Batches never straddle a shard, and a shard is flagged done only once it is written, so a
killed run restarted with the same command recomputes exactly the missing shards and ends
bit-identical (on CPU) to a run that was never interrupted.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm.data
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from .catalog import find_stores
from .codec import DTYPES, STORAGE, calibrate, encode
from .errors import UserError
from .lock import StoreLock, meta_lock
from .location import Location, exists, is_url, join, listing, normalize, parent
from .models import Backbone, TokenLayout, load_backbone
from .plan import StorePlan, human_bytes, make_plan
from .precision import PRECISIONS
from .readback import InFlight, Readback
from .sources import Dataset, FrameSampling, Split, open_dataset
from .sources.base import to_rgb
from .sources.video import decoder_name
from .store import (Store, create_store, is_partial_layout, mark_complete, open_store,
                    shard_size_for, write_shard)
from .taps import forward_taps, parse_taps

console = Console(stderr=True)


@dataclass
class ExtractConfig:
    model: str
    dataset: str
    out: Location | None = None  # a folder or an fsspec URL; default: ./cache/<dataset name>
    weights: Path | None = None
    random_init: bool = False
    dtype: str = "fp16"  # fp16 | bf16 | int8 | fp32: how tokens are stored
    precision: str = "fp32"  # how the backbone computes them: fp32, or autocast bf16 | fp16
    batch_size: int = 32
    device: str = "cpu"
    limit: int | None = None
    img_size: int | None = None
    taps: str = "all"
    seed: int = 0
    val_fraction: float = 0.2
    workers: int = min(4, max((os.cpu_count() or 1) - 1, 0))  # leave a core to the backbone
    shard_size: int | None = None  # samples per shard file; default: about 128 MiB per shard
    shard: tuple[int, int] | None = None  # (K, N): this process writes part K of N
    reuse: bool = True  # an identical complete store beside `out` is returned instead
    per_class: int | None = None
    split: list[str] | None = None  # extract only these splits
    data_root: Path | None = None  # where named datasets, manifests' images, VTAB-1k live
    download: bool = False
    views: int = 1  # augmented views per train image (VIEW_POLICY), stored as samples
    frames: int = 8  # video only: frames per clip, sampled as `sampling` says
    sampling: str = "segment"  # video only: segment | uniform (see sources/video.py)
    fps: float | None = None  # video only, uniform sampling: frames per second
    crop_pct: float | None = None  # transform overrides; default: the model's pretrained config
    interpolation: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    force: bool = False
    dry_run: bool = False


# --views: random 60-100 % crops and flips, no colour jitter (a crop can cut away what
# sets the label, so measure per task; docs/losa.md).
VIEW_POLICY = {"scale": (0.6, 1.0), "hflip": 0.5, "color_jitter": None}


def transform_overrides(cfg: ExtractConfig) -> dict:
    return {k: v for k, v in (("crop_pct", cfg.crop_pct), ("interpolation", cfg.interpolation),
                              ("mean", cfg.mean), ("std", cfg.std)) if v is not None}


@dataclass
class ExtractResult:
    path: Location
    plan: StorePlan
    written: dict[str, int] = field(default_factory=dict)  # samples stored this run (not skipped), per split
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)  # split -> key -> reason
    seconds: float = 0.0
    status: str = "written"  # written | resumed | reused | already complete | part done | dry run
    complete: bool = False  # whether the store is complete now (a --shard part may leave it not)
    twin: Location | None = None  # an identical complete store that a run returns instead


class _Images(torch.utils.data.Dataset):
    """Decodes and transforms in DataLoader workers; an unreadable input becomes a reason.

    A video sample is its frames, transformed one by one and stacked: (F, C, H, W).

    `transforms[k]` is split k's transform; a split listed in `augmented` gets a random one
    seeded by (seed, sample index), so its views are the same on every run and resume.
    """

    def __init__(self, splits: list[Split], transforms: list, augmented: set[int], seed: int):
        self.splits, self.transforms, self.augmented, self.seed = splits, transforms, augmented, seed

    def __len__(self) -> int:
        return sum(len(s) for s in self.splits)

    def __getitem__(self, item: tuple[int, int]):
        split, i = item
        if split in self.augmented:
            torch.manual_seed(self.seed * 1_000_003 + i)
            random.seed(self.seed * 1_000_003 + i)
        try:
            sample, transform = self.splits[split].open(i), self.transforms[split]
            if isinstance(sample, list):
                return item, torch.stack([transform(to_rgb(f)) for f in sample]), ""
            return item, transform(to_rgb(sample)), ""
        except Exception as e:  # any decoder failure: record it, never stop the run
            return item, None, f"{type(e).__name__}: {e}"


def _repeat(split: Split, k: int) -> Split:
    """Each sample k times in a row (same key, same label): the slots of k augmented views."""
    return split.subset(np.repeat(np.arange(len(split)), k))


def _collate(batch):
    items = [b[0] for b in batch]
    ok = [b[1] is not None for b in batch]
    images = torch.stack([b[1] for b in batch if b[1] is not None]) if any(ok) else None
    return items, images, np.array(ok), [b[2] for b in batch]


def _lists(d: dict) -> dict:
    """Tuples as lists, recursively: what the attributes read back as from JSON."""
    return {k: _lists(v) if isinstance(v, dict) else list(v) if isinstance(v, tuple) else v
            for k, v in d.items()}


def _layout(backbone: Backbone, ds: Dataset) -> TokenLayout:
    layout = backbone.layout()
    return layout.with_frames(ds.video.frames) if ds.video else layout


def _settings(backbone: Backbone, ds: Dataset, taps: list[int], cfg: ExtractConfig) -> dict:
    """The store's root attributes that define its contents (compared on resume)."""
    return {"model": {"name": backbone.name, "depth": len(backbone.blocks),
                      "params": sum(p.numel() for p in backbone.model.parameters())},
            "weights": backbone.weights,
            "transform": _lists({**backbone.data_config, **(
                {"views": cfg.views, "view_policy": VIEW_POLICY, "view_seed": cfg.seed}
                if cfg.views > 1 else {}), **({"video": ds.video.to_dict()} if ds.video else {})}),
            "taps": taps, "layout": _layout(backbone, ds).to_dict(), "dtype": cfg.dtype,
            "precision": cfg.precision,
            # batch composition changes the low bits of a forward pass: resume must match it
            "batch_size": cfg.batch_size,
            "classes": ds.classes, "dataset": {"name": ds.name, "source": ds.source, **(
                {"decoder": decoder_name()} if ds.video else {})}}  # source: in the content key, only noted on resume


def content_key(settings: dict, ds: Dataset) -> str:
    """What a store holds, however it was batched: model, weights hash, transform, taps,
    layout, dtype, precision, classes, each split's inputs (keys and labels) and where those lie. The
    place counts because keys and labels do not identify the images: a resized or edited
    copy of a dataset elsewhere keeps both, and was once handed the original's store."""
    what = {k: settings[k] for k in ("transform", "taps", "layout", "dtype", "classes")}
    what |= {"model": settings["model"]["name"], "weights": settings["weights"]["sha256"],
             "source": ds.source, "splits": {name: s.fingerprint() for name, s in ds.splits.items()}}
    if settings["precision"] != "fp32":  # (stores from before --precision keep their key)
        what["precision"] = settings["precision"]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def _identical_store(out: Location, key: str) -> Location | None:
    """A complete store with this content key elsewhere under out's parent folder (or prefix)."""
    if not exists(parent(out)):
        return None
    here = out if is_url(out) else Path(out).resolve()
    for s in find_stores(parent(out)):
        there = normalize(s["path"])
        if s["complete"] and s.get("content_key") == key and (
                there if is_url(there) else Path(there).resolve()) != here:
            return there
    return None


def _differences(store: Store, settings: dict, ds: Dataset) -> list[str]:
    diffs = [f"{k}: store has {store.meta.get(k)!r}, this run {v!r}"
             for k, v in settings.items()
             # content_key is derived from these settings and the dataset's source, which a
             # resume only notes (a dataset moved between runs); older stores lack the key
             if k not in ("dataset", "weights", "content_key", "precision") and store.meta.get(k) != v]
    if store.precision != settings["precision"]:
        diffs.append(f"precision: store has {store.precision!r}, this run {settings['precision']!r}")
    if store.meta["weights"]["sha256"] != settings["weights"]["sha256"]:
        diffs.append(f"weights: store has sha256 {store.meta['weights']['sha256'][:12]}..., "
                     f"this run {settings['weights']['sha256'][:12]}...")
    if set(store.splits) != set(ds.splits):
        diffs.append(f"splits: store has {store.splits}, this run {list(ds.splits)}")
    for name in set(store.splits) & set(ds.splits):
        if store.split(name).attrs["fingerprint"] != ds.splits[name].fingerprint():
            diffs.append(f"split {name}: different inputs (keys or labels) than the store's")
    return diffs


def _open_or_create(out: Location, settings: dict, ds: Dataset, backbone: Backbone, plan: StorePlan,
                    shard_size: int | None, calibration: Callable[[], np.ndarray | None]) -> Store:
    """The existing store at `out` when it was made with the same settings, else a new one."""
    if exists(join(out, "zarr.json")) and not is_partial_layout(out):
        store = open_store(out, mode="r+")
        diffs = _differences(store, settings, ds)
        if diffs:
            raise UserError(f"{out} already holds a store made with other settings; use another "
                            "--out or delete it. Differences: " + "; ".join(diffs))
        if store.meta["dataset"]["source"] != settings["dataset"]["source"]:
            console.print(f"[yellow]note:[/] {out} was made from {store.meta['dataset']['source']}; "
                          f"this run reads {settings['dataset']['source']} (same keys and labels).")
        if shard_size and shard_size != store.meta["shard_size"]:
            console.print(f"[yellow]note:[/] {out} keeps its shard size {store.meta['shard_size']}.")
        return store
    # laying out a store replaces whatever lies under its split names: never over other
    # data (a layout of ours interrupted half-way, with its zarr.json, is simply redone)
    if not exists(join(out, "zarr.json")) and any(
            not name.startswith(".featcache.") for name in listing(out)):  # our lock files
        raise UserError(f"{out} exists, is not empty and is not a featcache store; choose "
                        "another --out.")
    splits = {name: (len(s), s.fingerprint()) for name, s in ds.splits.items()}
    shard = shard_size or shard_size_for(plan.bytes_per_sample, max(n for n, _ in splits.values()))
    return create_store(out, settings, splits, backbone.final_norms(), shard, calibration())


def _shard_batches(store: Store, names: list[str], batch_size: int,
                   part: tuple[int, int] | None) -> list[list]:
    """Batches of (split id, index) covering every shard not yet done (of this part, with
    --shard K/N: the shards whose position over all splits is K modulo N); never across
    shards."""
    batches, position = [], 0
    k_of, n_of = part or (0, 1)
    for name in store.splits:  # the store's order: every part numbers shards alike
        sid = names.index(name)
        arrays = store.split(name)
        s, n = arrays.shard_size, arrays.n
        for k, done in enumerate(arrays.done):
            mine = position % n_of == k_of
            position += 1
            if done or not mine:
                continue
            lo, hi = k * s, min((k + 1) * s, n)
            for b in range(lo, hi, batch_size):
                batches.append([(sid, i) for i in range(b, min(b + batch_size, hi))])
    return batches


BUGS = (TypeError, AttributeError, NameError, KeyError, IndexError, AssertionError,
        NotImplementedError)  # errors of the code, never of the disk or the network


class _ShardWriter:
    """Writes finished shards on a background thread so the backbone never waits on I/O."""

    def __init__(self, store: Store):
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is None:
                try:
                    write_shard(self.store, *job)
                except BUGS as e:  # our mistake, not the storage's: keep its traceback
                    self.error = e
                except Exception as e:  # disk full, a bucket gone away: say so, in one line
                    self.error = UserError(
                        f"writing shard {job[1]} of split '{job[0]}' to {self.store.path} failed "
                        f"({type(e).__name__}: {e}). Every shard written before it is kept: "
                        "rerun the same command to continue from there.")
                    self.error.__cause__ = e

    def put(self, *job) -> None:
        if self.error:
            raise self.error
        self.queue.put(job)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error:
            raise self.error


def extract(cfg: ExtractConfig) -> ExtractResult:
    """Run stage one as configured; see ExtractConfig and `featcache extract --help`."""
    if cfg.dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not '{cfg.dtype}'")
    if cfg.precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not '{cfg.precision}'")
    if cfg.batch_size < 1 or (cfg.shard_size is not None and cfg.shard_size < 1):
        raise UserError("--batch-size and --shard-size must be at least 1")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device here.")
    if cfg.views < 1:
        raise UserError("--views must be at least 1")
    if cfg.shard is not None and not 0 <= cfg.shard[0] < cfg.shard[1]:
        raise UserError(f"--shard K/N needs 0 <= K < N, not {cfg.shard[0]}/{cfg.shard[1]}")
    ds = open_dataset(cfg.dataset, cfg.seed, cfg.val_fraction, cfg.limit, cfg.per_class,
                      cfg.split, cfg.data_root, cfg.download,
                      FrameSampling(cfg.frames, cfg.sampling, cfg.fps))
    _note_rare_classes(ds)
    if cfg.views > 1 and ds.video:
        raise UserError("--views is for images; a video dataset keeps one view per clip.")
    if cfg.views > 1 and "train" in ds.splits:
        ds.splits["train"] = _repeat(ds.splits["train"], cfg.views)
    out = normalize(cfg.out) if cfg.out else Path("cache") / ds.name
    if is_url(out) and cfg.shard:
        raise UserError(f"{out}: object stores have no locks, so a URL store takes one writer. "
                        "Extract with --shard or --dask to a shared folder (then copy it to the "
                        "bucket), or in one process straight to the URL.")
    backbone = load_backbone(cfg.model, cfg.weights, cfg.random_init, cfg.img_size, cfg.seed,
                             transform_overrides(cfg))
    if cfg.random_init:
        console.print(f"[yellow]note:[/] {backbone.name} has RANDOM weights (--random-init): "
                      "its features only exercise the pipeline.")
    taps = parse_taps(cfg.taps, len(backbone.blocks))
    layout = _layout(backbone, ds)
    plan = make_plan({k: len(v) for k, v in ds.splits.items()}, len(taps), layout.tokens,
                     layout.width, cfg.dtype, out)
    console.print(plan.describe())
    result = ExtractResult(path=out, plan=plan)
    settings = _settings(backbone, ds, taps, cfg)
    settings["content_key"] = content_key(settings, ds)
    existed = exists(join(out, "zarr.json"))
    try:
        twin = None if existed or not cfg.reuse else _identical_store(out, settings["content_key"])
    except UserError:  # a bucket that cannot be listed: a dry run needs no credentials
        if not cfg.dry_run:
            raise
        twin = None
    result.twin = twin
    if cfg.dry_run:
        if twin is not None:
            console.print(f"{twin} already holds exactly this: a real run would reuse it and write "
                          "nothing (--no-reuse to extract anyway).")
        result.status = "dry run"
        return result
    if twin is not None:
        _refuse_unreadable(open_store(twin), list(ds.splits))  # not an empty twin either
        console.print(f"{twin} already holds exactly this (same model, weights, transform, taps, "
                      f"dtype, precision and inputs): reusing it, and {out} is not written. Train from "
                      f"{twin}, or pass --no-reuse to extract anyway.")
        result.path, result.status, result.complete = twin, "reused", True
        return result
    if not existed:
        plan.check_fits(cfg.force)
    device = torch.device(cfg.device)
    backbone.model.to(device)
    names = list(ds.splits)
    plain = timm.data.create_transform(**backbone.data_config, is_training=False)
    views = timm.data.create_transform(**backbone.data_config, is_training=True, **VIEW_POLICY)
    augmented = {names.index("train")} if cfg.views > 1 and "train" in names else set()
    images = _Images([ds.splits[n] for n in names],
                     [views if k in augmented else plain for k in range(len(names))], augmented, cfg.seed)

    def calibration() -> np.ndarray | None:
        """int8 only: channel scales from the first batch of the first split (deterministic)."""
        if cfg.dtype != "int8":
            return None
        readable = []
        for i in range(len(images.splits[0])):  # the first batch_size readable images
            item = images[(0, i)]
            if item[1] is not None:
                readable.append(item)
            if len(readable) == cfg.batch_size:
                break
        if not readable:
            raise UserError(f"int8 calibration found no readable image in split '{names[0]}'.")
        return calibrate(forward_taps(backbone.model, _collate(readable)[1].to(device), taps,
                                      cfg.precision))

    with StoreLock(out, cfg.shard):
        with meta_lock(out):  # the parts of a sharded run create the store once
            store = _open_or_create(out, settings, ds, backbone, plan, cfg.shard_size, calibration)
        batches = _shard_batches(store, names, cfg.batch_size, cfg.shard)
        if batches:
            result.status = "resumed" if existed else "written"
            _run(cfg, backbone, store, images, ds, names, taps, batches, result)
        with meta_lock(out):
            store = open_store(out, mode="r+")  # other parts may have finished shards meanwhile
            for name in names:
                if store.split(name).done.all() and not store.split(name).attrs["complete"]:
                    mark_complete(store, name)
            result.complete = all(store.split(n).done.all() for n in names)
            if result.complete:
                if not store.meta["complete"]:
                    mark_complete(store)
                if not batches:
                    result.status = "already complete"
            elif cfg.shard:
                result.status = result.status if batches else "part done"
                console.print(f"part {cfg.shard[0]}/{cfg.shard[1]} of {out} is done; "
                              "the store completes when every part has run.")
    _refuse_unreadable(store, names)
    return result


def _note_rare_classes(ds: Dataset) -> None:
    """A class of one or two samples, among classes of ten or more or named like another
    class, is most often a mistyped label in a manifest: say so before the extraction,
    naming a sample, without refusing (it may be real)."""
    labels = np.concatenate([s.labels for s in ds.splits.values()])
    counts = np.bincount(labels[labels >= 0], minlength=len(ds.classes))
    rare = np.flatnonzero((counts > 0) & (counts <= 2))
    # many rare classes are a long tail or a --limit, not typos: then only name likenesses
    by_count = np.median(counts) >= 10 and len(rare) <= max(1, 0.1 * len(counts))
    lines = []
    for c in rare:
        big = [n for n, k in zip(ds.classes, counts) if k >= 5 * counts[c]]  # a typo's original
        like = difflib.get_close_matches(ds.classes[c], big, n=1, cutoff=0.75) or [
            n for n in big if n.lower() == ds.classes[c].lower()]
        if like or by_count:
            key = next(s.keys[i] for s in ds.splits.values() for i in np.flatnonzero(s.labels == c))
            lines.append(f"'{ds.classes[c]}' ({counts[c]} sample{'s' if counts[c] > 1 else ''}, e.g. {key})"
                         + (f", close to '{like[0]}'" if like else ""))
        if len(lines) > 5:
            break
    if lines:
        console.print(f"[yellow]note:[/] class(es) with at most 2 samples, against a median of "
                      f"{np.median(counts):g} per class: {'; '.join(lines[:5])}"
                      f"{' ...' if len(lines) > 5 else ''}. A mistyped label?")


def _refuse_unreadable(store: Store, names: list[str]) -> None:
    """A finished split none of whose inputs could be read is a wrong path, not bad luck:
    say so now rather than let `sidetrain fit` find an empty split later."""
    for name in names:
        split = store.split(name)
        if split.attrs["complete"] and split.n and not (split.labels >= 0).any():
            key, why = next(iter(split.attrs["skipped"].items()))
            raise UserError(
                f"none of the {split.n} inputs of split '{name}' could be read (the first: {key}: "
                f"{why}), so {store.path} holds no sample of it. Check that the files are where "
                "the dataset says (a manifest's relative paths are read from its folder, or from "
                f"--data-root), then delete {store.path} and extract again.")


@dataclass
class _Shard:
    """The shard being filled: its rows arrive batch by batch, then it goes to the writer."""

    split: str
    index: int
    lo: int
    tokens: np.ndarray
    scales: np.ndarray | None
    labels: np.ndarray
    keys: list[str]
    skipped: dict[str, str] = field(default_factory=dict)

    @classmethod
    def empty(cls, name: str, split: Split, index: int, size: int, shape: tuple, dtype: str
              ) -> "_Shard":
        lo, hi = index * size, min((index + 1) * size, len(split))
        scales = np.zeros((hi - lo, *shape[:2]), np.float32) if dtype == "int8" else None
        return cls(name, index, lo, np.zeros((hi - lo, *shape), STORAGE[dtype]), scales,
                   split.labels[lo:hi].copy(), split.keys[lo:hi])

    def fill(self, items: list, encoded: InFlight | None, ok: np.ndarray, reasons: list[str]) -> None:
        rows = np.array([i for _, i in items]) - self.lo
        if encoded is not None:
            tokens, scales = encoded.collect()
            self.tokens[rows[ok]] = tokens
            if self.scales is not None:
                self.scales[rows[ok]] = scales
        for r, why in zip(rows[~ok], np.array(reasons, dtype=object)[~ok]):
            self.labels[r] = -1
            self.skipped[self.keys[r]] = why


def _run(cfg: ExtractConfig, backbone: Backbone, store: Store, images: _Images, ds: Dataset,
         names: list[str], taps: list[int], batches: list[list], result: ExtractResult) -> None:
    device = torch.device(cfg.device)
    model = backbone.model
    channel_scale = None if store.channel_scale is None else torch.from_numpy(store.channel_scale).to(device)
    loader = DataLoader(images, batch_sampler=batches,
                        num_workers=cfg.workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda")
    layout = _layout(backbone, ds)
    shape = (len(taps), layout.tokens, layout.width)
    unit = "clips" if ds.video else "views" if cfg.views > 1 else "img"  # what the bar counts
    sizes = [store.split(n).shard_size for n in names]
    writer = _ShardWriter(store)
    readback = Readback(device)
    shard: _Shard | None = None
    pending: tuple | None = None  # the previous batch, filed into its shard after this one is queued
    t0 = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(f"extract -> {result.path}", total=sum(map(len, batches)), rate="")
        done = 0
        for items, batch, ok, reasons in loader:
            sid, first = items[0]
            if shard is None or (shard.split, shard.index) != (names[sid], first // sizes[sid]):
                if pending:
                    shard.fill(*pending)
                    pending = None
                if shard is not None:
                    _flush(writer, shard, result)
                shard = _Shard.empty(names[sid], ds.splits[names[sid]], first // sizes[sid],
                                     sizes[sid], shape, cfg.dtype)
            encoded = None if batch is None else readback.start(list(encode(
                forward_taps(model, batch.to(device, non_blocking=True), taps, cfg.precision),
                cfg.dtype, channel_scale)))
            if pending:
                shard.fill(*pending)
            pending = (items, encoded, ok, reasons)
            done += len(items)
            dt = time.perf_counter() - t0
            bar.update(task, completed=done, rate=f"{done / dt:.1f} {unit}/s, "
                       f"{human_bytes(done * result.plan.bytes_per_sample / dt)}/s")
        if pending:
            shard.fill(*pending)
        if shard is not None:
            _flush(writer, shard, result)
        writer.close()
    result.seconds = time.perf_counter() - t0


def _flush(writer: _ShardWriter, shard: _Shard, result: ExtractResult) -> None:
    writer.put(shard.split, shard.index, shard.tokens, shard.scales, shard.labels, shard.keys,
               shard.skipped)
    stored = len(shard.labels) - len(shard.skipped)
    result.written[shard.split] = result.written.get(shard.split, 0) + stored
    if shard.skipped:
        result.skipped.setdefault(shard.split, {}).update(shard.skipped)
