"""A sweep of 8 configurations in one data pass against 1 configuration alone.

    python benchmarks/sweep_cost.py [--store PATH] [--epochs 3] [--device cuda --model vit_base --img-size 224]

Without --store, a store is extracted from the demo set (random-init ViT-S at 112 px, or
--model at --img-size).
Reports wall time for 1 configuration, for 8 one after another, and for the same 8 in one
pass over the data (LoSA ranks 4/8/16/32 x lr 1e-3/3e-3; and 8 linear probes x lr). The
one-pass sweep reads and decodes each batch once, and probes that read the same taps share
one readout; what remains is each model's own compute, so the ratio to one configuration
shows how much of a run was shared work (target: under 2x).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from featcache import ExtractConfig, extract
from sidetrain import FitConfig, train_many

from common import bar_chart, machine, save, scratch


def timed(configs: list[FitConfig]) -> float:
    t0 = time.perf_counter()
    train_many(configs)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=None)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--model", default="vit_small")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    kind = torch.device(args.device).type
    with scratch() as tmp:
        store = args.store or extract(ExtractConfig(model=args.model, random_init=True, img_size=args.img_size,
                                                    dataset="demo", out=Path(tmp) / "store",
                                                    device=args.device)).path
        base = FitConfig(cache=store, epochs=args.epochs, device=args.device)
        # one untimed epoch first: CUDA's and cuBLAS's start-up, the store's pages
        train_many([replace(base, epochs=1, out=Path(tmp) / "runs" / "warm-up")])
        grids = {
            "losa": [replace(base, rank=r, lr=lr) for r in (4, 8, 16, 32) for lr in (1e-3, 3e-3)],
            "linear": [replace(base, method="linear", lr=lr) for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)],
        }
        rows = []
        for name, configs in grids.items():
            configs = [replace(c, out=Path(tmp) / "runs" / name / f"{i}") for i, c in enumerate(configs)]
            one = timed(configs[:1])
            apart = one + sum(timed([c]) for c in configs[1:])
            eight = timed([replace(c, out=Path(str(c.out) + "-sweep")) for c in configs])
            rows.append({"method": name, "one_s": one, "apart_s": apart, "eight_s": eight,
                         "ratio": eight / one, "saving": apart / eight})
    print(f"\nsweep of 8 in one pass vs 1 configuration: {args.model} at {args.img_size} px, "
          f"{args.epochs} epochs, {machine()}\n")
    print("| configurations | 1 config (s) | 8 one by one (s) | 8 in one pass (s) | one pass / 1 config "
          "| one by one / one pass |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['one_s']:.1f} | {r['apart_s']:.1f} | {r['eight_s']:.1f} | "
              f"{r['ratio']:.1f}x | {r['saving']:.1f}x |")
    png = bar_chart(f"sweep_cost_{kind}", [r["method"] for r in rows], [r["ratio"] for r in rows],
                    "8 configs in one pass / 1 config", f"sweep cost, {machine()}", target=2)
    meta = {"machine": machine(), "model": args.model, "img_size": args.img_size, "epochs": args.epochs}
    print(f"\nwritten: {save(f'sweep_cost_{kind}', {**meta, 'rows': rows})} "
          f"and {png.name}")


if __name__ == "__main__":
    main()
