"""A video task where time matters: a real Fashion-MNIST item moving left, right, up or down.

Every clip starts at a random place on a plausible path, so any one frame (and the average
of the frames) is the same for a move and its reverse: only the order of the frames tells
the direction. A probe on frame-averaged features can at best tell horizontal from
vertical (50 %); a side network needs temporal mixing to get further. Written as mp4
(H.264 through PyAV) in class folders, so it reads like any video dataset.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .demo import DEMO_FILE

DIRECTIONS = {"down": (1, 0), "left": (0, -1), "right": (0, 1), "up": (-1, 0)}  # (dy, dx)


def _clip(sprite: np.ndarray, direction: tuple[int, int], size: int, length: int,
          rng: np.random.Generator) -> np.ndarray:
    """(length, size, size, 3) uint8 frames of `sprite` travelling half the canvas."""
    s = sprite.shape[0]
    travel = (size - s) // 2
    # the path starts anywhere that keeps the whole journey on the canvas
    start = rng.integers(0, size - s - travel * np.abs(direction) + 1)
    start = start + travel * np.maximum(-np.array(direction), 0)
    background = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
    frames = np.repeat(background[None], length, axis=0)
    colour = rng.uniform(0.6, 1.0, 3)
    for t in range(length):
        y, x = (start + np.round(np.array(direction) * travel * t / (length - 1))).astype(int)
        patch = frames[t, y:y + s, x:x + s]
        frames[t, y:y + s, x:x + s] = np.maximum(patch, (sprite[..., None] * colour).astype(np.uint8))
    return frames


def write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    """Frames (T, H, W, 3) uint8 as a lossless H.264 mp4 (of their yuv420p conversion).
    Lossless, so that a clip decodes to the same frames whatever bytes libx264 writes: at
    crf 18 it wrote a few clips in a hundred differently from one run to the next (even with
    one thread), which moved the video demo's scores."""
    import av
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"qp": "0"}
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())


def write_moving_clips(root: Path, per_class: dict[str, int], size: int = 64, length: int = 16,
                       fps: int = 8, seed: int = 0) -> Path:
    """Write root/<split>/<direction>/<n>.mp4, `per_class[split]` clips per direction.

    Sprites are the embedded demo's Fashion-MNIST items, scaled to a quarter of the canvas.
    The clips go to root.part, renamed to root once all are written: a run stopped half-way
    leaves no root that a later one would take as whole.
    """
    from PIL import Image
    rng = np.random.default_rng(seed)
    items = np.load(DEMO_FILE)["train_images"]
    s = max(size // 4, 8)
    part = root.with_name(root.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    for split, n in per_class.items():
        for name, direction in DIRECTIONS.items():
            for k in range(n):
                sprite = np.asarray(Image.fromarray(items[rng.integers(len(items))]).resize((s, s)))
                write_video(part / split / name / f"{k:04d}.mp4",
                            _clip(sprite, direction, size, length, rng), fps)
    part.rename(root)
    return root
