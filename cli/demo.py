"""`make demo`: the whole pipeline on the embedded Fashion-MNIST set, offline, in minutes.

extract (a small ViT, all blocks tapped) -> fit a linear probe and LoSA from the same
store -> print both. Pretrained weights are used when they can be had (a --weights file,
or timm's weights from the Hugging Face cache or the hub); otherwise the backbone is
randomly initialised, and the output says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from featcache import ExtractConfig, UserError, extract, load_backbone, open_store
from featcache.console import make_console
from sidetrain import FitConfig, fit

from .common import clear_stale_demo_runs, make_app, run
from .tables import results_table

app = make_app(__doc__.splitlines()[0])
out = make_console()


def which_weights(model: str, weights: Optional[Path]) -> tuple[bool, str]:
    """(random_init, where the weights come from): the weights file given, else timm's
    pretrained weights where they load (the cache, or online), else random ones, said so."""
    if weights is not None:
        return False, f"weights from {weights}"
    try:
        load_backbone(model)
        return False, "timm's pretrained weights"
    except UserError as e:
        return True, f"RANDOM weights: no pretrained weights here ({e})"


@app.command()
def demo(
    model: str = typer.Option("vit_tiny", help="Backbone (timm name or alias)."),
    weights: Optional[Path] = typer.Option(None, help="Local weights file for --model."),
    img_size: int = typer.Option(112, help="Input resolution (small keeps the demo fast)."),
    epochs: int = typer.Option(30, help="Training epochs for each method."),
    rank: int = typer.Option(16, help="LoSA rank."),
    cache_root: Path = typer.Option(Path("cache"), help="Where the demo store goes."),
    runs_root: Path = typer.Option(Path("runs"), help="Where the run folders go."),
) -> None:
    """Extract the demo set with MODEL, then train and compare a linear probe and LoSA."""
    random_init, source = which_weights(model, weights)
    out.rule("featcache + sidetrain demo")
    out.print(f"backbone: {model} at {img_size} px, {source}")
    if random_init:
        out.print("[bold yellow]Random features only show that the pipeline runs; pass "
                  "WEIGHTS=file.safetensors (and MODEL=...) to `make demo` for real numbers.[/]")
    tag = f"demo-{model}-{img_size}px" + ("-random" if random_init else "")
    r = extract(ExtractConfig(model=model, dataset="demo", out=cache_root / tag, weights=weights,
                              random_init=random_init, img_size=img_size))
    clear_stale_demo_runs(runs_root / tag, open_store(r.path))
    results = [fit(FitConfig(cache=r.path, method="linear", epochs=epochs, lr=1e-2,
                             out=runs_root / tag / "linear")),
               fit(FitConfig(cache=r.path, method="losa", rank=rank, epochs=epochs, lr=1e-3,
                             out=runs_root / tag / f"losa-r{rank}"))]
    out.print(results_table(results, title=f"Fashion-MNIST demo (800 train / 200 val / 500 test), "
                                           f"{model}{' RANDOM-INIT' if random_init else ''}"))
    out.print(f"store: {r.path}   runs: {runs_root / tag}")


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
