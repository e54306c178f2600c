"""`sidetrain sweep`: a grid of configurations trained in one pass over the data per seed."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

from featcache import location

from .classifier import ModelSpec
from .plots import plot_pareto
from .train import FitConfig, FitResult, train_many

LOSA_ONLY = ("rank", "variant", "order", "zero_init", "temporal", "prefix_mixing")


def expand(base: FitConfig, grid: dict[str, list], out_root: Path) -> list[FitConfig]:
    """Every combination of the grid's values, each with its own run folder under out_root.

    Options that only LoSA has are dropped for the probes, so `--method losa,linear
    --rank 4,8` trains one linear probe per remaining combination, not two.
    """
    varying = [k for k, v in grid.items() if len(v) > 1]
    configs, seen = [], set()
    for values in itertools.product(*grid.values()):
        cfg = replace(base, **dict(zip(grid, values)))
        if cfg.method != "losa":
            cfg = replace(cfg, **{k: getattr(ModelSpec, k) for k in LOSA_ONLY})
        if cfg.method == "linear":
            cfg = replace(cfg, dropout=0.0)  # a linear head has nothing to drop
        ignored = (LOSA_ONLY if cfg.method != "losa" else ()) + (("dropout",) if cfg.method == "linear" else ())
        name = "-".join([cfg.method] + [f"{k}{getattr(cfg, k)}" for k in varying
                                        if k != "method" and k not in ignored])
        if name in seen:
            continue
        seen.add(name)
        configs.append(replace(cfg, out=out_root / name.replace("/", "_")))
    return configs


def sweep(base: FitConfig, grid: dict[str, list], out_root: Path) -> list[FitResult]:
    """Train the grid (one shared data pass per seed); write sweep.json and pareto.png."""
    configs = expand(base, grid, out_root)
    results: list[FitResult] = []
    for seed in sorted({c.seed for c in configs}):
        results += train_many([c for c in configs if c.seed == seed])
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "sweep.json").write_text(json.dumps([r.to_json() for r in results], indent=2))
    score = [(r.run.name, r.params, r.test_acc if r.test_acc is not None else r.val_acc)
             for r in results if r.best_epoch >= 0]
    plot_pareto(score, out_root / "pareto.png", title=f"{location.name(base.cache)}: test accuracy "
                "(val without a test split) against trainable parameters")
    return results
