"""Stage two: train side networks and probes from a store, nanoGPT-short.

One pass over the data feeds every configuration (`train_many`): each batch is read (and
int8 decoded) once, then each model takes its step. `fit` is that loop with one configuration,
so a sweep gives each configuration exactly what `fit` alone would (each trainer keeps its
own RNG state for dropout). Every epoch is evaluated on val; the best val epoch is kept
and is the only one scored on test. A checkpoint is written after every epoch, and a
killed run rerun with the same command resumes and ends as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from safetensors.torch import load_file, save

from featcache import location
from featcache.console import console, note, say
from featcache.errors import UserError, disk_full, is_int, is_number, require
from featcache.location import Location, is_url
from featcache.lock import writer
from featcache.plan import human_bytes
from featcache.precision import PRECISIONS, autocast, pick_device
from featcache.store import Store, open_store

from .classifier import (METHODS, ModelSpec, auto_variant, build_classifier, common, input_layers,
                         select_taps, trainable_parameters, unused_options)
from .clock import Clock, mark
from .loader import DATA_ORDER, ShardLoader, preload
from .plots import plot_curves

BAR = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
       TimeElapsedColumn(), TimeRemainingColumn())
CHECK_EVERY = 100  # steps between reads of the running loss: each read waits for the GPU
# what configurations trained in one pass share (every other option may differ; the layers
# read are the union of their taps)
ONE_PASS = ("cache", "batch_size", "epochs", "device", "precision", "preload")
# options that change how a run is computed, not what: left out of its records, so that a
# run goes on with or without them
NOT_RECORDED = ("preload", "compile")
NAN_HINT = ("lower --lr (a store made before featcache refused NaN or Inf tokens may hold "
            "some: `featcache verify` says).")


@dataclass(frozen=True)
class FitConfig:
    """One configuration to train: the options of `sidetrain fit` (the same names, with
    dashes for underscores; `sidetrain fit --help` explains each). Only `cache` is
    required; the run folder is `out`, by default runs/<store>-<method>[-r<rank>]-s<seed>."""

    cache: Location  # a store folder or URL
    method: str = "losa"
    rank: int = 16
    variant: str = "auto"  # B for images, A for video (docs/losa.md)
    order: str = "channel-token"
    head_input: str = "last4"  # the best head in both image studies (docs/losa.md)
    dropout: float = 0.0
    zero_init: bool = True
    temporal: bool = True  # video: LoSA also mixes across frames
    prefix_mixing: str = "join"  # prefix tokens in the token mixer (join) or channel mixing only
    mlp_hidden: int = 512
    taps: str = "all"  # which of the store's tapped blocks to train on (featcache --taps syntax)
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: float = 0.05  # share of all steps spent warming the lr up linearly
    label_smoothing: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    batch_size: int = 64
    seed: int = 0
    precision: str = "fp32"  # autocast on CUDA: bf16 or fp16 (with loss scaling)
    device: str = "auto"  # cuda where torch sees a GPU, else cpu (featcache.precision.pick_device)
    preload: bool = False  # train and val splits held in the device's memory (ShardLoader); not in config.json
    compile: bool = False  # LoSA's training step through torch.compile; not in config.json
    out: Path | None = None  # default: runs/<store>-<method>[-r<rank>]-s<seed>

    def spec(self) -> ModelSpec:
        names = {f.name for f in fields(ModelSpec)}
        return ModelSpec(**{k: v for k, v in asdict(self).items() if k in names})

    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        name = f"{location.name(self.cache)}-{self.method}" + (f"-r{self.rank}" if self.method == "losa" else "")
        return Path("runs") / f"{name}-s{self.seed}"

    def to_json(self) -> dict:
        """As records hold it: NOT_RECORDED left out; numpy numbers (from a grid made with
        np.arange) and paths as Python's."""
        return {k: str(v) if isinstance(v, Path) else v.item() if isinstance(v, np.generic) else v
                for k, v in asdict(self).items() if k not in NOT_RECORDED}


