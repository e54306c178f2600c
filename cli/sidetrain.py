"""`sidetrain`: stage two. A thin skin over sidetrain.fit."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from sidetrain import FitConfig, fit

from .common import emit_json, make_app, run
from .tables import results_table

app = make_app("Train LoSA side networks and probes from a featcache store.")
out = Console()


@app.callback()
def _group() -> None:
    """Keeps `fit` a subcommand (typer collapses one-command apps)."""


@app.command("fit")
def fit_cmd(
    cache: Path = typer.Option(..., help="Store folder written by `featcache extract`."),
    method: str = typer.Option("losa", help="losa (side network + head) or linear (head only, the probe)."),
    rank: int = typer.Option(16, help="LoSA rank r of every low-rank mixer (channel and token)."),
    epochs: int = typer.Option(10, help="Passes over the train split."),
    lr: float = typer.Option(1e-3, help="Peak AdamW learning rate (linear warm-up, cosine decay)."),
    weight_decay: float = typer.Option(1e-4, help="AdamW weight decay."),
    batch_size: int = typer.Option(64, help="Samples per step."),
    seed: int = typer.Option(0, help="Seed for initialisation and data order."),
    taps: str = typer.Option("all", help="Which of the store's tapped blocks to use: all, every:K, "
                             "last:M or block indices like 3,7,11. The head reads the last one."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run folder. Default: "
                                           "./runs/<store>-<method>[-r<rank>]-s<seed>."),
    device: str = typer.Option("cpu", help="cpu or cuda (or cuda:N)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Train on the train split, pick the epoch with the best val accuracy, score it on test.

    The run folder gets config.json, metrics.jsonl (one line per epoch), summary.json and
    adapter.safetensors (the side network and head only).
    """
    r = fit(FitConfig(cache=cache, method=method, rank=rank, epochs=epochs, lr=lr,
                      weight_decay=weight_decay, batch_size=batch_size, seed=seed, taps=taps, out=out_dir,
                      device=device))
    if as_json:
        emit_json({k: v for k, v in vars(r).items()})
        return
    out.print(results_table([r]))
    out.print(f"run: {r.run}")


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
