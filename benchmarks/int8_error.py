"""int8 reconstruction error per layer on real ViT features, for candidate schemes.

    python benchmarks/int8_error.py [--img-size 224] [--n 160] [--weights FILE]

Taps every block of the DINOv2 ViT-S/14 in ../shared/weights (or --weights) on real
images (the demo's Fashion-MNIST photos), then encodes the tokens of images not used for
calibration with each scheme and reports the relative L2 error per layer:

- token absmax: one scale per token per layer (the outlier channels set every step);
- channel^0.5: divide channels by sqrt(calibration absmax) first (SmoothQuant-like);
- channel^1 (what featcache stores): divide channels by their calibration absmax first.

fp16 and bf16 storage rows are given for scale, and so is the error of running the forward
itself under bf16 or fp16 autocast (`featcache extract --precision`), against the fp32
forward, stored exactly. The autocast rows are measured on this machine's CPU: a GPU's
kernels round differently, but the 16-bit inputs to every product, which dominate, are
the same. Writes benchmarks/results/int8_error.json and .png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import timm.data  # noqa: E402
import torch  # noqa: E402

from featcache import load_backbone, open_dataset  # noqa: E402
from featcache.codec import calibrate, decode, encode  # noqa: E402
from featcache.sources.base import to_rgb  # noqa: E402
from featcache.taps import forward_taps  # noqa: E402

from common import RESULTS, backbone_args, save  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return ((a - b).pow(2).sum((0, 2, 3)).sqrt() / b.pow(2).sum((0, 2, 3)).sqrt()).numpy()


def int8(z: torch.Tensor, channel_scale: np.ndarray) -> torch.Tensor:
    q, s = encode(z, "int8", channel_scale)
    return decode(q, "int8", s, torch.from_numpy(channel_scale))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--n", type=int, default=160, help="images; the first 32 calibrate")
    ap.add_argument("--weights", type=Path, default=None)
    args = ap.parse_args()
    bb_args = backbone_args(args.weights)
    bb = load_backbone(bb_args["model"], bb_args.get("weights"), bb_args.get("random_init", False),
                       args.img_size)
    tf = timm.data.create_transform(**bb.data_config, is_training=False)
    split = open_dataset("demo").splits["train"]
    images = torch.stack([tf(to_rgb(split.open(i))) for i in range(args.n)])
    taps = list(range(len(bb.blocks)))
    z = torch.cat([forward_taps(bb.model, x, taps) for x in images.split(16)])
    calib, test = z[:32], z[32:]
    forward = {p: torch.cat([forward_taps(bb.model, x, taps, p).float() for x in images[32:].split(16)])
               for p in ("bf16", "fp16")}
    absmax = calibrate(calib)
    ones = np.ones_like(absmax)
    rows = {
        "token absmax": rel_err(int8(test, ones), test),
        "channel^0.5 + token absmax": rel_err(int8(test, np.sqrt(absmax)), test),
        "channel^1 + token absmax (featcache)": rel_err(int8(test, absmax), test),
        "bf16": rel_err(decode(encode(test, "bf16")[0], "bf16"), test),
        "fp16": rel_err(test.half().float(), test),
        "bf16 forward (autocast)": rel_err(forward["bf16"], test),
        "fp16 forward (autocast)": rel_err(forward["fp16"], test),
    }
    ratio = (calib.abs().amax((0, 2)) / calib.abs().amax((0, 2)).median(dim=1, keepdim=True).values)
    print(f"\nrelative L2 error per layer, {bb.name} ({bb.weights['source']}) at {args.img_size} px, "
          f"{len(test)} images (+32 calibration)\n")
    print("| scheme | " + " | ".join(f"L{i}" for i in taps) + " | max |")
    print("|---|" + "---:|" * (len(taps) + 1))
    for name, err in rows.items():
        print(f"| {name} | " + " | ".join(f"{100 * e:.2f}" for e in err) + f" | {100 * err.max():.2f} |")
    print("| largest channel / median channel absmax | "
          + " | ".join(f"{r:.0f}x" for r in ratio.max(1).values.numpy()) + " | |")
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, err in rows.items():
        ax.plot(taps, 100 * err, marker="o", label=name)
    ax.set(xlabel="block", ylabel="relative L2 error (%)", yscale="log",
           title=f"Stored-token error per layer: {bb.name}, {args.img_size} px")
    ax.legend(fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "int8_error.png", dpi=120)
    path = save("int8_error", {"model": bb.name, "weights": bb.weights, "img_size": args.img_size,
                               "images": len(test), "rel_l2_error_per_layer": {k: v.tolist() for k, v in rows.items()},
                               "outlier_ratio_per_layer": ratio.max(1).values.tolist()})
    print(f"\nwritten: {path} and int8_error.png")


if __name__ == "__main__":
    main()