@dataclass
class FitResult:
    """A trained configuration: its run folder, trainable parameters, the best val epoch
    and its accuracies (test: None without a complete test split), its own training time,
    one metrics row per epoch (`history`), and why it stopped early if it did."""

    run: Path
    config: FitConfig
    params: int
    best_epoch: int
    val_acc: float | None  # None: stopped before its first epoch finished
    test_acc: float | None
    seconds: float
    history: list[dict] = field(default_factory=list)
    failed: str | None = None  # why training stopped early (NaN loss), if it did

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def rank(self) -> int | None:
        return self.config.rank if self.config.method == "losa" else None

    @property
    def val_loss(self) -> float:
        """The best epoch's val loss: what breaks a tie in val accuracy, as within a run."""
        return next((h["val_loss"] for h in self.history if h["epoch"] == self.best_epoch), math.inf)

    def to_json(self) -> dict:
        d = {k: v for k, v in vars(self).items() if k != "config"}
        return {**d, "run": str(self.run), "config": self.config.to_json()}


@contextmanager
def _compile_errors(first: bool) -> Iterator[None]:
    """A failure of torch.compile at the `first` compiled step (it compiles then: no C++
    compiler, an operation it cannot trace) said as what to do about it. Its own errors
    only: an out-of-memory error, say, stays what it is."""
    try:
        yield
    except torch._dynamo.exc.TorchDynamoException as e:  # (inductor's, a compiler's failing, too)
        if not first:
            raise
        why = (str(e).strip().splitlines() or [""])[0][:300]
        raise UserError(f"--compile: torch.compile failed on this machine ({type(e).__name__}: "
                        f"{why}). Train without --compile.") from e


def side_precision(precision: str, device: str | torch.device) -> str:
    """The precision the side network runs in: `--precision` autocasts on CUDA only."""
    return precision if torch.device(device).type == "cuda" else "fp32"


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _check_config(cfg: FitConfig) -> None:
    """Refuse values no training can use, before anything is read or written (a negative
    --grad-clip, say, would turn every step uphill)."""
    if not isinstance(cfg, FitConfig):
        raise UserError(f"training takes a FitConfig(cache=..., ...), not {type(cfg).__name__}")
    require(isinstance(cfg.cache, (str, Path)), "--cache", "a store's folder or URL", cfg.cache)
    for option, value in (("--epochs", cfg.epochs), ("--batch-size", cfg.batch_size),
                          ("--mlp-hidden", cfg.mlp_hidden), ("--rank", cfg.rank)):
        require(is_int(value) and value >= 1, option, "a whole number of at least 1", value)
    require(is_int(cfg.seed), "--seed", "a whole number", cfg.seed)
    require(is_number(cfg.lr) and cfg.lr > 0, "--lr", "a positive number", cfg.lr)
    for option, value in (("--weight-decay", cfg.weight_decay), ("--grad-clip", cfg.grad_clip)):
        require(is_number(value) and value >= 0, option, "a number of at least 0 (0: none)", value)
    require(is_number(cfg.warmup) and 0 <= cfg.warmup <= 1, "--warmup", "a share of the steps, 0 to 1",
            cfg.warmup)
    for option, value in (("--dropout", cfg.dropout), ("--label-smoothing", cfg.label_smoothing)):
        require(is_number(value) and 0 <= value < 1, option, "at least 0 and below 1", value)
    if cfg.precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not '{cfg.precision}'")
    if cfg.method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, not '{cfg.method}'")


def _check_store(cfg: FitConfig, store: Store) -> None:
    """Validate the request against the store (which must have complete train and val)."""
    for name in ("train", "val"):
        if name not in store.splits:
            raise UserError(f"{store.path} has no {name} split (it has {', '.join(store.splits)}); "
                            "extract a dataset with train and val splits, without a --split "
                            "that leaves one out (a folder without train/val/ levels gets a "
                            "stratified val split).")
        split = store.split(name)
        if not split.complete:
            busy = writer(store.path)
            raise UserError(f"split '{name}' of {store.path} is incomplete: " + (
                f"it is being written now by {busy}; train once that has finished." if busy else
                "rerun the `featcache extract` command that made it to finish it."))
        split.check_intact(store.path)  # (lost label files read as -1: not "no labelled samples")
        if not (split.labels >= 0).any():
            raise UserError(f"split '{name}' of {store.path} has no labelled samples: none of its "
                            f"inputs could be read (`featcache info --json {store.path}` says why).")
    if store.meta["weights"]["source"].startswith("random-init"):
        note(f"{store.path} was extracted with RANDOM backbone weights "
             "(--random-init): what trains on it only shows that the pipeline runs.")
    if side_precision(cfg.precision, cfg.device) != cfg.precision:
        note(f"--precision {cfg.precision} applies on CUDA; on "
             f"{cfg.device} training runs in fp32.")
    labels = store.split("train").labels
    counts = np.bincount(labels[labels >= 0], minlength=len(store.classes))
    if (counts > 0).sum() < 2:
        raise UserError(f"the train split of {store.path} holds one class ('{store.classes[counts.argmax()]}'): "
                        "a classifier needs two or more. Was the dataset folder one level above "
                        "the class folders?")
    val = store.split("val").labels
    val = val[val >= 0]
    if len(val) < 10 or len(np.unique(val)) < 2:
        note(f"val holds {len(val)} sample(s) of {len(np.unique(val))} "
             "class(es): the best epoch is picked on it, so that pick is mostly chance "
             "(extract with a larger --val-fraction, or a val/ folder).")
    absent = [store.classes[c] for c in np.flatnonzero(counts == 0)]
    if absent:
        note(f"{len(absent)} class(es) have no training sample, so the "
             f"head cannot learn them: {', '.join(absent[:10])}"
             f"{' ...' if len(absent) > 10 else ''}.")


