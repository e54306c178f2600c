"""Video sources: which frames of a clip to take, and the one small interface that decodes them.

A clip becomes F frames, each run through the image backbone like a picture; the store keeps
the frame axis (docs/store-format.md). Two samplings:

- segment (TSN-style, the default): the clip cut into F equal segments, the middle frame of
  each, so the frames span the whole clip whatever its length;
- uniform: F frames at a fixed rate (`fps`, default: the video's own) from the clip's centre.

Which decoder reads a clip (`auto`, the default where decord is installed): decord for
H.264, VP8 and VP9, whose frames it picks as ffmpeg does (the same as PyAV, bit for bit, on
our tests' clips), PyAV for every other codec: with B-frames decord returned other frames
than those asked for, out of order in MPEG-4 Part 2 AVIs (Xvid: UCF101, HMDB51) and off
by one or two in MPEG-4 Part 2 MP4s and HEVC (the codec is read from the header first).
decord has had no release since 2021 and fails on some frame sizes (48 px wide H.264: "The
size must exactly match"), so a clip it cannot read is read again with PyAV before it
counts as unreadable. `FEATCACHE_VIDEO_DECODER=av|decord|auto` picks a policy; the store
records it, and a resume must read with the same.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..errors import UserError
from .base import Split

if TYPE_CHECKING:
    import av  # (imported where used: decord alone may be installed)

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv", ".flv",
                  ".ts", ".mts", ".m2ts", ".3gp", ".wmv"}
DECORD_CODECS = {"h264", "vp8", "vp9"}  # what `auto` lets decord read
SAMPLINGS = ("segment", "uniform")


class TooShort(ValueError):
    """The clip has fewer frames than the sampling needs (recorded as the skip reason)."""


@dataclass(frozen=True)
class FrameSampling:
    frames: int = 8
    sampling: str = "segment"  # segment | uniform
    fps: float | None = None  # uniform only: frames per second to sample at

    def __post_init__(self):
        if self.frames < 1:
            raise UserError("--frames must be at least 1")
        if self.sampling not in SAMPLINGS:
            raise UserError(f"--sampling must be one of {', '.join(SAMPLINGS)}, not '{self.sampling}'")
        if self.fps is not None and (self.sampling != "uniform" or self.fps <= 0):
            raise UserError("--fps needs --sampling uniform and a positive rate")

    def to_dict(self) -> dict:
        return asdict(self)

    def indices(self, n: int, native_fps: float, start: float | None = None,
                end: float | None = None) -> list[int]:
        """Frame numbers to decode from a video of n frames, within [start, end) seconds."""
        lo = 0 if start is None else max(0, int(round(start * native_fps)))
        hi = n if end is None else min(n, int(round(end * native_fps)))
        span = hi - lo
        if lo >= n:  # (an end past the clip's is cut to it, as ffmpeg's -to is)
            raise TooShort(f"starts at {start:g} s, past the clip's end ({n / native_fps:.1f} s)")
        if self.sampling == "segment":
            if span < self.frames:
                raise TooShort(f"too short: {max(span, 0)} frame(s), --frames {self.frames} needs "
                               f"at least {self.frames}")
            return [lo + int(span * (2 * k + 1) / (2 * self.frames)) for k in range(self.frames)]
        step = native_fps / self.fps if self.fps else 1.0
        need = (self.frames - 1) * step + 1
        if span < need:
            raise TooShort(f"too short: {max(span, 0)} frame(s), {self.frames} frames at "
                           f"{self.fps or native_fps:g} fps need {int(np.ceil(need))}")
        first = lo + (span - need) / 2
        return [int(first + k * step + 0.5) for k in range(self.frames)]  # half up: even gaps


Picker = Callable[[int, float], list[int]]  # (frame count, native fps) -> frame numbers


_STDERR = threading.Lock()  # one redirect at a time: two would restore each other's /dev/null


@contextmanager
def _no_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null: decord's C++ logger writes "ERROR opening: ..." there
    for every clip it cannot open, which PyAV then reads or the skip note explains. (For the
    milliseconds of an open, what other threads write there goes too: a progress bar's frame.)"""
    with _STDERR:
        sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:  # no stderr to keep quiet (2>&-)
            yield
            return
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _decode_decord(path: Path, pick: Picker) -> np.ndarray:
    import decord
    decord.logging.set_level(decord.logging.QUIET)  # ffmpeg's own lines: the skip records why
    with _no_stderr():
        reader = decord.VideoReader(str(path), num_threads=1)
    indices = pick(len(reader), float(reader.get_avg_fps()))
    return reader.get_batch(indices).asnumpy()


