"""A finished run used again: scored on a store (`eval`) or on raw images or videos (`predict`).

`predict` needs no cache: it runs the frozen backbone and the adapter on the files, with
the transform (and, for video, the frame sampling) the store recorded, and gives the same
predictions as the cached path. `load_predictor` is that model, for inputs of one's own.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import timm.data
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms import Compose

from featcache.console import note
from featcache.errors import UserError
from featcache.location import Location, exists, join
from featcache.models import TokenLayout, load_backbone
from featcache.precision import autocast, pick_device
from featcache.sources.base import to_rgb
from featcache.sources.imagefolder import IMAGE_SUFFIXES
from featcache.sources.video import FrameSampling, TooShort, read_clip
from featcache.store import Store, open_store

from .classifier import Classifier, ModelSpec, input_layers, make_classifier
from .endtoend import EndToEnd
from .loader import ShardLoader
from .train import read_json, require_readable, side_precision


def load_run(run: Path | str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json of the run, adapter weights)."""
    config = run_config(run)
    return config, load_file(str(require_readable(Path(run) / "adapter.safetensors")))


def run_config(run: Path | str) -> dict:
    """config.json of a finished run, or what is wrong with the path."""
    run = Path(run)
    if not run.exists():
        raise UserError(f"no run at {run}: the path does not exist.")
    inside = sorted(p.parent.name for p in run.glob("*/adapter.safetensors"))
    if inside:
        raise UserError(f"{run} holds runs (a sweep's?): pass one of them, e.g. --run {run / inside[0]} "
                        f"({len(inside)}: {', '.join(inside[:5])}{' ...' if len(inside) > 5 else ''}).")
    failed = _failed(run)  # (a rerun that trains on removes it)
    if failed and not (run / "adapter.safetensors").is_file():
        raise UserError(f"{run} stopped before its first epoch finished, so it holds no model: {failed}")
    if (run / "config.json").is_file() and not (run / "adapter.safetensors").is_file():
        raise UserError(f"{run} has not finished training (it is training now, or was stopped): rerun "
                        "the `sidetrain fit` or `sweep` command that began it, which resumes it from "
                        "its last finished epoch.")
    if not (run / "config.json").is_file() or not (run / "adapter.safetensors").is_file():
        raise UserError(f"{run} is not a finished sidetrain run (needs config.json and "
                        "adapter.safetensors); train one with `sidetrain fit`.")
    if failed:
        note(f"{run} stopped early: {failed}")
    return json.loads((run / "config.json").read_text())


def _failed(run: Path) -> str | None:
    """Why the run stopped, as its summary.json says (None: it did not, or there is none)."""
    summary = read_json(run / "summary.json")
    return summary.get("failed") if isinstance(summary, dict) else None


def _spec(config: dict) -> ModelSpec:
    """The run's ModelSpec; options added since the run was made take their defaults."""
    return ModelSpec(**{f.name: config[f.name] for f in fields(ModelSpec) if f.name in config})


def _model(config: dict, state: dict, norms: dict) -> Classifier:
    s = config["store"]
    model = make_classifier(_spec(config), norms, TokenLayout.from_dict(s["layout"]),
                            len(s["classes"]), len(config["blocks"]), config["seed"])
    model.load_state_dict(state)
    return model.eval()


def check_store(config: dict, store: Store) -> list[int]:
    """The store must hold the features the run was trained on; returns the tap positions."""
    s = config["store"]
    diffs = [_difference(k, s[k], store.meta[k])
             for k in ("model", "layout", "classes") if store.meta[k] != s[k]]
    if _eval_transform(s["transform"]) != _eval_transform(store.meta["transform"]):
        diffs.append(_difference("transform", _eval_transform(s["transform"]),
                                 _eval_transform(store.meta["transform"])))
    if store.meta["weights"]["sha256"] != s["weights"]["sha256"]:
        diffs.append("weights: the store was extracted with other weights (sha256 differs)")
    missing = [b for b in config["blocks"] if b not in store.taps]
    if missing:
        diffs.append(f"taps: the run uses blocks {missing} that the store does not hold")
    if diffs:
        raise UserError(f"{store.path} does not match the run's features: " + "; ".join(diffs))
    trained = s.get("precision", "fp32")
    if store.precision != trained:  # close features, not the same: worth a word, not a refusal
        note(f"the run was trained on tokens computed in {trained}, and "
             f"{store.path} holds tokens computed in {store.precision}: scores may "
             "differ slightly from those on the training store.")
    return [store.taps.index(b) for b in config["blocks"]]