def resolved(cfg: FitConfig, store: Store) -> FitConfig:
    """The configuration as trained: the device and LoSA's auto variant picked (recorded so,
    whatever auto comes to mean later), the options its method does not use at their defaults."""
    if cfg.method == "losa" and cfg.variant == "auto":
        cfg = replace(cfg, variant=auto_variant(store.layout))
    return replace(common(cfg), device=pick_device(cfg.device))


def recorded(cfg: FitConfig) -> dict:
    """A resolved configuration as its run's config.json holds it: the cache absolute, so
    that eval finds it from any folder."""
    cache = location.normalize(cfg.cache)
    return {**cfg.to_json(), "cache": str(cache if is_url(cache) else cache.resolve())}


def upgraded(saved: dict, cfg: FitConfig, now: dict) -> dict:
    """A run's config.json as this version records it, to compare with `now` (this version's
    record of `cfg`, resolved): runs recorded before caches were absolute, before auto was
    resolved, or with the options their method does not use, are the same runs."""
    saved = dict(saved)
    if saved.get("cache") == str(cfg.cache):  # before caches were absolute
        saved["cache"] = now["cache"]
    if saved.get("variant") == "auto" and now["method"] == "losa":  # before auto was resolved
        saved["variant"] = now["variant"]
    for k in unused_options(now["method"]):  # recorded as given, before they were left out
        saved[k] = now[k]
    return saved


