"""The video task where time matters, over seeds: which way does the object move?

    python benchmarks/video_study.py [--seeds 0,1,2] [--clips 60] [--epochs 20] [--head-input pool]

Clips of a real Fashion-MNIST item moving left, right, up or down (featcache.sources.
moving_clips; a move and its reverse give the same frames in another order), 8 frames per
clip, every other block tapped. Backbones: a random-init ViT-Ti at 64 px (what `make
demo-video` runs offline) and, when ../shared/weights has it, the real DINOv2 ViT-S/14 at
56 px (4 x 4 patches, like the ViT-Ti). Rows: the frame-averaged linear probe, LoSA
without temporal mixing, LoSA with it (variants A and B). Each seed draws new clips and a
new initialisation; every row keeps its best val epoch and is scored on test once.
Writes benchmarks/results/video_study.{json,md} (another --head-input than pool, the head
docs/losa.md's table reads: video_study-<head>.{json,md}).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from featcache_cli.demo_video import video_configs  # noqa: E402
from featcache import ExtractConfig, extract  # noqa: E402
from featcache.sources.moving_clips import write_moving_clips  # noqa: E402
from sidetrain import train_many  # noqa: E402

from common import DINOV2_FILE, RESULTS, machine, save  # noqa: E402

# (work/video held the crf 18 clips of docs/losa.md's table: the lossless ones go apart)
WORK = Path(__file__).resolve().parent / "work" / "video-lossless"


def backbones() -> dict[str, dict]:
    out = {"ViT-Ti random init, 64 px": dict(model="vit_tiny", random_init=True, img_size=64)}
    if DINOV2_FILE.is_file():
        out["DINOv2 ViT-S/14, 56 px"] = dict(model="dinov2_small", weights=DINOV2_FILE, img_size=56)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--clips", type=int, default=60, help="train clips per direction")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--head-input", default="pool", help="what every head reads (sidetrain fit --head-input)")
    args = ap.parse_args()
    head = "" if args.head_input == "pool" else f"-{args.head_input}"
    rows: dict[str, dict[str, list[float]]] = {}
    params: dict[str, int] = {}
    for seed in map(int, args.seeds.split(",")):
        data = WORK / f"clips-s{seed}"
        if not data.exists():
            write_moving_clips(data, {"train": args.clips, "val": args.clips // 3, "test": 2 * args.clips // 3},
                               size=64, length=16, seed=seed)
        for name, kw in backbones().items():
            tag = f"{kw['model']}-s{seed}"
            store = extract(ExtractConfig(dataset=str(data), out=WORK / "cache" / tag, frames=8,
                                          taps="every:2", seed=seed, **kw)).path
            configs = video_configs(store, WORK / "runs" / (tag + head), args.epochs, seed, args.head_input)
            for r in train_many(configs):
                rows.setdefault(name, {}).setdefault(r.run.name, []).append(r.test_acc)
                params[r.run.name + name] = r.params
    lines = ["| backbone | configuration | trainable params | test acc (mean ± std) |",
             "|---|---|---:|---:|"]
    for name, runs in rows.items():
        for run, accs in runs.items():
            a = 100 * np.array(accs)
            lines.append(f"| {name} | {run} | {params[run + name]:,} | "
                         f"{a.mean():.1f} ± {a.std():.1f} |")
    table = "\n".join(lines)
    print(table)
    (RESULTS / f"video_study{head}.md").write_text(f"Seeds {args.seeds}, head input {args.head_input}, "
                                                  f"{machine()}\n\n{table}\n")
    save(f"video_study{head}", {"seeds": args.seeds, "clips": args.clips, "epochs": args.epochs,
                                "head_input": args.head_input, "machine": machine(), "test_acc": rows})


if __name__ == "__main__":
    main()
