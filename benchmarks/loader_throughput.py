"""Loader throughput against np.memmap random reads of the same bytes.

    python benchmarks/loader_throughput.py [--samples 2000] [--buffer-mb 256]

Writes a store of random fp16 tokens shaped like DINOv2 ViT-S/14 at 112 px (12 x 65 x 384,
599 kB per sample) and reads one epoch in random order with:

- memmap random:  np.memmap of the same bytes in one flat .npy file, a batch of random
                  samples per read (numpy's gather, on one core), with none of our code
                  in the way;
- loader/memmap:  sidetrain's ShardLoader, stripe-wise shuffle, memory-mapped reads; a first
                  epoch (each sample's crc32c compared as it is first read) and a later one;
- loader/zarr:    the same loader reading through zarr (one call per stripe);
- zarr/sample:    one zarr call per random sample (what the loader avoids);
- with a GPU, two more rows, later epochs: the loader handing batches to it (gathered into
  pinned memory a batch ahead in a thread, copied without blocking), and the split preloaded
  into its memory (`fit --preload`), with no training step in the way of either.

Page cache warm (a previous read) and cold (posix_fadvise DONTNEED on every file first);
each the best of three epochs, as this machine's speed drifts between runs. Target: the
loader at 0.5x or more of memmap random, warm.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from featcache.models import TokenLayout
from featcache.store import create_store, open_store, write_shard
from sidetrain import ShardLoader

from common import bar_chart, machine, save, scratch

SHAPE = (12, 65, 384)


def make_store(path: Path, flat: Path, n: int) -> None:
    """The store, and the same samples in one flat .npy file for the np.memmap baseline."""
    layout = TokenLayout(1, True, 0, (8, 8), 1, SHAPE[2], "token")
    meta = {"model": {"name": "synthetic", "depth": 12, "params": 0}, "weights": {"sha256": "0"},
            "transform": {}, "taps": list(range(12)), "layout": layout.to_dict(), "dtype": "fp16",
            "batch_size": 1, "classes": [str(i) for i in range(10)], "dataset": {"name": "random", "source": "random"}}
    shard = 128 * 2**20 // (np.prod(SHAPE) * 2)
    store = create_store(path, meta, {"train": (n, "0")}, {"norm": {"type": "identity"},
                         "fc_norm": {"type": "identity"}}, int(shard))
    same = np.lib.format.open_memmap(flat, mode="w+", dtype=np.float16, shape=(n, *SHAPE))
    rng = np.random.default_rng(0)
    for k in range(-(-n // shard)):
        lo, hi = k * shard, min((k + 1) * shard, n)
        same[lo:hi] = rng.standard_normal((hi - lo, *SHAPE)).astype(np.float16)
        write_shard(store, "train", k, same[lo:hi], None, np.arange(lo, hi) % 10,
                    [str(i) for i in range(lo, hi)], {})
    same.flush()


def drop_cache(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def epoch(run, cold: Path | None) -> float:
    """One timed epoch of `run`, the page cache of the files under `cold` dropped first."""
    if cold:
        drop_cache(cold)
    return run()


def memmap_random(flat: Path, n: int, batch: int) -> float:
    same = np.load(flat, mmap_mode="r")
    order = np.random.default_rng(1).permutation(n)
    t0 = time.perf_counter()
    for b in range(0, n, batch):
        same[order[b:b + batch]]
    return time.perf_counter() - t0


def loader_epoch(store_path: Path, mode: str, batch: int, buffer: int, later: bool = False,
                 device: str = "cpu", preload: bool = False) -> float:
    """One epoch's seconds: the loader's first (checksums compared), or with `later` its
    second, after an untimed first."""
    loader = ShardLoader(open_store(store_path), "train", batch, shuffle=True, seed=0, buffer_bytes=buffer,
                         reader=mode, recycle=True, device=device, preload=preload)  # as training runs it
    if later:
        for _ in loader.epoch(0):
            pass
    t0 = time.perf_counter()
    for _ in loader.epoch(1 if later else 0):
        pass
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def zarr_per_sample(store_path: Path, n: int) -> float:
    tokens = open_store(store_path).split("train").tokens
    order = np.random.default_rng(1).permutation(n)[:200]  # slow: a sample of the epoch
    t0 = time.perf_counter()
    for i in order:
        tokens[int(i)]
    return (time.perf_counter() - t0) * n / len(order)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--buffer-mb", type=int, default=256, help="loader buffer (less than the store)")
    args = ap.parse_args()
    n, gb = args.samples, args.samples * np.prod(SHAPE) * 2 / 1e9
    rows = []
    with scratch() as tmp:
        path, flat = Path(tmp) / "store", Path(tmp) / "flat.npy"
        make_store(path, flat, n)
        runs = {"memmap random": lambda: memmap_random(flat, n, args.batch_size),
                "loader/memmap": lambda: loader_epoch(path, "memmap", args.batch_size, args.buffer_mb * 2**20),
                "loader/memmap, later epoch": lambda: loader_epoch(path, "memmap", args.batch_size,
                                                                   args.buffer_mb * 2**20, later=True),
                "loader/zarr": lambda: loader_epoch(path, "zarr", args.batch_size, args.buffer_mb * 2**20),
                "zarr/sample": lambda: zarr_per_sample(path, n)}
        if torch.cuda.is_available():
            buffer = args.buffer_mb * 2**20
            runs["loader/memmap -> cuda, later epoch"] = lambda: loader_epoch(
                path, "memmap", args.batch_size, buffer, later=True, device="cuda")
            runs["preloaded on cuda, later epoch"] = lambda: loader_epoch(
                path, "memmap", args.batch_size, buffer, later=True, device="cuda", preload=True)
        for cache in ("warm", "cold"):
            for name, run in runs.items():
                if cache == "cold" and name.endswith("later epoch"):  # (its first epoch warms it)
                    continue
                if cache == "warm":
                    run()  # fill the page cache
                seconds = min(epoch(run, Path(tmp) if cache == "cold" else None) for _ in range(3))
                rows.append({"reader": name, "cache": cache, "samples_s": n / seconds, "gb_s": gb / seconds})
    base = {r["cache"]: r["gb_s"] for r in rows if r["reader"] == "memmap random"}
    for r in rows:
        r["vs_memmap_random"] = r["gb_s"] / base[r["cache"]]
    print(f"\nloader throughput: {n} samples of {np.prod(SHAPE) * 2 / 1e3:.0f} kB (fp16, handed out "
          f"as stored, in recycled buffers), random order, batch {args.batch_size}, buffer {args.buffer_mb} MB, "
          f"{machine()}\n")
    print("| reader | page cache | samples/s | GB/s | vs memmap random |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['reader']} | {r['cache']} | {r['samples_s']:,.0f} | {r['gb_s']:.2f} | "
              f"{r['vs_memmap_random']:.2f}x |")
    png = bar_chart("loader_throughput", [f"{r['reader']}, {r['cache']}" for r in rows],
                    [r["vs_memmap_random"] for r in rows], "GB/s vs np.memmap random",
                    f"loader throughput, {machine()}", target=0.5)
    print(f"\nwritten: {save('loader_throughput', {'samples': n, 'machine': machine(), 'rows': rows})} "
          f"and {png.name}")


if __name__ == "__main__":
    main()