def _eval_transform(transform: dict) -> dict:
    """The transform every stored sample went through: --views' augmentation of the train
    split (its policy and seed) is left out, so a run trained on augmented views is scored
    on any store of the same features."""
    return {k: v for k, v in transform.items() if k not in ("views", "view_policy", "view_seed")}


def _difference(name: str, run: object, store: object) -> str:
    """One readable line: only the entries of a record that differ, long values cut short."""
    if isinstance(run, dict) and isinstance(store, dict):
        parts = [_difference(f"{name}.{k}", run.get(k), store.get(k))
                 for k in sorted(run.keys() | store.keys()) if run.get(k) != store.get(k)]
        if parts:  # (none when one side lacks a key the other holds as None)
            return "; ".join(parts)
    if isinstance(run, list) and isinstance(store, list) and len(repr(run)) > 60:  # class names:
        # the first that differs, where the lists themselves would be cut short
        i = next((i for i, (a, b) in enumerate(zip(run, store)) if a != b), min(len(run), len(store)))
        at = lambda names: repr(names[i]) if i < len(names) else "nothing"  # noqa: E731
        return (f"{name}: run has {len(run)}, store has {len(store)}; the first difference is "
                f"at {i}: run {at(run)}, store {at(store)}")
    return f"{name}: run has {_short(run)}, store has {_short(store)}"


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def run_store(run: Path | str, cache: Location | None = None) -> Store:
    """The store at `cache`, or by default the one the run was trained on (as its config
    recorded it), refused when it is gone or was extracted again since."""
    if cache is not None:
        return open_store(cache)
    config = run_config(run)
    if not exists(join(config["cache"], "zarr.json")):
        raise UserError(f"the store {run} was trained on, {config['cache']}, is not there "
                        "any more: name one to score on with --cache.")
    store = open_store(config["cache"])
    was, now = config["store"].get("id"), store.meta.get("id")  # (older runs, stores: none)
    if was and now and was != now:
        raise UserError(f"{store.path} is not the extraction {run} was trained on (it was "
                        "extracted again since): name it with --cache to score on it anyway.")
    return store


def evaluate_run(run: Path | str, cache: Location | None = None, device: str = "auto") -> dict[str, float]:
    """Accuracy of a run's adapter on every complete split of a store (by default the one it
    was trained on: run_store)."""
    device = pick_device(device)
    config, state = load_run(run)
    store = run_store(run, cache)
    positions = check_store(config, store)
    model = _model(config, state, store.norms()).to(device)
    layers = input_layers(model, positions)
    precision = side_precision(config.get("precision", "fp32"), device)  # as the run was trained
    accs = {}
    for name in store.splits:
        if not store.split(name).complete:
            continue
        correct, n = torch.zeros((), dtype=torch.int64, device=device), 0  # read once: no sync per batch
        with torch.no_grad(), autocast(torch.device(device).type, precision):
            for b in ShardLoader(store, name, 256, shuffle=False, layers=layers, device=device,
                                  recycle=True).epoch(0):
                correct += (model(b.tokens).argmax(1) == b.labels).sum()
                n += len(b.labels)
        if n:  # (a split of unreadable inputs alone has nothing to score)
            accs[name] = correct.item() / n
    return accs


