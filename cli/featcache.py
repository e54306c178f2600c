"""`featcache`: stage one. A thin skin over featcache.extraction, info, verify and catalog."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from featcache import UserError, open_store  # (extract and verify load torch: imported by their commands)
from featcache.catalog import find_stores
from featcache.console import escape, make_console
from featcache.info import store_info
from featcache.location import is_url, normalize, usage
from featcache.plan import human_bytes
from featcache.store import damaged, near

from .common import emit_json, make_app, run

app = make_app("Run a frozen ViT over a dataset once; keep every tapped block's tokens in a Zarr store.")
out = make_console()


@app.command("extract")
def extract_cmd(
    model: str = typer.Option(..., help="timm ViT name (optionally with a pretrained tag, e.g. "
                              "vit_base_patch16_224.augreg2_in21k_ft_in1k) or an alias: vit_tiny, "
                              "vit_small, vit_base, vit_large, deit_*, dinov2_small/base/large/giant, "
                              "dinov2_*_reg, clip_base, siglip_base."),
    dataset: str = typer.Option(..., help="'demo' (1,500 embedded Fashion-MNIST images); a folder in "
                                "ImageFolder layout (<root>/<class>/<img or video>, optionally under "
                                "train/ val/ test/); a .csv (with a header row) or .jsonl manifest with the "
                                "columns path,label and optionally split, and start,end (seconds) "
                                "for videos; labels are class names or integers; "
                                "vtab1k:<task>; or a name: mnist, fashion-mnist (IDX files), "
                                "cifar10, cifar100, svhn, stl10, flowers102, dtd, food101, "
                                "oxford-pets, eurosat, caltech101, places365 (torchvision). "
                                "Without a val split, a seeded stratified one is made from train."),
    data_root: Optional[Path] = typer.Option(None, help="Where named datasets or VTAB-1k task folders "
                                             "are (default: data/<name>; fashion-mnist: "
                                             "/usr/share/datasets/fashion-mnist), or what a manifest's "
                                             "paths are relative to (default: its own folder)."),
    download: bool = typer.Option(False, help="Fetch a named dataset into --data-root (needs network)."),
    split: Optional[str] = typer.Option(None, help="Only these splits, comma-separated (e.g. train,val)."),
    per_class: Optional[int] = typer.Option(None, help="At most N samples of each class per split (seeded)."),
    views: int = typer.Option(1, help="Store K augmented views of every train image (random 60-100 % "
                              "crops and flips), as K samples sharing a key: caching otherwise "
                              "removes augmentation."),
    frames: int = typer.Option(8, help="Video only (ignored for images): frames per clip; each runs "
                               "through the ViT and the store keeps the frame axis."),
    sampling: str = typer.Option("segment", help="Video only: segment (the middle frame of each of F "
                                 "equal segments: spans the whole clip) or uniform (a window of F "
                                 "frames at --fps, centred in the clip). Too-short clips are "
                                 "skipped and recorded."),
    fps: Optional[float] = typer.Option(None, help="Video, --sampling uniform only: frames per "
                                        "second (default: the video's own rate)."),
    out_path: Optional[str] = typer.Option(None, "--out", help="Store folder, or an fsspec URL such as "
                                           "s3://bucket/cache/name (one writer; credentials and "
                                           "endpoint the fsspec way, see docs/labs.md). "
                                           "Default: ./cache/<dataset name>."),
    weights: Optional[Path] = typer.Option(None, help="Local weights file (.safetensors, .pth, or a "
                                           "big_vision .npz) for --model; position embeddings are "
                                           "resampled to the image size."),
    random_init: bool = typer.Option(False, "--random-init", help="Seeded random weights: for trying the "
                                     "pipeline offline; the features carry no pretrained knowledge."),
    dtype: str = typer.Option("fp16", help="Stored precision: fp16 (default), bf16, int8 (a quarter "
                              "of fp32, ~0.5-0.8 % error; see docs/store-format.md) or fp32 (exact)."),
    precision: str = typer.Option("fp32", help="The backbone's compute precision: fp32 (default), "
                                  "or fp16 / bf16 autocast, the fast path on a GPU (on a CPU "
                                  "without 16-bit matrix units several times slower). On DINOv2 "
                                  "tokens (CPU autocast) an fp16 forward is 0.1-0.2 % off the fp32 "
                                  "one, a bf16 forward 1.0-1.6 % (docs/store-format.md): on a GPU "
                                  "use fp16. Recorded in the store."),
    batch_size: Optional[int] = typer.Option(None, help="Images (or clips) per backbone forward. "
                                             "Default: 32, or, resuming a store, the store's (a "
                                             "resume must batch alike: batching changes a forward's "
                                             "low bits)."),
    device: str = typer.Option("auto", help="auto (cuda where torch sees a GPU, else cpu; "
                               "$FEATCACHE_DEVICE overrides auto), cpu, cuda or cuda:N. The store "
                               "records the kind; a resume on the other kind is told."),
    limit: Optional[int] = typer.Option(None, help="At most N samples per split (class-balanced, "
                                        "seeded): for quick tries on big datasets."),
    img_size: Optional[int] = typer.Option(None, help="Input resolution instead of the model's "
                                           "pretrained one (a multiple of the patch size)."),
    crop_pct: Optional[float] = typer.Option(None, help="Override the pretrained config's center-crop fraction."),
    interpolation: Optional[str] = typer.Option(None, help="Override the resize interpolation (nearest, bilinear, bicubic, box, hamming, lanczos)."),
    mean: Optional[str] = typer.Option(None, help="Override the normalisation mean: three comma-separated numbers."),
    std: Optional[str] = typer.Option(None, help="Override the normalisation std: three comma-separated numbers."),
    taps: str = typer.Option("all", help="Blocks to keep: all, every:K, last:M, or indices like 3,7,11."),
    seed: int = typer.Option(0, help="Seed for the train/val split, --limit and --random-init."),
    val_fraction: float = typer.Option(0.2, help="Share of each class held out for val when the "
                                       "dataset has no val/ folder."),
    workers: Optional[int] = typer.Option(None, help="DataLoader processes decoding images (0: in "
                                          "the main process). Default: one less than this "
                                          "machine's CPU cores, at most 4."),
    shard_size: Optional[int] = typer.Option(None, help="Samples per shard file. Default: about "
                                             "128 MiB per shard (at most 1024 samples)."),
    shard: Optional[str] = typer.Option(None, help="K/N: this process writes part K (0-based) of N "
                                        "of the store; run N processes (GPUs, SLURM array tasks) "
                                        "with the same other options. The store is complete when "
                                        "all parts have run. Not for a bucket URL (one writer)."),
    dask: Optional[str] = typer.Option(None, help="Run the N parts on a dask.distributed cluster: "
                                       "tcp://HOST:PORT, or local:N for N local worker processes. "
                                       "Not for a bucket URL (one writer)."),
    reuse: bool = typer.Option(True, help="If a complete store with the same content (model, weights, "
                               "transform, taps, dtype, precision, the same inputs at the same "
                               "place) exists beside --out, use it instead of extracting again "
                               "(a new local --out becomes a link to it; --no-reuse replaces that link)."),
    force: bool = typer.Option(False, help="Write even if the store looks larger than the free space."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and the store size, write nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Extract every tapped block's tokens of MODEL over DATASET into a store.

    Rerunning the same command continues an interrupted extraction from its last finished
    shard; on a complete store it does nothing.
    """
    from featcache import ExtractConfig, extract

    cfg = ExtractConfig(
        model=model, dataset=dataset, out=out_path, weights=weights, random_init=random_init,
        dtype=dtype, precision=precision, batch_size=batch_size, device=device, limit=limit,
        img_size=img_size,
        taps=taps, seed=seed, val_fraction=val_fraction, shard_size=shard_size,
        **({} if workers is None else {"workers": workers}),  # (the default is ExtractConfig's)
        per_class=per_class, split=split.split(",") if split else None, data_root=data_root,
        download=download, views=views, frames=frames, sampling=sampling, fps=fps, crop_pct=crop_pct, interpolation=interpolation,
        mean=_triple("--mean", mean), std=_triple("--std", std), force=force, dry_run=dry_run,
        shard=_part(shard), reuse=reuse)
    if dask:
        if cfg.shard is not None:
            raise UserError("--dask runs every part itself (one --shard K/N per worker): leave out --shard.")
        from featcache.distribute import extract_on_dask
        r = extract_on_dask(cfg, dask)
    else:
        r = extract(cfg)
    # what a local store takes on disk (its metadata included); the plan's figure otherwise
    on_disk = usage(r.path) if r.status != "dry run" and not is_url(r.path) else None
    summary = {"path": str(r.path), "status": r.status, "complete": r.complete,
               "twin": r.twin and str(r.twin), "bytes": r.plan.total, "bytes_on_disk": on_disk,
               "left": r.left, "left_bytes": r.left * r.plan.bytes_per_sample,
               "written": r.written, "skipped": r.skipped, "seconds": round(r.seconds, 2)}
    if as_json:
        emit_json(summary)
        return
    skipped = sum(map(len, r.skipped.values()))  # (extract named them, on stderr)
    twin = f", would reuse {r.twin}" if r.status == "dry run" and r.twin else ""
    size = f"on disk: {human_bytes(on_disk)}" if on_disk is not None else f"the store: {human_bytes(r.plan.total)}"
    left = (f", {r.left:,} samples ({human_bytes(summary['left_bytes'])}) left to write"
            if r.status == "dry run" and not r.twin and r.left < sum(r.plan.splits.values()) else "")
    print(f"{r.status}: {r.path}{twin} ({size}){left}"
          + (f", {sum(r.written.values()):,} samples in {r.seconds:.1f} s" if r.written else "")
          + (f" ({skipped:,} unreadable input(s) skipped)" if skipped else ""))


