"""`make demo-video`: a video task where time matters, end to end, offline, in minutes.

Writes short clips of a real Fashion-MNIST item moving left, right, up or down (any one
frame looks the same for a move and its reverse), extracts 8 frames per clip with a small
ViT, then trains from the one store, in one pass: the frame-averaged linear probe, LoSA
mixing within frames only, and LoSA mixing within and across frames.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from featcache import ExtractConfig, extract, open_store
from featcache.console import make_console
from featcache.sources.moving_clips import write_moving_clips
from sidetrain import FitConfig, train_many

from .common import clear_stale_demo_runs, clear_stale_demo_store, make_app, run
from .demo import which_weights
from .tables import results_table

app = make_app(__doc__.splitlines()[0])
out = make_console()


@app.command()
def demo_video(
    model: str = typer.Option("vit_tiny", help="Backbone (timm name or alias)."),
    weights: Optional[Path] = typer.Option(None, help="Local weights file for --model."),
    img_size: int = typer.Option(64, help="Frame resolution given to the backbone. LoSA's --rank "
                                 "may not exceed the tokens per frame: 64 px gives a /16 model 17."),
    rank: int = typer.Option(16, help="LoSA rank."),
    frames: int = typer.Option(8, help="Frames per clip."),
    clips: int = typer.Option(60, help="Train clips per direction (val: a third, test: two thirds)."),
    epochs: int = typer.Option(20, help="Training epochs for each method."),
    taps: str = typer.Option("every:2", help="Blocks to extract and train on."),
    head_input: str = typer.Option("pool", help="What every head reads (pool: as in the table of "
                                   "docs/losa.md \"Video\"; sidetrain's default is last4)."),
    data_root: Path = typer.Option(Path("data"), help="Where the generated clips go."),
    cache_root: Path = typer.Option(Path("cache"), help="Where the store goes."),
    runs_root: Path = typer.Option(Path("runs"), help="Where the run folders go."),
) -> None:
    """Generate moving-object clips, extract them with MODEL, and compare the frame-averaged
    probe with LoSA without and with temporal mixing."""
    random_init, source = which_weights(model, weights)
    out.rule("featcache + sidetrain video demo: which way does it move?")
    out.print(f"backbone: {model} at {img_size} px, {frames} frames per clip, {source}")
    data = data_root / f"moving-{img_size}px-{clips}x{2 * frames}f"  # (clips of 2 x frames frames)
    if not data.exists():
        write_moving_clips(data, {"train": clips, "val": clips // 3, "test": 2 * clips // 3},
                           size=img_size, length=2 * frames)
    tag = f"moving-{model}-{img_size}px-{frames}f" + ("-random" if random_init else "")
    clear_stale_demo_store(cache_root / tag)
    r = extract(ExtractConfig(model=model, dataset=str(data), out=cache_root / tag, weights=weights,
                              random_init=random_init, img_size=img_size, frames=frames, taps=taps))
    runs = runs_root / (f"{tag}-{head_input}" + ("" if rank == 16 else f"-r{rank}"))
    clear_stale_demo_runs(runs, open_store(r.path))
    results = train_many(video_configs(r.path, runs, epochs, head_input=head_input, rank=rank))
    out.print(results_table(results, names=True, title=f"moving direction, 4 classes (chance 25 %), "
                                                       f"{model}{' RANDOM-INIT' if random_init else ''}"))
    out.print(f"clips: {data}   store: {r.path}   runs: {runs}")


def video_configs(cache: Path, runs: Path, epochs: int, seed: int = 0,
                  head_input: str = "pool", rank: int = 16) -> list[FitConfig]:
    """The comparison of docs/losa.md "Video" (measured with the pool head, rank 16)."""
    common = dict(cache=cache, epochs=epochs, batch_size=16, seed=seed, head_input=head_input)
    losa = dict(method="losa", lr=3e-3, rank=rank, **common)
    return [FitConfig(method="linear", lr=1e-2, out=runs / "probe-frame-averaged", **common),
            FitConfig(variant="A", temporal=False, out=runs / "losa-A-space-only", **losa),
            FitConfig(variant="A", out=runs / "losa-A-space+time", **losa),
            FitConfig(variant="B", out=runs / "losa-B-space+time", **losa)]


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