def _decode_av(path: Path, pick: Picker) -> np.ndarray:
    import av
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("the file holds no video stream (audio only?)")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 25)
        # MKV and WebM give no frame count: count the packets (no decoding), then decode
        # only up to the last frame wanted
        n = stream.frames or _count_packets(path)
        indices = pick(n, fps)
        wanted, frames, decoded = set(indices), {}, 0
        for decoded, frame in enumerate(container.decode(stream), 1):
            if decoded - 1 in wanted:
                frames[decoded - 1] = _upright(frame)
            if decoded > max(indices):
                break
        if len(frames) < len(wanted):
            raise TooShort(f"the container says {n} frames, only {decoded} decode")
        return np.stack([frames[i] for i in indices])


def _upright(frame: av.VideoFrame) -> np.ndarray:
    """A decoded frame as players show it: turned by its display matrix (phones store a
    portrait clip sideways and say so there). decord turns such clips itself or fails on
    them (PyAV then decodes), so that every decoder gives the clip upright."""
    rgb = frame.to_ndarray(format="rgb24")
    degrees = frame.rotation  # counterclockwise, as np.rot90 turns
    # a degenerate matrix (all zeros, from some broken writers) reads as -2**31: players and
    # ffmpeg show such a clip as stored
    turns = round(degrees / 90) % 4 if -360 <= degrees <= 360 else 0
    return np.rot90(rgb, turns)  # (a view: the frames are stacked into one copy)


def _count_packets(path: Path) -> int:
    import av
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


DECODERS = {"decord": _decode_decord, "av": _decode_av}
POLICIES = ("auto", *DECODERS)


def _codec(path: Path) -> str | None:
    """The first video stream's codec, from the container's header (None: none read)."""
    import av
    try:
        with av.open(str(path)) as container:
            return container.streams.video[0].codec_context.name if container.streams.video else None
    except Exception:  # (then PyAV decodes, and says what is wrong)
        return None


def decoder_name() -> str:
    """The decoding policy that runs: FEATCACHE_VIDEO_DECODER, else auto where decord is
    installed, else av (PyAV)."""
    name = os.environ.get("FEATCACHE_VIDEO_DECODER") or (
        "auto" if importlib.util.find_spec("decord") else "av")
    if name not in POLICIES:
        raise UserError(f"FEATCACHE_VIDEO_DECODER must be one of {', '.join(POLICIES)}, not '{name}'")
    if not importlib.util.find_spec("decord" if name == "auto" else name):
        raise UserError(f"FEATCACHE_VIDEO_DECODER={name}, but {'decord' if name == 'auto' else name} "
                        "is not installed here.")
    return name


def read_clip(path: Path, sampling: FrameSampling, start: float | None = None,
              end: float | None = None) -> list[Image.Image]:
    """The sampled frames of one video as RGB images; raises on an unreadable or short clip."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {path}")

    def pick(n: int, fps: float) -> list[int]:
        return sampling.indices(n, fps, start, end)
    policy = decoder_name()
    name = "decord" if policy == "decord" or (policy == "auto" and _codec(path) in DECORD_CODECS) else "av"
    try:
        frames = DECODERS[name](Path(path), pick)
    except TooShort:
        raise
    except Exception as e:
        if name == "av":
            raise
        try:
            frames = _decode_av(Path(path), pick)
        except Exception as again:
            raise RuntimeError(f"PyAV: {type(again).__name__}: {again}; decord: "
                               f"{type(e).__name__}: {e}") from None
    return [Image.fromarray(f) for f in frames]


class VideoSplit(Split):
    """Clips as samples: open(i) gives its F frames. A clip cut by start/end seconds (a
    manifest's columns) is keyed `path#t=start,end`, the media-fragment form."""

    def __init__(self, root: Path, paths: list[str], labels: np.ndarray, sampling: FrameSampling,
                 spans: list[tuple[float | None, float | None]] | None = None):
        self.spans = spans or [(None, None)] * len(paths)
        keys = [p if s == (None, None) else f"{p}#t={s[0] or 0:g},{'' if s[1] is None else f'{s[1]:g}'}"
                for p, s in zip(paths, self.spans)]
        super().__init__(keys, labels)
        self.root, self.paths, self.sampling = root, paths, sampling

    def open(self, i: int) -> list[Image.Image]:
        return read_clip(self.root / self.paths[i], self.sampling, *self.spans[i])

    def file(self, i: int) -> Path:
        return self.root / self.paths[i]
