"""Extraction throughput against the bare backbone forward on the same batches.

    python benchmarks/extract_throughput.py [--n 256] [--img-size 112] [--device cpu] [--model vit_base]
                                            [--precisions fp32,fp16]

The bare forward runs forward_features over pre-decoded, pre-transformed batches (no
taps, no encoding, no writing); the extraction is the full `extract()` loop (decode in
DataLoader workers, taps, encode, background shard writer). Their ratio is the share of
the backbone's speed that extraction keeps (target: at least 0.9). Also reports bytes per
sample on disk for each dtype. With several --precisions both run in each (autocast for
fp16 and bf16): their bare figures compare the backbone's speed in each precision.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import timm.data
import torch

from featcache import ExtractConfig, extract, load_backbone, open_dataset
from featcache.precision import autocast
from featcache.sources.base import to_rgb
from featcache.store import disk_usage

from common import backbone_args, bar_chart, machine, save


def write_images(root: Path, n: int) -> Path:
    """The first n demo train images as PNG files in <root>/train/<class>/: real decoding work."""
    demo = open_dataset("demo")
    split = demo.splits["train"]
    for i in range(min(n, len(split))):
        d = root / "train" / f"c{split.labels[i]}"
        d.mkdir(parents=True, exist_ok=True)
        split.open(i).save(d / f"{i:05d}.png")
    return root


def bare_forward(model, batches, device, precision: str) -> float:
    with torch.no_grad(), autocast(device.type, precision):
        model(batches[0].to(device))  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x in batches:
            model.forward_features(x.to(device, non_blocking=True))
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=768, help="images (from the demo train split)")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=ExtractConfig.workers)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--model", default=None, help="a timm name (random init without --weights); "
                    "default: the DINOv2 ViT-S/14 of ../shared/weights")
    ap.add_argument("--dtypes", default="fp16,int8,bf16,fp32")
    ap.add_argument("--precisions", default="fp32", help="the forward's: fp32, fp16, bf16")
    args = ap.parse_args()
    bb_args = backbone_args(args.weights, args.model)
    device = torch.device(args.device)
    bb = load_backbone(bb_args["model"], bb_args.get("weights"), bb_args.get("random_init", False),
                       args.img_size)
    model = bb.model.to(device)
    tf = timm.data.create_transform(**bb.data_config, is_training=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_images(Path(tmp) / "images", args.n)  # a train/ split only: n images
        split = open_dataset(str(folder)).splits["train"]
        n = len(split)
        t0 = time.perf_counter()
        images = torch.stack([tf(to_rgb(split.open(i))) for i in range(n)])
        decode_img_s = n / (time.perf_counter() - t0)
        batches = list(images.split(args.batch_size))
        for precision, dtype in [(p, d) for p in args.precisions.split(",") for d in args.dtypes.split(",")]:
            before = bare_forward(model, batches, device, precision)
            r = extract(ExtractConfig(dataset=str(folder), out=Path(tmp) / f"{dtype}-{precision}",
                                      dtype=dtype, precision=precision, img_size=args.img_size,
                                      batch_size=args.batch_size, device=args.device,
                                      workers=args.workers, **bb_args))
            # timed before and after each extraction, as a shared or throttled machine drifts
            bare = (before + bare_forward(model, batches, device, precision)) / 2
            samples = sum(r.written.values())
            rows.append({"dtype": dtype, "precision": precision, "bare_img_s": n / bare,
                         "extract_img_s": samples / r.seconds,
                         "ratio": (samples / r.seconds) / (n / bare),
                         "bytes_per_sample": disk_usage(r.path) / samples})
    print(f"\nextraction vs bare forward: {bb.name} at {args.img_size} px, batch {args.batch_size}, "
          f"{args.workers} workers, {machine()}\n")
    print("| dtype | forward in | bare forward (img/s) | extract (img/s) | ratio | bytes/sample on disk |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dtype']} | {r['precision']} | {r['bare_img_s']:.1f} | {r['extract_img_s']:.1f} | "
              f"{r['ratio']:.2f} | {r['bytes_per_sample'] / 1e3:,.1f} kB |")
    # the decoding extraction must also do, in one process: where it shares the cores with
    # the forward (a CPU), it bounds the ratio below 1 whatever our code does
    print(f"\ndecode and transform alone, one process: {decode_img_s:.1f} img/s")
    path = save(f"extract_throughput_{device.type}", {"model": bb.name, "img_size": args.img_size,
                "batch_size": args.batch_size, "workers": args.workers, "machine": machine(),
                "decode_img_s": decode_img_s, "rows": rows})
    png = bar_chart(f"extract_throughput_{device.type}", [f"{r['dtype']}, {r['precision']}" for r in rows],
                    [r["ratio"] for r in rows], "extract / bare forward",
                    f"extraction vs bare forward, {bb.name}, {machine()}", target=0.9)
    print(f"\nwritten: {path} and {png.name}")


if __name__ == "__main__":
    main()