class Trainer:
    """One configuration's model, optimiser, schedule, best epoch and checkpoints."""

    def __init__(self, cfg: FitConfig, store: Store, steps_per_epoch: int):
        self.run = cfg.run_dir()
        self.cfg = cfg = resolved(cfg, store)
        self.device = torch.device(cfg.device)
        self.positions = select_taps(store, cfg.taps)
        self.model = build_classifier(cfg.spec(), store, cfg.seed, len(self.positions)).to(self.device)
        self.layers = input_layers(self.model, self.positions)
        # A probe's readout is frozen: probes reading the same taps share it (see _pass) and
        # train their head alone on its output.
        self.probe = self.model.side is None
        self.net = self.model.head if self.probe else self.model
        # torch.compile fuses the side network's many small operations (a step on a GPU
        # waits on launching them). An epoch's last, smaller batch runs uncompiled rather
        # than compiling a second graph; a probe's linear head has nothing to fuse.
        self.compiled = torch.compile(self.model) if cfg.compile and not self.probe else None
        self.readout_key = (self.model.readout.head_input, tuple(self.layers))
        self.params = trainable_parameters(self.model)
        # fused: one kernel for all parameters. A LoSA step on ViT-S (112 px, batch 32, CPU)
        # took 76 ms against 87 with the default; and GradScaler need not sync with it
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                     lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     fused=self.device.type in ("cpu", "cuda"))
        self.precision = side_precision(cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler(enabled=self.precision == "fp16")
        self.total = cfg.epochs * steps_per_epoch
        self.warmup = max(1, int(cfg.warmup * self.total))
        self.step, self.epoch, self.seconds = 0, 0, 0.0
        self.history: list[dict] = []
        self.best: dict = {"val_acc": -1.0, "val_loss": math.inf, "epoch": -1}
        self.best_state: dict[str, torch.Tensor] = {}
        self.resumed = False  # whether the run folder held a checkpoint or a finished run
        self.compiled_once = False  # whether a compiled step has run (compiling it)
        self.finished = False  # whether the run folder held all its epochs when it was resumed
        self.failed: str | None = None
        self.rng = _get_rng(self.device)  # own dropout stream: a sweep trains as `fit` would
        # sums kept on the device and read once per epoch (and every CHECK_EVERY steps): a
        # read per step would make the CPU wait for the GPU instead of queueing the next one
        self.train_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.eval_sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss, correct
        self.eval_n = 0
        self.clock = Clock()
        self.config_json = {**recorded(cfg),
                            "blocks": [store.taps[p] for p in self.positions],
                            "trainable_params": self.params, "data_order": DATA_ORDER,
                            # id: which extraction of the store (it may be made again)
                            "store": {k: store.meta[k] for k in ("model", "weights", "transform", "taps",
                                                                 "layout", "dtype", "precision", "classes", "id")
                                      if k in store.meta}}  # (precision, id: not in older stores)

    # -- checkpoints -----------------------------------------------------------------
    def resume(self) -> None:
        """Continue from the run folder's checkpoint, or score a finished run whose checkpoint
        was deleted. A folder that holds another configuration's work, or other files, is
        refused; no run is begun here (see begin)."""
        ckpt, adapter = self.run / "checkpoint.pt", self.run / "adapter.safetensors"
        summary = read_json(self.run / "summary.json")
        final = (adapter.is_file() and isinstance(summary, dict) and summary.get("failed") is None
                 and summary.get("best_epoch", -1) >= 0)
        held = ckpt.is_file() or adapter.is_file() or summary is not None  # (a stopped run's too)
        if (self.run / "config.json").is_file() and held:
            self._check_same_run()
        elif not (self.run / "config.json").is_file() and self.run.is_dir() and any(
                not p.name.startswith(".") and p.suffix != ".tmp" for p in self.run.iterdir()):
            what = "a featcache store" if (self.run / "zarr.json").is_file() else "not a run folder"
            raise UserError(f"{self.run} exists, is not empty and is {what}: a run would write its "
                            "files among what it holds. Choose another --out (or move that folder).")
        if not ckpt.is_file() and not final:
            return
        self.resumed = True
        if ckpt.is_file():
            # tensors and plain containers only: a run folder shared in a lab runs no one's code
            state = torch.load(ckpt, map_location=self.device, weights_only=True)
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["opt"])
            self.scaler.load_state_dict(state["scaler"])
            for k in ("step", "epoch", "seconds", "history", "best", "best_state", "rng"):
                setattr(self, k, state[k])
            self.rng = [t.cpu() for t in self.rng]  # map_location moved them; torch takes them on the CPU
        else:  # finished, its checkpoint deleted to save space: its best epoch, as the adapter holds it
            self.best_state = load_file(str(require_readable(adapter)), device=str(self.device))
            self.history, self.seconds = summary["history"], summary["seconds"]
            self.best = next(h for h in self.history if h["epoch"] == summary["best_epoch"])
            self.epoch, self.step = self.cfg.epochs, self.history[-1]["step"]
        self.finished = self.epoch >= self.cfg.epochs
        say(f"{self.run} is complete ({self.epoch} epochs): scoring its best epoch again; "
            "use another --out to train anew." if self.finished else
            f"resuming {self.run} after epoch {self.epoch - 1}")

    def _check_same_run(self) -> None:
        """Refuse a run folder that holds another configuration, or an earlier extraction's run."""
        saved = upgraded(json.loads((self.run / "config.json").read_text()), self.cfg, self.config_json)
        was, now = saved.get("store", {}).get("id"), self.config_json["store"].get("id")
        if was and now and was != now and saved.get("cache") == self.config_json["cache"]:
            raise UserError(f"{self.run} was trained on an earlier extraction of {self.cfg.cache}: "
                            "the store there was extracted again since. Use another --out to "
                            "train on it (or delete that folder).")
        features = {k: v for k, v in self.config_json["store"].items() if k != "id"}
        config = {**self.config_json, "store": features | ({"id": was} if was else {})}  # (older runs lack it)
        differ = sorted(k for k in saved.keys() | config.keys()
                        if k != "out" and saved.get(k) != config.get(k))
        if differ:
            began = f"; it was trained on {saved.get('device')}: --device {saved.get('device')} continues it"
            plain = [k for k in differ if all(isinstance(v, (str, int, float, type(None)))
                                              for v in (saved.get(k), config.get(k)))]
            shown = [f"{k} ({saved.get(k)} there, {config.get(k)} here)" if k in plain else k for k in differ]
            options = {f.name for f in fields(FitConfig)} - {"cache", "out", "device"}  # (device: said above)
            name = self.run.name + "".join(f"-{k}{config[k]}" for k in plain if k in options)
            other = f" (e.g. --out {self.run.with_name(name.replace('/', '_'))})" if name != self.run.name else ""
            raise UserError(f"{self.run} holds a run with another configuration (it differs in "
                            f"{', '.join(shown)}){began if 'device' in differ else ''}. Use another "
                            f"--out{other} or delete that folder.")
        if now and not was and os.access(self.run, os.W_OK):  # a run from before stores had an
            _write_json(self.run / "config.json", self.config_json)  # id: told apart from now on

    def begin(self) -> None:
        """Make the folder of a run that trains, once every check has passed (an invalid
        configuration leaves no folder), and remove what an earlier attempt's end wrote (a
        loss that became NaN writes them): eval and predict find no adapter meanwhile, and an
        interrupted rerun leaves no summary of another attempt behind."""
        if not self.resumed:
            self.run.mkdir(parents=True, exist_ok=True)
            _write_json(self.run / "config.json", self.config_json)
        for name in ("adapter.safetensors", "summary.json"):
            (self.run / name).unlink(missing_ok=True)

    def _checkpoint(self) -> None:
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                 "scaler": self.scaler.state_dict(), "step": self.step, "epoch": self.epoch,
                 "seconds": self.seconds, "history": self.history, "best": self.best,
                 "best_state": self.best_state, "rng": self.rng}  # (written while no loss failed)
        # metrics first: a run killed between the two redoes the epoch and rewrites them whole,
        # where the other order lost the last epoch's row for good
        _write_whole(self.run / "metrics.jsonl", lambda f: f.write(
            "".join(json.dumps(row) + "\n" for row in self.history).encode()))
        _write_whole(self.run / "checkpoint.pt", lambda f: torch.save(state, f))

    @property
    def active(self) -> bool:
        return self.failed is None and self.epoch < self.cfg.epochs

    # -- training --------------------------------------------------------------------
    @torch.no_grad()
    def readout(self, tokens: torch.Tensor) -> torch.Tensor:
        """A probe's head input: what its model computes before the head, without a graph.
        Shared by probes (see _pass), so it must stay stateless and draw no random numbers."""
        with autocast(self.device.type, self.precision):
            return self.model.readout(tokens)

    def train_batch(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """One step on a batch: x is the tokens for LoSA, the readout for a probe."""
        cfg = self.cfg
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.total, cfg.lr, self.warmup)
        _set_rng(self.device, self.rng)
        self.model.train()
        compiled = self.compiled is not None and len(x) == cfg.batch_size
        with _compile_errors(compiled and not self.compiled_once):
            with autocast(self.device.type, self.precision):
                loss = F.cross_entropy((self.compiled if compiled else self.net)(x), labels,
                                       label_smoothing=cfg.label_smoothing)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        self.compiled_once |= compiled
        if cfg.grad_clip:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.rng = _get_rng(self.device)
        self.train_loss += loss.detach()
        self.step += 1
        if self.step % CHECK_EVERY == 0:
            self._check_loss()

    def _check_loss(self) -> None:
        """Stop at a NaN or infinite loss (found within CHECK_EVERY steps of its step)."""
        if self.failed:
            return
        value = self.train_loss.item()
        if not math.isfinite(value):
            self.failed = f"loss became {value} at epoch {self.epoch} (by step {self.step}); {NAN_HINT}"

    @torch.no_grad()
    def eval_batch(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        self.model.eval()
        with autocast(self.device.type, self.precision):
            logits = self.net(x).float()
        self.eval_sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum"),
                                       (logits.argmax(1) == labels).sum()])
        self.eval_n += len(labels)

    def take_eval(self) -> tuple[float, float | None]:
        """(mean loss, accuracy) of the pass just made; accuracy None when it saw no sample."""
        (loss, correct), n = self.eval_sums.tolist(), self.eval_n
        self.eval_sums.zero_()
        self.eval_n = 0
        return loss / max(n, 1), (correct / n if n else None)

    def end_epoch(self, steps: int, seconds: float) -> None:
        """Close the epoch: record metrics, keep the best state, checkpoint.

        `seconds`: this trainer's time in the epoch (its own work and its share of the rest)."""
        self._check_loss()
        val_loss, val_acc = self.take_eval()
        if self.failed is None and not math.isfinite(val_loss):  # weights gone bad at the epoch's end
            self.failed = f"val loss became {val_loss} at epoch {self.epoch}; {NAN_HINT}"
        if self.failed:  # the checkpoint stays the last finished epoch's; the adapter, the best one
            kept = self.best["epoch"]
            self.failed += (f" Kept the best epoch before it (epoch {kept}, val acc "
                            f"{100 * self.best['val_acc']:.1f}%)." if kept >= 0 else
                            " No epoch finished before it: nothing is kept.")
            return
        self.seconds += seconds
        row = {"epoch": self.epoch, "step": self.step, "train_loss": self.train_loss.item() / max(steps, 1),
               "val_loss": val_loss, "val_acc": val_acc, "lr": self.opt.param_groups[0]["lr"],
               "seconds": self.seconds}
        self.train_loss.zero_()
        self.history.append(row)
        # on a tie in accuracy (common on a small val split) the lower val loss wins, then the
        # earlier epoch
        if (val_acc, -val_loss) > (self.best["val_acc"], -self.best.get("val_loss", math.inf)):
            self.best = row
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.epoch += 1
        self._checkpoint()

    def finish(self, test_acc: float | None) -> FitResult:
        """Write the best epoch's adapter (none when no epoch finished: eval and predict then
        say the run is unfinished) and summary.json, unless a finished run holds them as they
        are (it is scored again, not rewritten: a colleague's run may be read-only)."""
        result = FitResult(run=self.run, config=self.cfg, params=self.params,
                           best_epoch=self.best["epoch"],
                           val_acc=self.best["val_acc"] if self.best["epoch"] >= 0 else None,
                           test_acc=test_acc, seconds=self.seconds, history=self.history,
                           failed=self.failed)
        summary = json.loads(json.dumps(result.to_json()))  # (as it reads back)
        if self.finished and (self.run / "adapter.safetensors").is_file():  # its adapter is as it was
            held = read_json(self.run / "summary.json")
            scores = ("best_epoch", "val_acc", "test_acc", "failed")  # (not the paths, as typed)
            if isinstance(held, dict) and all(held.get(k) == summary[k] for k in scores):
                return result
            if not os.access(self.run, os.W_OK):  # (a test split completed since, say)
                note(f"{self.run} is not yours to write: its summary.json keeps the scores it had.")
            else:
                _write_json(self.run / "summary.json", summary)
            return result
        plot_curves(self.history, self.run / "curves.png", title=self.run.name)  # (before the
        # adapter, whose presence makes a rerun take the run as finished and rewrite no more)
        if self.best_state:
            # as bytes, then written as any file: safetensors' own save_file makes it readable by
            # its owner alone (0600), whatever the umask, and a lab's colleagues could not load it
            adapter = save({k: v.contiguous().cpu() for k, v in self.best_state.items()},
                           metadata={"config": json.dumps(self.config_json), "epoch": str(self.best["epoch"])})
            _write_whole(self.run / "adapter.safetensors", lambda f: f.write(adapter))
        _write_json(self.run / "summary.json", summary)
        return result