def _part(text: Optional[str]) -> Optional[tuple[int, int]]:
    if text is None:
        return None
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard takes K/N, like 0/4, not '{text}'") from None
    return k, n


def _triple(option: str, text: Optional[str]) -> Optional[tuple[float, float, float]]:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise UserError(f"{option} takes three comma-separated numbers, like 0.485,0.456,0.406")
    return values


@app.command("info")
def info_cmd(path: str = typer.Argument(..., metavar="STORE", help="A store folder or URL."),
             as_json: bool = typer.Option(False, "--json", help="Print everything as JSON on stdout.")) -> None:
    """Model, weights hash, taps, token layout, dtype, splits, size and completeness of a store."""
    info = store_info(open_store(path))
    if as_json:
        emit_json(info)
        return
    lay = info["layout"]
    t = Table(show_header=False, box=None)
    t.add_row("model", info["model"])
    t.add_row("weights", f"{info['weights']['source']} (sha256 {info['weights']['sha256'][:16]}...)")
    t.add_row("dataset", info["dataset"]["source"])
    tf = info["transform"]
    video, views = tf.get("video"), tf.get("views")
    h, w = tf["input_size"][1:]  # (resized to floor(size / crop_pct), then cropped: store-format.md)
    size = f"{h} px" if h == w else f"{h} x {w} px"
    how = "center crop" if tf.get("crop_mode", "center") == "center" else f"crop mode {tf['crop_mode']}"
    t.add_row("input", f"{size}: resized to {int(min(h, w) / tf['crop_pct'])} ({tf['interpolation']}), "
              f"{how}; mean {tf['mean']}, std {tf['std']}"
              + (f"; {views} augmented views of each train image" if views else "")
              + (f"; {video['frames']} frame{'s' * (video['frames'] != 1)} per clip ({video['sampling']}"
                 + (f", {video['fps']:g} fps" if video.get("fps") else "") + ")" if video else ""))
    t.add_row("taps", ",".join(map(str, info["taps"])))
    t.add_row("tokens", f"{lay['tokens']} = {lay['prefix_tokens']} prefix + {lay['frames']} x "
              f"{lay['grid'][0]} x {lay['grid'][1]} patches; width {lay['width']}; pool {lay['pool']}")
    t.add_row("classes", f"{len(info['classes'])}: " + ", ".join(info["classes"][:20])
              + (" ..." if len(info["classes"]) > 20 else ""))
    t.add_row("dtype", info["dtype"])
    t.add_row("precision", f"{info['precision']} (the backbone's forward), batch {info['batch_size']}"
              + (f", on {info['device']}" if info["device"] else "") + " (a resume batches alike)")
    for name, s in info["splits"].items():
        state = "complete" if s["complete"] else f"{s['shards_done']}/{s['shards']} shards"
        count, gone, bad = f"{s['n']:,} samples", s["n"] - s["read"], len(s["skipped"])
        if s["complete"] and gone:  # (with --views, an unreadable input costs each of its views)
            count += (f": {s['read']:,} stored, {gone:,} skipped ("
                      + ("unreadable inputs)" if gone == bad else
                         f"the views of {bad:,} unreadable input{'s' * (bad != 1)})"))
        t.add_row(f"split {name}", f"{count}, {state}" + (f", added {s['added']}" if s["added"] else ""))
    t.add_row("size", human_bytes(info["bytes_on_disk"]))
    t.add_row("complete", f"no: {damaged(path, info['lost_shards'])}" if info["lost_shards"] else
              "yes" if info["complete"] else f"no (being written now by {info['writer']})"
              if info["writer"] else "no (rerun the extract command to finish)")
    out.print(t)


