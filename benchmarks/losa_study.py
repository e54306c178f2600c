"""The real-feature study: linear probes against LoSA and its ablations, several seeds.

    apt-get install dataset-fashion-mnist        # real images, installs offline
    python benchmarks/losa_study.py [--img-size 112] [--epochs 20] [--seeds 0,1,2] [--rows core,ranks]

Protocol (VTAB-1k-like): 800 train / 200 val / 1000 test images per task; every
configuration keeps the epoch with the best val accuracy and is scored on test once. The
backbone is the real DINOv2 ViT-S/14 of ../shared/weights (or --weights). Tasks:

- fashion:  Fashion-MNIST, 10 classes (natural-ish: the label is the object's look);
- counting: 1-4 Fashion-MNIST items placed at random on a 112 px canvas, 4 classes
            (structured: the answer is spread over the tokens, as in VTAB's Structured group).

All configurations of a seed train in one pass over the data (sidetrain.train_many), and
runs resume where they stopped, so an interrupted study continues when rerun. Writes
benchmarks/results/losa_study_<size>px.{json,md} and one pareto PNG per task; rows not
rerun keep their last results. `--rows` picks groups of rows: core (the probes and the
default LoSA, B r16, with the pool and last4 heads), ranks (4, 8, 32), ablations (the
default with one choice changed: variant A or C, the other orders, no zero-init, half the
taps), all. At 224 px a LoSA run takes about four times as long as at 112 px.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from featcache import ExtractConfig, extract
from featcache.sources.idx import read_idx
from sidetrain import FitConfig, train_many
from sidetrain.classifier import common
from sidetrain.plots import plot_pareto

from common import RESULTS, backbone_args

IDX = Path("/usr/share/datasets/fashion-mnist")
WORK = Path(__file__).resolve().parent / "work"  # git-ignored: images, stores, runs


def per_class(labels: np.ndarray, start: int, count: int, classes: int) -> np.ndarray:
    return np.concatenate([np.flatnonzero(labels == c)[start:start + count] for c in range(classes)])


def write_fashion(root: Path) -> None:
    tr_x, tr_y = read_idx(IDX / "train-images-idx3-ubyte.gz"), read_idx(IDX / "train-labels-idx1-ubyte.gz")
    te_x, te_y = read_idx(IDX / "t10k-images-idx3-ubyte.gz"), read_idx(IDX / "t10k-labels-idx1-ubyte.gz")
    # offset 1000 per class: disjoint from the embedded demo images
    for split, (x, y, idx) in {"train": (tr_x, tr_y, per_class(tr_y, 1000, 80, 10)),
                               "val": (tr_x, tr_y, per_class(tr_y, 1080, 20, 10)),
                               "test": (te_x, te_y, per_class(te_y, 0, 100, 10))}.items():
        for i in idx:
            d = root / split / f"c{y[i]}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(d / f"{i:05d}.png")


def write_counting(root: Path, seed: int = 0) -> None:
    """k in 1..4 items (28 px) on a 112 px canvas, at distinct cells of a jittered 4x4 grid."""
    rng = np.random.default_rng(seed)
    tr_x, te_x = read_idx(IDX / "train-images-idx3-ubyte.gz"), read_idx(IDX / "t10k-images-idx3-ubyte.gz")
    for split, (pool, n) in {"train": (tr_x[:30000], 200), "val": (tr_x[30000:], 50),
                             "test": (te_x, 250)}.items():
        for k in range(1, 5):
            d = root / split / f"{k}"
            d.mkdir(parents=True, exist_ok=True)
            for j in range(n):
                canvas = np.zeros((112, 112), np.uint8)
                for cell in rng.choice(16, size=k, replace=False):
                    r, c = divmod(int(cell), 4)
                    item = pool[rng.integers(len(pool))]
                    y0 = min(r * 28 + int(rng.integers(-3, 4)), 84) if r else int(rng.integers(0, 4))
                    x0 = min(c * 28 + int(rng.integers(-3, 4)), 84) if c else int(rng.integers(0, 4))
                    canvas[y0:y0 + 28, x0:x0 + 28] = np.maximum(canvas[y0:y0 + 28, x0:x0 + 28], item)
                Image.fromarray(canvas).save(d / f"{j:04d}.png")


# every row names its variant and head: the table must not change when the defaults do
ROWS = {
    "linear (pool)": [dict(method="linear", lr=lr) for lr in (1e-3, 1e-2)],
    "strong probe (last4)": [dict(method="linear", head_input="last4", lr=lr) for lr in (1e-3, 1e-2)],
    "all-layers probe (all)": [dict(method="linear", head_input="all", lr=lr) for lr in (1e-3, 1e-2)],
    "LoSA A r4": [dict(rank=4)],
    "LoSA A r16": [dict(rank=16)],
    "LoSA B r16": [dict(rank=16, variant="B")],
    "LoSA C r16": [dict(rank=16, variant="C")],
    "LoSA B r16, head last4": [dict(rank=16, variant="B", head_input="last4")],
    "LoSA B r16, head all, dropout 0.1, wd 0.05": [dict(rank=16, variant="B", head_input="all",
                                                         dropout=0.1, weight_decay=0.05)],
    # the default (B r16, head last4) with one choice changed
    **{f"LoSA B r{r}, head last4": [dict(rank=r, variant="B", head_input="last4")] for r in (4, 8, 32)},
    **{f"LoSA {v} r16, head last4": [dict(rank=16, variant=v, head_input="last4")] for v in ("A", "C")},
    **{f"LoSA B r16, head last4, {o}": [dict(rank=16, variant="B", head_input="last4", order=o)]
       for o in ("token-channel", "alternate")},
    "LoSA B r16, head last4, no zero-init": [dict(rank=16, variant="B", head_input="last4", zero_init=False)],
    "LoSA B r16, head last4, taps every:2": [dict(rank=16, variant="B", head_input="last4", taps="every:2")],
}
GROUPS = {
    "core": ("linear (pool)", "strong probe (last4)", "all-layers probe (all)", "LoSA B r16",
             "LoSA B r16, head last4"),
    "ranks": tuple(f"LoSA B r{r}, head last4" for r in (4, 8, 32)),
    "ablations": ("LoSA A r16, head last4", "LoSA C r16, head last4", "LoSA B r16, head last4, token-channel",
                  "LoSA B r16, head last4, alternate", "LoSA B r16, head last4, no zero-init",
                  "LoSA B r16, head last4, taps every:2"),
    "all": tuple(ROWS),
}
assert all(set(g) <= set(ROWS) for g in GROUPS.values())


def configurations(cache: Path, epochs: int, seed: int, runs: Path, only: tuple[str, ...]
                   ) -> list[tuple[str, FitConfig]]:
    base = FitConfig(cache=cache, epochs=epochs, seed=seed, batch_size=64, variant="A", head_input="pool")
    out = []
    for row in only:
        for v in ROWS[row]:
            name = "".join(c for c in row.replace(" ", "_") if c.isalnum() or c in "_-.") + \
                (f"_lr{v['lr']}" if "lr" in v else "") + f"_s{seed}"
            out.append((row, common(replace(base, **v, out=runs / name))))  # (probes: no variant)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tasks", default="fashion,counting")
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--rows", default="all",
                    help=f"comma-separated groups of rows: {', '.join(GROUPS)} (see above)")
    args = ap.parse_args()
    unknown = set(args.rows.split(",")) - set(GROUPS)
    if unknown:
        ap.error(f"--rows: unknown groups {sorted(unknown)}; pick from {', '.join(GROUPS)}")
    only = tuple(dict.fromkeys(r for g in args.rows.split(",") for r in GROUPS[g]))
    stem = f"losa_study_{args.img_size}px"
    bb = backbone_args(args.weights)
    table = previous_results(args, stem)  # tasks not rerun now keep their last results
    for task in args.tasks.split(","):
        images = WORK / "images" / task
        if not images.exists():
            (write_fashion if task == "fashion" else write_counting)(images)
        cache = WORK / "cache" / f"{task}-{bb['model']}-{args.img_size}px"
        extract(ExtractConfig(dataset=str(images), out=cache, img_size=args.img_size, **bb))
        results = defaultdict(list)
        for seed in map(int, args.seeds.split(",")):
            named = configurations(cache, args.epochs, seed, WORK / "runs" / f"{task}-{args.img_size}px", only)
            for (row, _), r in zip(named, train_many([c for _, c in named])):
                results[(row, seed)].append(r)
        rows = defaultdict(list)
        for (row, seed), rs in results.items():
            best = max(rs, key=lambda r: r.val_acc or 0)  # probe lr chosen on val, per seed (None: stopped)
            rows[row].append({"seed": seed, "lr": best.config.lr, "val": best.val_acc,
                              "test": best.test_acc, "params": best.params, "seconds": best.seconds})
        merged = {**table.get(task, {}), **rows}  # rows not rerun now keep their last results
        order = list(ROWS)
        table[task] = {row: merged[row] for row in sorted(
            merged, key=lambda r: order.index(r) if r in order else len(order))}
        plot_pareto([(row, v[0]["params"], float(np.mean([x["test"] for x in v])))
                     for row, v in table[task].items()],
                    RESULTS / f"{stem}_{task}.png", title=f"{task}: test accuracy (mean over seeds) "
                    "against trainable parameters")
        report(table, bb, args, stem)  # after every task: a long study shows its progress


def previous_results(args: argparse.Namespace, stem: str) -> dict:
    path = RESULTS / f"{stem}.json"
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    same = old.get("img_size") == args.img_size and old.get("epochs") == args.epochs
    return old["tasks"] if same else {}


def report(table: dict, bb: dict, args: argparse.Namespace, stem: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"backbone": {k: str(v) for k, v in bb.items()},
                                                         "img_size": args.img_size, "epochs": args.epochs,
                                                         "tasks": table}, indent=2))
    lines = [f"LoSA study: {bb['model']} at {args.img_size} px, {args.epochs} epochs; "
             "800 train / 200 val / 1000 test; best val epoch scored on test; probes: best of lr "
             "1e-3, 1e-2 on val.", ""]
    for task, rows in table.items():
        seeds = sorted({x["seed"] for v in rows.values() for x in v})
        lines += [f"### {task} (seeds {', '.join(map(str, seeds))})", "",
                  "| configuration | trainable params | val acc | test acc (mean ± std) "
                  "| train time per run |", "|---|---:|---:|---:|---:|"]
        for row, v in rows.items():
            test = np.array([x["test"] for x in v]) * 100
            lines.append(f"| {row} | {v[0]['params']:,} | {100 * np.mean([x['val'] for x in v]):.1f} | "
                         f"{test.mean():.1f} ± {test.std():.1f} | {np.mean([x['seconds'] for x in v]):.0f} s |")
        lines.append("")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