def _write_whole(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """write(a temp file), then rename it over `path`: a crash or a full disk never leaves
    half a file (nor a half checkpoint to resume from)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
    except (OSError, RuntimeError) as e:  # torch's writer says "unexpected pos ...", the OSError behind it
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        if not (disk_full(e) or disk_full(e.__context__) or free < 2**26):  # a bug, or the disk's own error
            raise
        raise UserError(f"could not write {path}: no room left (the disk is full, or your quota; "
                        f"{human_bytes(free)} free on the disk). The run keeps what it wrote before: "
                        "free some space and rerun the same command to resume.") from None
    os.replace(tmp, path)


def require_readable(adapter: Path) -> Path:
    """`adapter`, or why this user cannot read it (safetensors would say "No such file")."""
    if not os.access(adapter, os.R_OK):
        raise UserError(f"{adapter} is not readable by this user: its owner can share it with "
                        f"`chmod a+r {adapter}` (runs made before 2026-11-28 were written 0600).")
    return adapter


def read_json(path: Path) -> object:
    """A JSON file's content, or None when it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: object) -> None:
    _write_whole(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def _get_rng(device: torch.device) -> list[torch.Tensor]:
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])


def _set_rng(device: torch.device, state: list[torch.Tensor]) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


def _pass(loader: ShardLoader, epoch: int, trainers: list[Trainer], union: list[int], train: bool,
          tick: Callable[[], None] = lambda: None) -> tuple[int, float]:
    """One pass over a split, each batch fed to every trainer.

    Probes that read the same taps through the same head input share one readout per batch
    (a sweep over a probe's lr then costs one readout, not eight).
    Returns (batches, wall seconds); each trainer's clock gets its own compute time and an
    even share of a readout it shares. `tick` is called after each batch (a progress bar)."""
    picks = [None if t.layers == union else torch.tensor([union.index(p) for p in t.layers],
                                                         device=loader.device) for t in trainers]
    readers = {}  # readout key -> the probes that share it
    for t in trainers:
        if t.probe:
            readers.setdefault(t.readout_key, []).append(t)
    device = loader.device
    batches, t0 = 0, time.perf_counter()
    for b in loader.epoch(epoch):
        readouts: dict[tuple, torch.Tensor] = {}
        for t, pick in zip(trainers, picks):
            if t.failed and train:  # (one stopped at a NaN is still scored: on test, its best epoch)
                continue
            start = mark(device)
            if t.probe and t.readout_key in readouts:
                x = readouts[t.readout_key]
            else:
                x = b.tokens if pick is None else b.tokens.index_select(1, pick)
                if t.probe:  # the first of its probes: compute the readout, split its time
                    x = readouts[t.readout_key] = t.readout(x)
                    sharers = [s for s in readers[t.readout_key] if not s.failed]
                    end = mark(device)
                    for s in sharers:
                        s.clock.add(start, end, 1 / len(sharers))
                    start = mark(device)
            (t.train_batch if train else t.eval_batch)(x, b.labels)
            t.clock.add(start, mark(device))
        batches += 1
        tick()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batches, time.perf_counter() - t0


