"""Stage one: stream a dataset through a frozen ViT once and write its taps to a store.

The data flow: sources (keys, labels, opening) -> images (decoded and transformed in
workers) -> the backbone's taps -> codec (encoded on the device) -> readback -> shards
(filled, then written in the background) -> store. A killed run restarted with the same
command recomputes exactly the shards not yet written (shards.py) and ends bit-identical
(on CPU) to a run that was never interrupted; reuse.py decides which store a run writes.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from .checks import (changed_inputs_note, empty_classes_note, input_digests, no_train_note,
                     one_class_note, rare_classes_note, refuse_unreadable, refuse_unreadable_inputs)
from .codec import DTYPES, calibrate, encode, span
from .console import console, escape, note, say
from .errors import UserError, is_int, is_number, require
from .images import VIEW_POLICY, Images, collate, make_images, repeat
from .location import Location, exists, is_url, join, normalize
from .lock import StoreLock, meta_lock, refuse_if_written, writer
from .models import Backbone, TokenLayout, load_backbone
from .plan import StorePlan, human_bytes, make_plan
from .precision import PRECISIONS, pick_device
from .readback import Readback
from .reuse import (content_key, drop_link, existing_store, identical_store, link, open_or_create,
                    stored_batch_size)
from .shards import Shard, ShardWriter, shard_batches
from .sources import KNOWN, Dataset, FrameSampling, open_dataset
from .sources.video import decoder_name
from .store import SplitArrays, Store, damaged, mark_complete, open_store
from .taps import forward_taps, parse_taps


@dataclass
class ExtractConfig:
    """What to extract, and how: the options of `featcache extract` (the same names, with
    dashes for underscores; `featcache extract --help` explains each; `--dask` is
    featcache.distribute.extract_on_dask(cfg, address)). `model` and `dataset` are
    required; `out` defaults to ./cache/<dataset name>."""

    model: str
    dataset: str | Path  # a name (demo, cifar10, vtab1k:dtd), a folder, or a manifest file
    out: Location | None = None  # a folder or an fsspec URL; default: ./cache/<dataset name>
    weights: Path | None = None
    random_init: bool = False
    dtype: str = "fp16"  # fp16 | bf16 | int8 | fp32: how tokens are stored
    precision: str = "fp32"  # how the backbone computes them: fp32, or autocast bf16 | fp16
    batch_size: int | None = None  # per forward; default: the store's when resuming one, else 32
    device: str = "auto"  # cuda where torch sees a GPU, else cpu (precision.pick_device)
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


def transform_overrides(cfg: ExtractConfig) -> dict:
    return {k: v for k, v in (("crop_pct", cfg.crop_pct), ("interpolation", cfg.interpolation),
                              ("mean", cfg.mean), ("std", cfg.std)) if v is not None}


Status = Literal["written", "resumed", "reused", "already complete", "part done", "dry run"]


@dataclass
class ExtractResult:
    """What a run did: the store to train from (`path`; a reused twin's when `status` is
    "reused"), its size plan, what this run wrote and skipped, and whether the store is
    complete."""

    path: Location
    plan: StorePlan
    written: dict[str, int] = field(default_factory=dict)  # samples stored this run (not skipped), per split
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)  # split -> key -> reason
    seconds: float = 0.0
    status: Status = "written"
    complete: bool = False  # whether the store is complete now (a --shard part, or a --split run
    # on a store with other splits unfinished, may leave it not)
    twin: Location | None = None  # an identical complete store that a run returns instead
    left: int = 0  # samples the store had left to extract when this run began (all, for a new
    # one; by all its parts, for a --shard part; none, when a twin is reused)


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
            "device": torch.device(cfg.device).type,  # (so does the device: a resume is told, not refused)
            # source and decoder: in the content key; a moved source is only noted on resume,
            # another decoder refused
            "classes": ds.classes, "dataset": {"name": ds.name, "source": ds.source, **(
                {"decoder": decoder_name()} if ds.video else {})}}


INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")  # timm's names


def _check(cfg: ExtractConfig) -> None:
    """Refuse settings that cannot work before anything is read or loaded."""
    if cfg.dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not '{cfg.dtype}'")
    if cfg.precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not '{cfg.precision}'")
    for option, value in (("--batch-size", cfg.batch_size), ("--shard-size", cfg.shard_size),
                          ("--img-size", cfg.img_size), ("--limit", cfg.limit), ("--per-class", cfg.per_class),
                          ("--views", cfg.views)):  # (--frames: FrameSampling checks it)
        require(value is None or is_int(value) and value >= 1, option, "a whole number of at least 1", value)
    require(is_number(cfg.val_fraction) and 0 < cfg.val_fraction < 1, "--val-fraction",
            "a share between 0 and 1", cfg.val_fraction)
    require(is_int(cfg.workers) and cfg.workers >= 0, "--workers", "0 or more", cfg.workers)
    require(cfg.crop_pct is None or is_number(cfg.crop_pct) and 0 < cfg.crop_pct <= 1, "--crop-pct",
            "a share above 0, at most 1", cfg.crop_pct)
    require(cfg.interpolation in (None, *INTERPOLATIONS), "--interpolation",
            f"one of {', '.join(INTERPOLATIONS)}", cfg.interpolation)
    for option, value in (("--mean", cfg.mean), ("--std", cfg.std)):
        require(value is None or isinstance(value, (tuple, list)) and len(value) == 3
                and all(map(is_number, value)), option, "three numbers (red, green, blue: in Python "
                "a tuple, on the command line 0.5,0.5,0.5)", value)
    require(cfg.shard is None or isinstance(cfg.shard, (tuple, list)) and len(cfg.shard) == 2
            and all(map(is_int, cfg.shard)), "--shard", "K/N (in Python a tuple (K, N))", cfg.shard)
    if cfg.shard is not None and not 0 <= cfg.shard[0] < cfg.shard[1]:
        k, n = cfg.shard
        raise UserError(f"--shard K/N counts parts from 0: 0/{n} to {n - 1}/{n}, not {k}/{n}" if n >= 1
                        else f"--shard K/N needs N of at least 1, not {k}/{n}")


CALIBRATION = 32  # int8: the channel scales are the absmax over this many inputs


def _calibration(cfg: ExtractConfig, backbone: Backbone, images: Images, first: str, taps: list[int],
                 device: torch.device) -> np.ndarray | None:
    """int8 only: channel scales from the first CALIBRATION readable inputs of the first
    split, `first` (deterministic), in forwards of --batch-size: the content key leaves the
    batch size out, so the scales must not depend on it."""
    if cfg.dtype != "int8":
        return None
    readable = []
    for i in range(len(images.splits[0])):
        item = images[(0, i)]
        if item[1] is not None:
            readable.append(item)
        if len(readable) == CALIBRATION:
            break
    if not readable:
        raise UserError(f"int8 calibration found no readable image in split '{first}'.")
    batches = [readable[i:i + cfg.batch_size] for i in range(0, len(readable), cfg.batch_size)]
    return np.max([calibrate(forward_taps(backbone.model, collate(b)[1].to(device), taps, cfg.precision))
                   for b in batches], axis=0)


def _unused_options(cfg: ExtractConfig, ds: Dataset) -> list[str]:
    """Options given that change nothing for this dataset: said, as silence reads as done."""
    texts = []
    given = [f"--{k}" for k in ("frames", "sampling", "fps") if getattr(cfg, k) != getattr(ExtractConfig, k)]
    if given and not ds.video:
        one = len(given) == 1
        texts.append(f"{', '.join(given)} {'is' if one else 'are'} for videos; {ds.name} holds "
                     f"images: {'it changes' if one else 'they change'} nothing.")
    if cfg.val_fraction != ExtractConfig.val_fraction and "val" in ds.splits and not ds.val_from_train:
        texts.append(f"--val-fraction holds val out of train; {ds.name} has its own val split: "
                     "it changes nothing.")
    if cfg.download and cfg.dataset not in KNOWN:
        texts.append("--download fetches the named datasets (mnist, cifar10, places365, ...); "
                     f"{ds.name} is read as it is: it changes nothing.")
    return texts


def extract(cfg: ExtractConfig) -> ExtractResult:
    """Run stage one as configured; see ExtractConfig and `featcache extract --help`."""
    if not isinstance(cfg, ExtractConfig):
        raise UserError(f"extract takes an ExtractConfig(model=..., dataset=...), not {type(cfg).__name__}")
    if isinstance(cfg.split, str):  # split="train" or "train,val", as on the command line
        cfg = replace(cfg, split=cfg.split.split(","))
    _check(cfg)
    cfg = replace(cfg, device=pick_device(cfg.device))
    ds = open_dataset(cfg.dataset, cfg.seed, cfg.val_fraction, cfg.limit, cfg.per_class,
                      cfg.split, cfg.data_root, cfg.download,
                      FrameSampling(cfg.frames, cfg.sampling, cfg.fps))
    subset = cfg.split or cfg.limit or cfg.per_class  # (then classes may be missing by design)
    for text in (None if cfg.split else no_train_note(ds), one_class_note(ds), rare_classes_note(ds),
                 None if subset else empty_classes_note(ds)):
        if text:
            note(text)
    if cfg.views > 1 and ds.video:
        raise UserError("--views is for images; a video dataset keeps one view per clip.")
    for text in _unused_options(cfg, ds):
        note(text)
    if cfg.views > 1 and "train" in ds.splits:
        ds.splits["train"] = repeat(ds.splits["train"], cfg.views)
    out = normalize(cfg.out) if cfg.out else Path("cache") / ds.name
    if is_url(out) and cfg.shard:
        raise UserError(f"{out}: object stores have no locks, so a URL store takes one writer. "
                        "Extract with --shard or --dask to a shared folder (then copy it to the "
                        "bucket), or in one process straight to the URL.")
    if not cfg.dry_run and (dropped := drop_link(out, cfg.reuse)):
        note(dropped)
    if cfg.batch_size is None:
        cfg = replace(cfg, batch_size=stored_batch_size(out) or 32)
    backbone = load_backbone(cfg.model, cfg.weights, cfg.random_init, cfg.img_size, cfg.seed,
                             transform_overrides(cfg))
    if cfg.random_init:
        note(f"{backbone.name} has RANDOM weights (--random-init): "
             "its features only exercise the pipeline.")
    taps = parse_taps(cfg.taps, len(backbone.blocks))
    layout = _layout(backbone, ds)
    plan = make_plan({k: len(v) for k, v in ds.splits.items()}, len(taps), layout.tokens,
                     layout.width, cfg.dtype, out)
    say(plan.describe())
    say(f"classes: {len(ds.classes)} ({', '.join(ds.classes[:8])}"
        f"{', ...' if len(ds.classes) > 8 else ''})")
    result = ExtractResult(path=out, plan=plan)
    settings = _settings(backbone, ds, taps, cfg)
    settings["content_key"] = content_key(settings, ds)
    existed = exists(join(out, "zarr.json"))
    store, notes = existing_store(out, settings, ds, cfg.shard_size)  # refused if made otherwise
    digests = input_digests(ds)  # a few inputs' bytes: a store records them, a rerun compares
    if store is not None:
        notes.append(changed_inputs_note(store, digests, "the store holds them as they were. "
                                         "Delete it, or extract to another --out, to extract them again."))
    if store is not None and not cfg.dry_run:
        refuse_if_written(out, cfg.shard)  # (before it says what it would do)
    left, complete = (None, False) if store is None else _left_to_write(store, plan, cfg)
    result.left = sum(plan.splits.values()) if left is None else left
    for text in filter(None, notes):
        note(text)
    if complete and store.meta["complete"] and store.complete and not cfg.dry_run:  # (every split's flags)
        refuse_unreadable(store, list(ds.splits))  # (no lock taken: a reader may rerun it)
        result.status, result.complete = "already complete", True
        return result
    names = list(ds.splits)
    images = make_images(ds.splits, backbone.data_config, "train" if cfg.views > 1 else None, cfg.seed)
    refuse_unreadable_inputs(images, names)  # (a dry run too: wrong paths are found at once)
    result.twin = twin = None if existed or not cfg.reuse else _find_twin(out, settings, digests, cfg.dry_run)
    if cfg.dry_run:
        if twin is not None:
            say(f"{twin} already holds this: a real run would reuse it and write nothing "
                "(--no-reuse to extract anyway).")
        busy = existed and writer(out)
        if busy:
            say(f"{out} is being written now by {busy}.")
        result.status = "dry run"
        return result
    if twin is not None:
        refuse_unreadable(open_store(twin), list(ds.splits))  # not an empty twin either
        linked = link(out, twin)
        say(f"{twin} already holds this (same model, weights, transform, taps, dtype and "
            "precision, same input paths and labels, and the inputs it sampled hold the same "
            f"bytes): reusing it, " + (f"and {out} is a link to it (train from either)" if linked else
                                       f"and {out} is not written (train from {twin})")
            + ". Pass --no-reuse to extract anyway (after changing files in place without "
            "renaming them).")
        result.path, result.status, result.complete, result.left = twin, "reused", True, 0
        return result
    plan.check_fits(cfg.force, left)
    device = torch.device(cfg.device)
    backbone.model.to(device)
    calibration = partial(_calibration, cfg, backbone, images, names[0], taps, device)  # if a store is made
    told = store is not None  # its notes are said; a store another part laid out since has its own
    with StoreLock(out, cfg.shard):
        with meta_lock(out):  # the parts of a sharded run create the store once
            store, notes = open_or_create(out, settings, ds, backbone, plan, cfg.shard_size, calibration,
                                          digests)
        if not told:
            for text in notes:
                note(text)
        batches = shard_batches(store, names, cfg.batch_size, cfg.shard)
        if batches:
            result.status = "resumed" if existed else "written"
            try:
                _run(cfg, backbone, store, images, ds, names, taps, batches, result)
            except BaseException as e:  # (a full disk, Ctrl-C) the splits it finished are complete
                with contextlib.suppress(Exception), meta_lock(out):
                    store = _mark_finished(out, names)
                    if isinstance(e, (KeyboardInterrupt, OSError)):  # (what a rerun continues)
                        _say_kept(store, names)
                raise
        with meta_lock(out):
            store = _mark_finished(out, names)  # other parts may have finished shards meanwhile
            # (a store may hold splits this run did not name: --split)
            mine = all(store.split(n).done.all() for n in names)
            others = [n for n in store.splits if n not in names and not store.split(n).done.all()]
            result.complete = mine and not others
            if result.complete and not store.meta["complete"]:
                mark_complete(store)
                if cfg.shard:  # (the one part that finds it all done, under the lock)
                    say(f"part {cfg.shard[0]}/{cfg.shard[1]} completed {out}: every part has run.")
            if mine and others:
                note(f"{out}: split(s) {', '.join(others)} are not finished; the extract command without "
                     f"--split (or with --split {','.join(others)}) finishes them.")
            if mine and not batches:
                result.status = "already complete" if result.complete else "part done"
            elif not mine and cfg.shard:
                result.status = result.status if batches else "part done"
                say(f"part {cfg.shard[0]}/{cfg.shard[1]} of {out} is done; "
                    "the store completes when every part has run.")
    refuse_unreadable(store, names)
    note_skipped(result)
    return result


def _left(split: SplitArrays) -> int:
    """Samples in the shards of a split that are not done."""
    return int((~split.done[np.arange(split.n) // split.shard_size]).sum())


def _left_to_write(store: Store, plan: StorePlan, cfg: ExtractConfig) -> tuple[int, bool]:
    """(the samples an existing store has left to extract of this run's splits, whether
    they are complete), what is left said; a split the store lacks is left whole (it is
    added). A store that has lost shard files is refused (not mended here: its inputs may
    have changed since, and a reader may not write)."""
    splits = {name: store.split(name) for name in store.splits}  # (each read once)
    lost = {name: gone for name, split in splits.items() if (gone := split.lost_shards(store.path))}
    if lost:
        raise UserError(damaged(store.path, lost))
    ours = [splits[name] for name in plan.splits if name in splits]
    left = sum(map(_left, ours))
    if left > 0:
        say(f"{store.path} is part-written: {left:,} samples ({human_bytes(left * plan.bytes_per_sample)}) "
            f"are left to extract{' by its parts' if cfg.shard else ''}.")
    left += sum(n for name, n in plan.splits.items() if name not in splits)
    complete = len(ours) == len(plan.splits) and all(split.complete for split in ours)
    if not complete:
        began, kind = store.meta.get("device"), torch.device(cfg.device).type
        if began not in (None, kind) and not cfg.dry_run:
            note(f"{store.path} was begun on {began}; this run continues it on {kind}, whose tokens "
                 f"differ from {began}'s in their low bits (as with another --batch-size).")
        elif began is None and kind != "cpu" and not cfg.dry_run:  # (older stores, whose default was cpu)
            note(f"{store.path} does not record the device it was begun on (older featcache "
                 f"defaulted to the CPU); if it was the CPU, this run's tokens on {kind} differ from "
                 "those in their low bits (as with another --batch-size), and --device cpu continues "
                 "it as it began.")
    return left, complete


def _find_twin(out: Location, settings: dict, digests: dict, dry_run: bool) -> Location | None:
    """A complete store elsewhere in the cache root with the same content key, whose
    sampled inputs still hold the same bytes and whose shard files are all there."""
    def current(there: Location) -> bool:
        try:
            twin = open_store(there)
            stale = changed_inputs_note(twin, digests, "not reused.")
            if twin.missing_shards():
                stale = f"{there} holds the same content but has lost shard files: not reused."
        except Exception as e:  # (a chunk that does not decode, say): another store's trouble
            stale = f"{there} holds the same content but cannot be read ({type(e).__name__}): not reused."
        if stale:
            note(stale)
        return not stale

    try:
        return identical_store(out, settings["content_key"], current)
    except UserError:  # a bucket that cannot be listed: a dry run needs no credentials
        if not dry_run:
            raise
        return None


def _mark_finished(out: Location, names: list[str]) -> Store:
    """Flag complete the splits whose shards are all done (the caller holds the meta lock)."""
    store = open_store(out, mode="r+")
    for name in names:
        if store.split(name).done.all() and not store.split(name).attrs["complete"]:
            mark_complete(store, name)
    return store


def _say_kept(store: Store, names: list[str]) -> None:
    """What a stopped run keeps: the samples of finished shards (a shard is the unit of work:
    the samples of one begun and not finished are extracted again)."""
    splits = [store.split(name) for name in names]
    kept = sum(int(s.done[np.arange(s.n) // s.shard_size].sum()) for s in splits)
    say(f"{store.path}: {kept:,} of {sum(s.n for s in splits):,} samples are in finished shards and kept "
        f"(shards of {store.meta['shard_size']:,}).")


def note_skipped(result: ExtractResult) -> None:
    """Name the inputs this extraction could not read (ten per split)."""
    for split, bad in result.skipped.items():
        examples = "; ".join(f"{key}: {why}" for key, why in list(bad.items())[:10])
        note(f"skipped {len(bad)} unreadable input(s) in {split}: {examples}"
             + (f"; ... and {len(bad) - 10} more (ExtractResult.skipped, or `featcache info "
                f"--json {result.path}`, has them all)" if len(bad) > 10 else ""))


def _run(cfg: ExtractConfig, backbone: Backbone, store: Store, images: Images, ds: Dataset,
         names: list[str], taps: list[int], batches: list[list], result: ExtractResult) -> None:
    device = torch.device(cfg.device)
    model = backbone.model
    channel_scale = None if store.channel_scale is None else torch.from_numpy(store.channel_scale).to(device)
    loader = DataLoader(images, batch_sampler=batches,
                        num_workers=cfg.workers, collate_fn=collate,
                        pin_memory=device.type == "cuda")
    layout = _layout(backbone, ds)
    shape = (len(taps), layout.tokens, layout.width)
    unit = "clips" if ds.video else "views" if cfg.views > 1 else "img"  # what the bar counts
    sizes = [store.split(n).shard_size for n in names]
    writer = ShardWriter(store)
    readback = Readback(device)
    shard: Shard | None = None
    pending: tuple | None = None  # the previous batch, filed into its shard after this one is queued
    t0 = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    with writer, Progress(*columns, console=console) as bar:  # (the writer: done with it, or stopped)
        task = bar.add_task(f"extract on {cfg.device} -> {escape(str(result.path))}",
                            total=sum(map(len, batches)), rate="")
        done = read = 0  # inputs through, and those that could be read (the rate counts these)
        for items, batch, ok, reasons in loader:
            sid, first = items[0]
            if shard is None or (shard.split, shard.index) != (names[sid], first // sizes[sid]):
                if pending:
                    shard.fill(*pending)
                    pending = None
                if shard is not None:
                    _flush(writer, shard, result)
                shard = Shard.empty(names[sid], ds.splits[names[sid]], first // sizes[sid],
                                    sizes[sid], shape, cfg.dtype)
            if batch is not None:
                z = forward_taps(model, batch.to(device, non_blocking=True), taps, cfg.precision)
                encoded = readback.start([*encode(z, cfg.dtype, channel_scale), span(z)])
            else:
                encoded = None
            if pending:
                shard.fill(*pending)
            pending = (items, encoded, ok, reasons)
            done, read = done + len(items), read + int(ok.sum())
            dt = time.perf_counter() - t0
            bar.update(task, completed=done, rate=f"{read / dt:.1f} {unit}/s, "
                       f"{human_bytes(read * result.plan.bytes_per_sample / dt)}/s")
        if pending:
            shard.fill(*pending)
        if shard is not None:
            _flush(writer, shard, result)
    result.seconds = time.perf_counter() - t0


def _flush(writer: ShardWriter, shard: Shard, result: ExtractResult) -> None:
    writer.put(shard)
    result.written[shard.split] = result.written.get(shard.split, 0) + shard.stored
    if shard.skipped:
        result.skipped.setdefault(shard.split, {}).update(shard.skipped)
