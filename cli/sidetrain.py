"""`sidetrain`: stage two. A thin skin over sidetrain.fit, sweep, evaluate_run and predict."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from featcache import UserError, location
from featcache.console import make_console
from sidetrain import FitConfig, evaluate_run, fit, predict, sweep
from sidetrain.run import run_store

from .common import emit_json, make_app, run
from .tables import results_table

app = make_app("Train LoSA side networks and probes from a featcache store.")
out = make_console()

HELP = {
    "cache": "Store written by `featcache extract`: a folder or a URL (s3://bucket/cache/name).",
    "method": "losa (side network + head), linear (a linear probe) or mlp (an MLP head).",
    "rank": "LoSA rank r of every low-rank mixer (channel and token); 1..min(width, tokens per "
            "frame). Video's temporal mixer uses min(r, frames).",
    "variant": "LoSA recurrence: A (h_i = h_{i-1} + g(z_i + h_{i-1})), B (r_i = z_i + g(r_{i-1})) "
               "or C (h_i = g(z_i + h_{i-1})); auto (default): B for images, A for video, each "
               "the best measured (docs/losa.md).",
    "order": "Mixer order: channel-token, token-channel, or alternate (channel mixing at the 1st, "
             "3rd, ... tapped layer, token mixing at the others).",
    "head_input": "What the head reads: last4 (default: cls+mean of the last 4 taps, or of "
                  "all when --taps leaves fewer; DINOv2's strong probe; the best for LoSA and "
                  "probes in docs/losa.md), pool (the backbone's own feature), cls+mean (class "
                  "and mean patch token) or all (cls+mean of every tap, Head2Toe-style).",
    "dropout": "Dropout on LoSA's updates (and in the MLP head).",
    "mlp_hidden": "Hidden width of the mlp head.",
    "lr": "Peak AdamW learning rate (linear warm-up, cosine decay to zero).",
    "weight_decay": "AdamW weight decay.",
    "seed": "Seed for initialisation and data order.",
    "epochs": "Passes over the train split.",
    "batch_size": "Samples per step.",
    "taps": "Which of the store's taps to use: all, last:M (its last M), every:K (every K-th, "
            "counting back from its last) or block indices like 3,7,11. The head reads the last ones.",
    "warmup": "Share of all steps spent warming the learning rate up.",
    "label_smoothing": "Label smoothing of the cross-entropy loss.",
    "grad_clip": "Clip the global gradient norm to this (0: off).",
    "zero_init": "Start LoSA's up-projections at zero, so training starts at the probe.",
    "temporal": "Video stores: LoSA mixes tokens across frames (a temporal mixer summed with "
                "the spatial one). --no-temporal mixes within frames only.",
    "prefix_mixing": "join: class/register tokens take part in token mixing (of their frame); "
                     "channel: they get channel mixing only.",
    "precision": "fp32, or autocast bf16 / fp16 (with loss scaling) on CUDA; ignored on CPU.",
    "device": "auto (cuda where torch sees a GPU, else cpu; $FEATCACHE_DEVICE overrides auto), "
              "cpu, cuda or cuda:N.",
    "train_device": "auto (cuda where torch sees a GPU, else cpu; $FEATCACHE_DEVICE overrides auto), "
                    "cpu, cuda or cuda:N. A run is recorded with its device and resumes only there.",
    "preload": "Read the train and val splits (the taps trained on) into the device's memory "
               "once, before the first epoch, and draw every batch there: on a GPU with room, "
               "later epochs run at the GPU's own speed (streamed, the host's copies set the "
               "pace). The same batches and results; refused before the first epoch when "
               "they would leave training less than a fifth of the free memory.",
    "compile": "Run LoSA's training step through torch.compile, which fuses its many small "
               "operations into few kernels: after a minute or so of compiling (per "
               "configuration in a sweep), steps ran 1.4x (ViT-S, 112 px) and 1.17x (ViT-B, "
               "224 px) as fast on a 2-core CPU. The results equal an uncompiled run's up to "
               "float rounding (with --dropout, its masks are drawn otherwise); needs a C++ "
               "compiler on a CPU (Triton on a GPU).",
    "json": "Print the result as JSON on stdout.",
}


@app.callback()
def _group() -> None:
    """Keeps the commands subcommands (typer collapses one-command apps)."""


@app.command("fit")
def fit_cmd(
    cache: str = typer.Option(..., help=HELP["cache"]),
    method: str = typer.Option("losa", help=HELP["method"]),
    rank: int = typer.Option(16, help=HELP["rank"]),
    variant: str = typer.Option("auto", help=HELP["variant"]),
    order: str = typer.Option("channel-token", help=HELP["order"]),
    head_input: str = typer.Option("last4", help=HELP["head_input"]),
    dropout: float = typer.Option(0.0, help=HELP["dropout"]),
    zero_init: bool = typer.Option(True, help=HELP["zero_init"]),
    temporal: bool = typer.Option(True, help=HELP["temporal"]),
    prefix_mixing: str = typer.Option("join", help=HELP["prefix_mixing"]),
    mlp_hidden: int = typer.Option(512, help=HELP["mlp_hidden"]),
    taps: str = typer.Option("all", help=HELP["taps"]),
    epochs: int = typer.Option(10, help=HELP["epochs"]),
    lr: float = typer.Option(1e-3, help=HELP["lr"]),
    weight_decay: float = typer.Option(1e-4, help=HELP["weight_decay"]),
    warmup: float = typer.Option(0.05, help=HELP["warmup"]),
    label_smoothing: float = typer.Option(0.0, help=HELP["label_smoothing"]),
    grad_clip: float = typer.Option(1.0, help=HELP["grad_clip"]),
    batch_size: int = typer.Option(64, help=HELP["batch_size"]),
    seed: int = typer.Option(0, help=HELP["seed"]),
    precision: str = typer.Option("fp32", help=HELP["precision"]),
    device: str = typer.Option("auto", help=HELP["train_device"]),
    preload: bool = typer.Option(False, help=HELP["preload"]),
    compile_: bool = typer.Option(False, "--compile/--no-compile", help=HELP["compile"]),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run folder. Default: "
                                           "./runs/<store>-<method>[-r<rank>]-s<seed>."),
    as_json: bool = typer.Option(False, "--json", help=HELP["json"]),
) -> None:
    """Train one configuration; pick the epoch with the best val accuracy; score it on test.

    The run folder gets config.json, metrics.jsonl, curves.png, summary.json,
    adapter.safetensors (the side network and head only) and checkpoint.pt. Rerunning the
    same command after a crash resumes from the last finished epoch.
    """
    r = fit(FitConfig(cache=cache, method=method, rank=rank, variant=variant, order=order,
                      head_input=head_input, dropout=dropout, zero_init=zero_init,
                      temporal=temporal, prefix_mixing=prefix_mixing, mlp_hidden=mlp_hidden, taps=taps,
                      epochs=epochs, lr=lr, weight_decay=weight_decay, warmup=warmup,
                      label_smoothing=label_smoothing, grad_clip=grad_clip, batch_size=batch_size,
                      seed=seed, precision=precision, device=device, preload=preload, compile=compile_,
                      out=out_dir))
    if as_json:
        emit_json(r.to_json())
        return
    out.print(results_table([r]))
    out.print(f"run: {r.run}")


def _grid(**lists: str) -> dict[str, list]:
    casts = {"rank": int, "seed": int, "mlp_hidden": int, "lr": float, "dropout": float,
             "weight_decay": float, "warmup": float, "label_smoothing": float, "grad_clip": float}
    grid = {}
    for key, text in lists.items():
        try:
            grid[key] = [casts.get(key, str)(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--{key.replace('_', '-')} takes a comma-separated list, not '{text}'") from None
    return grid


@app.command("sweep")
def sweep_cmd(
    cache: str = typer.Option(..., help=HELP["cache"]),
    method: str = typer.Option("losa,linear", help="Comma list. " + HELP["method"]),
    rank: str = typer.Option("16", help="Comma list. " + HELP["rank"]),
    lr: str = typer.Option("1e-3", help="Comma list. " + HELP["lr"]),
    variant: str = typer.Option("auto", help="Comma list. " + HELP["variant"]),
    order: str = typer.Option("channel-token", help="Comma list. " + HELP["order"]),
    head_input: str = typer.Option("last4", help="Comma list. " + HELP["head_input"]),
    dropout: str = typer.Option("0", help="Comma list. " + HELP["dropout"]),
    prefix_mixing: str = typer.Option("join", help="Comma list. " + HELP["prefix_mixing"]),
    mlp_hidden: str = typer.Option("512", help="Comma list. " + HELP["mlp_hidden"]),
    weight_decay: str = typer.Option("1e-4", help="Comma list. " + HELP["weight_decay"]),
    warmup: str = typer.Option("0.05", help="Comma list. " + HELP["warmup"]),
    label_smoothing: str = typer.Option("0", help="Comma list. " + HELP["label_smoothing"]),
    grad_clip: str = typer.Option("1", help="Comma list. " + HELP["grad_clip"]),
    seed: str = typer.Option("0", help="Comma list. " + HELP["seed"]),
    zero_init: bool = typer.Option(True, help=HELP["zero_init"]),
    temporal: bool = typer.Option(True, help=HELP["temporal"]),
    taps: str = typer.Option("all", help=HELP["taps"]),
    epochs: int = typer.Option(10, help=HELP["epochs"]),
    batch_size: int = typer.Option(64, help=HELP["batch_size"]),
    precision: str = typer.Option("fp32", help=HELP["precision"]),
    device: str = typer.Option("auto", help=HELP["train_device"]),
    preload: bool = typer.Option(False, help=HELP["preload"]),
    compile_: bool = typer.Option(False, "--compile/--no-compile", help=HELP["compile"]),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for the runs, sweep.json "
                                           "and pareto.png. Default: runs/<store>-sweep."),
    as_json: bool = typer.Option(False, "--json", help=HELP["json"]),
) -> None:
    """Train every combination of the comma lists, each batch read once and fed to every model.

    One pass over the data per epoch (per seed) serves all configurations, so a sweep costs
    far less than running them one by one; each still gets exactly what `fit` would give.
    Prints the table (best val first) and writes pareto.png (accuracy against parameters).
    """
    grid = _grid(method=method, rank=rank, lr=lr, variant=variant, order=order,
                 head_input=head_input, dropout=dropout, prefix_mixing=prefix_mixing,
                 mlp_hidden=mlp_hidden, weight_decay=weight_decay, warmup=warmup,
                 label_smoothing=label_smoothing, grad_clip=grad_clip, seed=seed)
    out_dir = out_dir or Path("runs") / f"{location.name(cache)}-sweep"
    results = sweep(FitConfig(cache=cache, zero_init=zero_init, temporal=temporal, taps=taps,
                              epochs=epochs, batch_size=batch_size, precision=precision,
                              device=device, preload=preload, compile=compile_), grid, out_dir)
    results.sort(key=lambda r: (r.val_acc is None, -(r.val_acc or 0), r.val_loss))  # (None: stopped at once)
    if as_json:
        emit_json([r.to_json() for r in results])
    else:
        many = "s" * (len(results) != 1)
        out.print(results_table(results, title=f"sweep of {len(results)} configuration{many} (best val first)",
                                names=True))
        out.print(f"runs, sweep.json, pareto.png: {out_dir}")
    if results and all(r.failed for r in results):  # (some stopping is a sweep's normal lot)
        raise UserError(f"every configuration stopped early ({results[0].failed})")


@app.command("eval")
def eval_cmd(run_dir: Path = typer.Option(..., "--run", help="A run folder from fit or sweep."),
             cache: Optional[str] = typer.Option(None, help="A store (folder or URL) with the same backbone, "
                                                 "taps and classes. Default: the one the run was trained on."),
             device: str = typer.Option("auto", help=HELP["device"]),
             as_json: bool = typer.Option(False, "--json", help=HELP["json"])) -> None:
    """Accuracy of a trained adapter on every complete split of a store."""
    accs = evaluate_run(run_dir, cache, device)
    store = run_store(run_dir, cache)
    counts = {split: int((store.split(split).labels >= 0).sum()) for split in accs}
    if as_json:
        emit_json({split: {"accuracy": acc, "samples": counts[split]} for split, acc in accs.items()})
        return
    for split, acc in accs.items():
        out.print(f"{split}: {100 * acc:.2f}% of {counts[split]:,} samples")


@app.command("predict")
def predict_cmd(images: list[Path] = typer.Argument(..., metavar="FILES", help="Image files, or "
                                                     "video files for a run trained on a video store "
                                                     "(frames sampled as the store recorded; whole clips)."),
                run_dir: Path = typer.Option(..., "--run", help="A run folder from fit or sweep."),
                weights: Optional[Path] = typer.Option(None, help="The backbone weights file the "
                                                       "store was extracted with, if it came from one "
                                                       "(default: that file's name in the current "
                                                       "folder, if its sha256 matches)."),
                device: str = typer.Option("auto", help=HELP["device"]),
                top: int = typer.Option(1, help="How many classes to give per file, likeliest "
                                        "first (each with its probability)."),
                as_json: bool = typer.Option(False, "--json", help=HELP["json"])) -> None:
    """Classify raw images or videos with the frozen backbone and a run's adapter (no cache needed).

    Prints one line per file: its path, then class and probability (tab-separated), `--top`
    pairs of them. A file that cannot be read is reported (an "error" entry with --json) and
    the others are still classified; the exit status is then 1."""
    preds = predict(run_dir, images, weights, device, top=top)
    if as_json:
        emit_json(preds)
    for p in preds:
        if "error" in p:
            print(f"error: {p['error']}", file=sys.stderr)
        elif not as_json:
            print("\t".join([p["path"]] + [f"{c['class']}\t{c['prob']:.3f}" for c in p.get("top", [p])]))
    if any("error" in p for p in preds):
        raise typer.Exit(1)


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