def _check_together(configs: list[FitConfig]) -> list[FitConfig]:
    """Refuse configurations that cannot be trained in one pass, before anything is read;
    return them with their device picked (as run and recorded)."""
    for c in configs:
        _check_config(c)
        unused = [k for k in unused_options(c.method) if getattr(c, k) != getattr(ModelSpec, k)]
        if unused:
            note(f"{c.method} has no use for {', '.join('--' + k.replace('_', '-') for k in unused)}: "
                 "left out of its run.")
    configs = [replace(c, device=pick_device(c.device)) for c in configs]
    first = configs[0]
    for c in configs[1:]:
        diff = [k for k in ONE_PASS + ("seed",) if k != "cache" and getattr(c, k) != getattr(first, k)]
        if str(location.normalize(c.cache)) != str(location.normalize(first.cache)):
            diff.append("cache")
        if diff:
            raise UserError(f"configurations trained together must share {', '.join(diff)}")
    runs = [c.run_dir().resolve() for c in configs]
    same = sorted({str(r) for r in runs if runs.count(r) > 1})
    if same:
        raise UserError(f"several configurations would write the run folder {same[0]}: give "
                        "each its own `out` (sweep names them by what differs).")
    return configs


def _score_test(store: Store, trainers: list[Trainer], union: list[int], load: dict) -> list[float | None]:
    """Each trainer's best epoch's test accuracy (None without a complete test split, or
    when no epoch finished), from one pass over the test split."""
    for t in trainers:
        if t.best_state:
            t.model.load_state_dict(t.best_state)
    if "test" not in store.splits:
        note(f"{store.path} has no test split: each configuration is scored on val only.")
        return [None] * len(trainers)
    if not store.split("test").complete:
        note(f"the test split of {store.path} is incomplete: not scored.")
        return [None] * len(trainers)
    ok = [t for t in trainers if t.best_state]
    _pass(ShardLoader(store, "test", shuffle=False, **load), 0, ok, union, train=False)
    return [t.take_eval()[1] if t in ok else None for t in trainers]