def _backbone_for(config: dict, weights: Path | None):
    """Rebuild the exact backbone the store was extracted with (checked by its hash)."""
    s = config["store"]
    source = s["weights"]["source"]
    img_size = s["transform"]["input_size"][-1]
    if source.startswith("random-init:seed=") and weights is not None:
        raise UserError(f"the run's store was extracted with a randomly initialised backbone "
                        f"({source}), not with weights from a file: leave out --weights.")
    if source.startswith("random-init:seed="):
        bb = load_backbone(s["model"]["name"], random_init=True, img_size=img_size,
                           seed=int(source.split("=")[1]))
        note(f"the run's backbone has RANDOM weights ({source}, as its store was extracted): its "
             "predictions only show that the pipeline runs.")
    elif source.startswith("file:") and weights is None:
        here = Path(source[5:])  # (the store keeps the file's name and hash, not where it lay)
        if not here.is_file():
            raise UserError(f"the run's backbone weights came from the file {here}: pass it "
                            "with --weights.")
        bb = load_backbone(s["model"]["name"], weights=here, img_size=img_size)
        if bb.weights["sha256"] != s["weights"]["sha256"]:
            raise UserError(f"./{here} is not the file of that name that the run's store was "
                            "extracted with (their weights differ): pass that one with --weights.")
        note(f"backbone weights: ./{here}, the file the run's store was extracted with (the same sha256).")
    else:
        bb = load_backbone(s["model"]["name"], weights=weights, img_size=img_size)
    if bb.weights["sha256"] != s["weights"]["sha256"]:
        raise UserError("these backbone weights differ from the ones the run's store was "
                        "extracted with (sha256 mismatch); pass the same --weights file.")
    return bb


def _pil(image: Image.Image | np.ndarray) -> Image.Image:
    """An image in memory as PIL: a numpy array (H, W[, C]) of uint8 is taken as such."""
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))


def _transforms(transform_config: dict, sampling: FrameSampling | None
                ) -> tuple[Callable, Callable[[Path | str], torch.Tensor]]:
    """The store's extraction transform, for an image in memory (PIL of any mode, or a uint8
    array), and a reader of one file as the extraction read it: an image (C, H, W) or a clip
    of frames picked by `sampling` (F, C, H, W)."""
    plain = {k: v for k, v in _eval_transform(transform_config).items() if k != "video"}
    transform = Compose([_pil, to_rgb, timm.data.create_transform(
        **{**plain, "input_size": tuple(plain["input_size"])}, is_training=False)])
    kind = f"a video clip (the run was trained on clips of {sampling.frames} frames)" if sampling \
        else "an image (the run was trained on images)"

    def read(path: Path | str) -> torch.Tensor:
        if Path(path).is_dir():
            raise UserError(f"{path} is a folder: pass the files in it (e.g. {path}/*)")
        if sampling and Path(path).suffix.lower() in IMAGE_SUFFIXES:  # (decoders would say "too short")
            raise UserError(f"{path} is an image, and the run was trained on clips of "
                            f"{sampling.frames} frames: pass video files")
        try:
            if sampling:
                return torch.stack([transform(f) for f in read_clip(path, sampling)])
            with Image.open(path) as img:
                return transform(img)
        except Exception as e:
            raise UserError(f"cannot read {path} as {kind}: {e}") from None
    return transform, read


