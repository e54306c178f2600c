"""What `featcache ls` pays to check each store as `featcache info` would (done flags, labels,
one stat per shard file) against reading the root's word alone, on a store the size of
Places365.

    python benchmarks/listing_cost.py [--samples 2000000] [--shard 1024]

The check never reads tokens, so the store here has a tiny token layout and placeholder
shard files: its cost is that of the metadata, which grows with samples and shards alike
whatever the model. Writes benchmarks/results/listing_cost.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import zarr

from featcache.catalog import find_stores
from featcache.store import ATTR, create_store

from common import machine, save, scratch

LAYOUT = {"prefix_tokens": 1, "class_token": True, "register_tokens": 0, "grid": [1, 1], "frames": 1,
          "width": 8, "pool": "token", "tokens": 2}


def lay_out(out: Path, n: int, shard: int) -> int:
    """A complete store of `n` samples whose shard files are placeholders; its shard count."""
    meta = {"model": {"name": "vit_base_patch16_224", "depth": 12, "params": 0},
            "weights": {"source": "random-init:seed=0", "sha256": "0" * 64},
            "transform": {"input_size": [3, 224, 224]}, "taps": list(range(12)), "layout": LAYOUT,
            "dtype": "fp16", "precision": "fp32", "batch_size": 32, "device": "cpu",
            "classes": [str(c) for c in range(365)], "dataset": {"name": "big", "source": "bench:listing"}}
    store = create_store(str(out), meta, {"train": (n, "bench")}, {"norm": {"type": "identity"}}, shard)
    g = store.group["train"]
    g["labels"][:] = np.arange(n) % 365
    g["done"][:] = True
    shards = g["done"].shape[0]
    for array, depth in (("tokens", 4), ("keys", 1), ("labels", 1)):  # what lost_shards looks for
        for k in range(shards):
            f = out / "train" / array / "c" / str(k) / Path(*["0"] * (depth - 1))
            f.parent.mkdir(parents=True, exist_ok=True)
            f.touch()
    for node in (g, zarr.open_group(str(out), mode="r+")):
        node.attrs[ATTR] = {**node.attrs[ATTR], "complete": True}
    return shards


def best_of(runs: int, fn) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=2_000_000, help="Samples in the store (Places365: 1.8M).")
    ap.add_argument("--shard", type=int, default=1024, help="Samples per shard (extract's for ViT-B).")
    args = ap.parse_args()
    with scratch() as tmp:
        root = Path(tmp)
        shards = lay_out(root / "big", args.samples, args.shard)
        (listed,) = find_stores(root)
        assert listed["complete"] and not listed["lost_shards"], listed  # (the check finds it sound)
        quick = best_of(3, lambda: find_stores(root, health=False))
        checked = best_of(3, lambda: find_stores(root))
    rows = [("root's word (a twin search)", quick), ("checked (featcache ls)", checked)]
    print(f"one store, {args.samples:,} samples in {shards:,} shards ({machine()})")
    print(f"{'listing':<30} {'seconds':>8}")
    for name, seconds in rows:
        print(f"{name:<30} {seconds:8.2f}")
    print(f"the check costs {checked - quick:.2f} s a store of this size")
    path = save("listing_cost", {"machine": machine(), "samples": args.samples, "shards": shards,
                                 "seconds": {"root": quick, "checked": checked}})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