def _compile_notes(configs: list[FitConfig], compiling: list[Trainer], train: ShardLoader) -> None:
    """What --compile will do, said before the wait it costs (compiling is silent)."""
    if any(c.compile and c.method != "losa" for c in configs):
        note("--compile applies to LoSA's step: a probe's head has nothing to fuse and runs as is.")
    if not compiling:
        return
    samples, batch = int(train.valid.sum()), configs[0].batch_size
    if samples < batch:
        note(f"--compile: the train split's {samples} samples make no full batch of {batch}, and only "
             "full batches run compiled: nothing is compiled (a smaller --batch-size would be).")
        return
    note(f"--compile: each LoSA configuration compiles its step at its first batch ({len(compiling)} "
         "here; 10-90 s each on a CPU, counted in its time).")
    if torch.device(configs[0].device).type == "cpu":  # torch's C++ toolchain lookup warns that
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # no CUDA is found


def train_many(configs: list[FitConfig]) -> list[FitResult]:
    """Train configurations that share ONE_PASS and the seed (which orders the batches) in
    one pass over the data per epoch. Returns one FitResult per configuration, in order."""
    configs = _check_together(configs)
    first = configs[0]
    # Denormal floats (GELU tails, LayerNorm gradients) made CPU steps 10x slower here
    # (measured: 5.4 s against 0.55 s per LoSA step); they carry no signal, so flush them.
    torch.set_flush_denormal(True)
    store = open_store(first.cache)
    _check_store(first, store)
    if store.layout.frames == 1 and any(c.method == "losa" and not c.temporal for c in configs):
        note(f"--no-temporal applies to video stores; {store.path} holds images: it changes nothing.")
    steps = len(ShardLoader(store, "train", first.batch_size, shuffle=True, seed=first.seed))
    compiled = sum(c.compile for c in configs)
    if compiled:  # each configuration of another shape compiles its own graph of the same
        # forward: past torch's limit (8) the others would run uncompiled, unsaid
        dynamo = torch._dynamo.config
        for name, value in (("recompile_limit", 2 * compiled), ("accumulated_recompile_limit", 4 * compiled)):
            name = name if hasattr(dynamo, name) else name.replace("recompile", "cache_size")  # (torch < 2.7)
            setattr(dynamo, name, max(getattr(dynamo, name), value))
    trainers = [Trainer(c, store, steps) for c in configs]
    union = sorted({p for t in trainers for p in t.layers})
    load = dict(batch_size=first.batch_size, layers=union, device=first.device, recycle=True)
    train = ShardLoader(store, "train", shuffle=True, seed=first.seed, **load)
    val = ShardLoader(store, "val", shuffle=False, **load)
    for t in trainers:
        t.resume()
    if first.preload and any(t.active for t in trainers):  # (not to score finished runs again)
        if torch.device(first.device).type == "cpu":
            note("--preload is for GPUs: on the CPU the page cache already holds what fits, and "
                 "a second copy in RAM saves little.")
        preload([train, val])  # both at once: refused if they do not fit together
    for t in trainers:
        if t.active:
            t.begin()
    _compile_notes(configs, [t for t in trainers if t.active and t.compiled is not None], train)
    with _saying_kept(trainers):  # (on Ctrl-C)
        for epoch in range(min(t.epoch for t in trainers), first.epochs):
            active = [t for t in trainers if t.active and t.epoch == epoch]
            if not active:
                continue
            with Progress(*BAR, console=console, transient=True,  # an epoch can take hours
                          disable=not (console.is_terminal or console.is_jupyter)) as bar:
                task = bar.add_task(f"epoch {epoch} on {first.device}", total=len(train) + len(val))
                steps_done, wall_train = _pass(train, epoch, active, union, True, lambda: bar.advance(task))
                _, wall_val = _pass(val, 0, active, union, False, lambda: bar.advance(task))
            own = [t.clock.take() for t in active]
            reading = max(0.0, wall_train + wall_val - sum(own)) / len(active)  # split evenly
            for t, seconds in zip(active, own):
                t.end_epoch(steps_done, seconds + reading)
                if t.failed:
                    console.print(f"[red]{escape(f'{t.run.name}: {t.failed}')}[/]")
                    continue
                row = t.history[-1]
                say(f"{t.run.name}  epoch {epoch:3d}  train loss {row['train_loss']:.4f}  "
                    f"val loss {row['val_loss']:.4f}  val acc {100 * row['val_acc']:.1f}%")
    test = _score_test(store, trainers, union, load)  # (streamed: read once)
    return [t.finish(acc) for t, acc in zip(trainers, test)]


@contextmanager
def _saying_kept(trainers: list[Trainer]) -> Iterator[None]:
    """On Ctrl-C, say what each run keeps: its finished epochs, in its checkpoint."""
    try:
        yield
    except KeyboardInterrupt:
        kept = [f"{t.run}: {t.epoch} of {t.cfg.epochs} epochs" for t in trainers if t.epoch and not t.finished]
        say(f"kept in the checkpoint{'s' * (len(kept) > 1)}: {'; '.join(kept)}." if kept else
            "stopped before any epoch finished: nothing to keep.")
        raise


def fit(cfg: FitConfig) -> FitResult:
    """Train one configuration from the store at `cfg.cache`; write its run folder."""
    result = train_many([cfg])[0]
    if result.failed:
        raise UserError(f"{result.run}: {result.failed}")
    return result