@dataclass
class Predictor:
    """A finished run as one model over raw inputs, backbone and adapter live (what
    `predict` runs). `read(path)` turns a file into what the store's extraction made of it,
    `transform(image)` an image in memory, and `clip(frames)` a video's decoded frames;
    calling the predictor on a batch of those, (B, C, H, W) or clips (B, F, C, H, W), gives
    class probabilities (B, classes)."""

    model: EndToEnd
    classes: list[str]
    transform: Callable
    read: Callable[[Path | str], torch.Tensor]
    device: torch.device
    precision: str  # the side network's autocast (CUDA only), as the run was trained
    sampling: FrameSampling | None  # a video run's: how a clip's frames were picked
    input_size: tuple[int, int, int]  # (C, H, W): what transform and read make of an image

    def clip(self, frames: list, fps: float | None = None) -> torch.Tensor:
        """A video's decoded frames (PIL images or uint8 arrays, in order) as the extraction
        took them: its F frames picked the same way, each transformed, (F, C, H, W). `fps`,
        the video's frame rate, is needed only where the store sampled at a set --fps."""
        if self.sampling is None:
            raise UserError("this run was trained on images: use predictor.transform(image)")
        if fps is None:
            if self.sampling.fps:  # the step between frames depends on the video's own rate
                raise UserError(f"this run's store sampled frames at {self.sampling.fps} per second: "
                                "give the video's frame rate, predictor.clip(frames, fps=...)")
            fps = 30.0  # (unused by the other samplings)
        try:
            picked = self.sampling.indices(len(frames), fps)
        except TooShort as e:
            raise UserError(f"{len(frames)} frames: {e}") from None
        return torch.stack([self.transform(frames[i]) for i in picked])

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        c, h, w = self.input_size
        if self.sampling is None:
            shape, dims, how = f"images (B, {c}, {h}, {w})", 4, "torch.stack([predictor.transform(image), ...])"
        else:
            f = self.sampling.frames
            shape, dims, how = (f"clips of {f} frames (B, {f}, {c}, {h}, {w})", 5,
                                "torch.stack([predictor.clip(frames), ...])")
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != dims or not inputs.is_floating_point() \
                or tuple(inputs.shape[-3:]) != self.input_size or (dims == 5 and inputs.shape[1] != f):
            what = f"{inputs.shape} {inputs.dtype}" if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise UserError(f"the predictor takes a batch of transformed {shape}, not {what}: "
                            f"e.g. predictor({how}), or predictor(predictor.read(path)[None]) "
                            "for a file.")
        with autocast(self.device.type, self.precision):
            return self.model(inputs.to(self.device)).float().softmax(1).cpu()


def load_predictor(run: Path | str, weights: Path | None = None, device: str = "auto") -> Predictor:
    """The run's adapter on the backbone its store was extracted with (rebuilt and checked
    by its hash: `weights` is the file it came from, if it came from one; by default the
    file of that name in the current folder, when its hash is the one recorded)."""
    device = pick_device(device)
    config, state = load_run(run)
    bb = _backbone_for(config, weights)
    model = _model(config, state, bb.final_norms())
    s = config["store"]  # the backbone in the store's precision, the side network in the run's
    live = EndToEnd(bb.model, config["blocks"], model, s.get("precision", "fp32")).to(device).eval()
    video = s["transform"].get("video")
    sampling = video and FrameSampling(video["frames"], video["sampling"], video["fps"])
    transform, read = _transforms(s["transform"], sampling)
    return Predictor(live, s["classes"], transform, read, torch.device(device),
                     side_precision(config.get("precision", "fp32"), device), sampling,
                     tuple(s["transform"]["input_size"]))


def predict(run: Path | str, images: list[Path | str] | Path | str, weights: Path | None = None,
            device: str = "auto", batch_size: int = 32, top: int = 1) -> list[dict]:
    """Class and probability for each image (or video, for a video run), backbone and
    adapter run live: {"path", "label", "class", "prob"} for the likeliest class, and with
    `top` > 1 also "top", the `top` likeliest as [{"label", "class", "prob"}, ...]. A file
    that cannot be read gets {"path", "error"} in its place, so that one bad file does not
    cost the others their answers."""
    if isinstance(images, (str, Path)):
        images = [images]
    if top < 1:
        raise UserError(f"--top must be at least 1, not {top}")
    predictor = load_predictor(run, weights, device)
    out: list[dict] = []
    for start in range(0, len(images), batch_size):
        slots, inputs = [], []  # where each readable file's answer goes in `out`
        for p in images[start:start + batch_size]:
            try:
                inputs.append(predictor.read(p))
                slots.append(len(out))
                out.append({"path": str(p)})
            except UserError as e:
                out.append({"path": str(p), "error": str(e)})
        if not inputs:
            continue
        for i, pr in zip(slots, predictor(torch.stack(inputs))):
            values, labels = pr.topk(min(top, len(pr)))
            ranked = [{"label": int(k), "class": predictor.classes[k], "prob": float(v)}
                      for v, k in zip(values, labels)]
            out[i] |= ranked[0] | ({"top": ranked} if top > 1 else {})
    return out