@app.command("verify")
def verify_cmd(path: str = typer.Argument(..., metavar="STORE", help="A store folder or URL."),
               repair_: bool = typer.Option(False, "--repair", help=(
                   "Clear the done flags of the damaged shards found (lost files, failed checksums, "
                   "NaN/Inf or missing samples, bad labels), so that rerunning the extract command "
                   "that made the store recomputes those shards alone. Needs write access.")),
               as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout.")) -> None:
    """Read every shard (checking its chunks' crc32c, and the labels') and check completeness, labels, NaN/Inf.

    Exit status 0 only if the store is complete and sound.
    """
    from rich.progress import Progress

    from featcache.verify import repair, verify

    with Progress(console=make_console(stderr=True), transient=True) as bar:
        report = verify(open_store(path), bar)
    if not as_json:  # (said before a repair, which a writer at work refuses)
        for p in report.problems:
            out.print(f"[red]problem:[/] {escape(p)}")
        out.print(f"{'OK' if report.ok else 'FAILED'}: {escape(report.path)}: {report.shards} shards checked, "
                  f"{report.samples:,} samples read back"
                  + (f" ({report.skipped:,} skipped: unreadable inputs, no tokens)" if report.skipped else "")
                  + f", {len(report.problems)} problem(s)")
    cleared = repair(report.path, report) if repair_ and report.damaged else 0
    if as_json:
        emit_json({"path": report.path, "ok": report.ok, "shards": report.shards,
                   "samples": report.samples, "skipped": report.skipped, "problems": report.problems,
                   "damaged": report.damaged, "repaired": cleared})
    else:
        where = "; ".join(f"{name}: {shards}" for name, shards in report.damaged.items())
        if cleared:
            out.print(f"repaired: the done flags of {cleared} damaged shard(s) cleared ({where}). Rerun "
                      f"the extract command that made {escape(report.path)} to recompute them "
                      f"(`featcache info {escape(report.path)}` shows its model, dataset and settings).")
        elif report.damaged:
            out.print(f"damaged shard(s): {where}. `featcache verify --repair {escape(report.path)}`, then "
                      "the extract command that made it, recomputes them alone.")
    if not report.ok:
        raise typer.Exit(1)


@app.command("ls")
def ls_cmd(root: str = typer.Argument("cache", metavar="ROOT", help="Folder or URL prefix (s3://bucket/cache) to search for stores."),
           as_json: bool = typer.Option(False, "--json", help="Print the list as JSON on stdout.")) -> None:
    """One line per store under ROOT: model, dataset, splits, dtype, size, complete?"""
    root = normalize(root)
    if not is_url(root) and not Path(root).is_dir():
        raise UserError(f"{root} is not a folder.{near(root)} Pass the folder (or s3:// prefix) that holds your "
                        "stores, e.g. `featcache ls /shared/featcache`" + (
                            " (the default, ./cache, is where extract writes them)" if root == Path("cache") else ""))
    stores = find_stores(root)
    if as_json:
        emit_json(stores)
        return
    if not stores:
        print(f"no stores under {root}")
    for s in stores:  # plain lines, never wrapped: easy to grep
        if s.get("link"):
            print(f"{s['path']} -> {s['link']}")
            continue
        splits = " ".join(f"{k}={v}" + (f" ({s['unreadable_inputs'][k]} unreadable input(s))"
                                        if s["unreadable_inputs"][k] else "")
                          for k, v in s["splits"].items())
        dtype = s["dtype"] + ("" if s["precision"] == "fp32" else f" ({s['precision']} forward)")
        source = s["weights"]  # timm:TAG, file:NAME or random-init:seed=N
        weights = (f"RANDOM weights, {source.split(':', 1)[1]}" if source.startswith("random-init") else
                   "pretrained" if source.startswith("timm:") else source)
        frames = ""
        if s["frames"]:
            video = s["sampling"] or {}
            how = video.get("sampling", "") + (f" {video['fps']:g} fps" if video.get("fps") else "")
            frames = f" x {s['frames']} frame{'s' * (s['frames'] != 1)}" + (f" ({how})" if how else "")
        lost = sum(len(ks) for ks in s["lost_shards"].values())
        state = (f"DAMAGED ({lost} finished shard(s) lost their files: `featcache verify` says which)"
                 if lost else "DAMAGED (`featcache info` says how)" if s["damaged"] else
                 "complete" if s["complete"] else f"INCOMPLETE (being written now by {s['writer']})"
                 if s["writer"] else "INCOMPLETE" if is_url(s["path"]) else  # (a bucket has no lock to ask)
                 "INCOMPLETE (stopped: its extract command, rerun, finishes it)")
        print(f"{s['path']}  {s['model']} ({weights})  {s['img_size']} px{frames}  {s['dataset']} "
              f"({s['classes']} classes)  {splits}  {dtype}  {s['taps']} taps  "
              f"{human_bytes(s['bytes_on_disk'])}  {state}")


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
