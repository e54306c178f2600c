"""`sidetrain sweep`: a grid of configurations trained in one pass over the data per seed."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import fields, replace
from pathlib import Path

from featcache import location
from featcache.console import note
from featcache.errors import UserError
from featcache.store import open_store

from .classifier import ONLY_FOR, common, unused_options
from .loader import DATA_ORDER
from .plots import plot_pareto
from .train import NOT_RECORDED, ONE_PASS, FitConfig, FitResult, read_json, recorded, resolved, train_many, upgraded

FIXED = ONE_PASS + ("out",)  # a sweep runs one pass per seed and names each run's folder


def _check_grid(grid: dict) -> None:
    names = {f.name for f in fields(FitConfig)}
    for key, values in grid.items():
        if key not in names:
            raise UserError(f"the grid's '{key}' is not a FitConfig field; it may vary "
                            f"{', '.join(sorted(names - set(FIXED)))}")
        if key in FIXED:
            raise UserError(f"the grid's '{key}' cannot vary within a sweep (every configuration "
                            "shares one pass over the data): run one sweep per value")
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
            raise UserError(f"the grid's '{key}' takes a list of values, like [{values!r}]")
        if not len(values):
            raise UserError(f"the grid's '{key}' has no values: give it one or more")


def expand(base: FitConfig, grid: dict[str, list], out_root: Path | str) -> list[FitConfig]:
    """Every combination of the grid's values, each with its own run folder under out_root.

    Options a method does not have are dropped for it (ONLY_FOR), so `--method losa,linear
    --rank 4,8` trains one linear probe per remaining combination, not two.
    """
    _check_grid(grid)
    out_root = Path(out_root)
    varying = [k for k, v in grid.items() if len(v) > 1]
    configs, seen = [], set()
    for values in itertools.product(*grid.values()):
        cfg = common(replace(base, **dict(zip(grid, values))))  # (no name part for an unused option)
        ignored = unused_options(cfg.method)
        name = "-".join([cfg.method] + [f"{k}{getattr(cfg, k)}" for k in varying
                                        if k != "method" and k not in ignored])
        if name in seen:
            continue
        seen.add(name)
        configs.append(replace(cfg, out=out_root / re.sub(r"[^\w.+=-]", "_", name)))  # taps last:2
    methods = {c.method for c in configs}
    for key in varying:
        if key in ONLY_FOR and not methods & set(ONLY_FOR[key]):
            note(f"the grid varies {key}, which only {' and '.join(ONLY_FOR[key])} have, and "
                 f"trains none of them (methods: {', '.join(sorted(methods))}): its values are unused.")
    return configs


def sweep(base: FitConfig, grid: dict[str, list], out_root: Path | str) -> list[FitResult]:
    """Train every combination of the grid's values on top of `base` (one shared data pass
    per seed), each in its own folder under `out_root`; write sweep.json and pareto.png
    (with the runs of earlier sweeps into the folder, on the same store, that this one did not
    train again).

    `grid` maps FitConfig fields to lists of values, e.g. {"method": ["losa", "linear"],
    "rank": [4, 16], "lr": [1e-3, 3e-3]}; what one data pass shares (ONE_PASS: cache,
    batch_size, epochs, device, precision, preload) cannot vary."""
    out_root = Path(out_root)
    configs = _continue_equal_runs(_once_each(expand(base, grid, out_root)), out_root)
    results: list[FitResult] = []
    for seed in sorted({c.seed for c in configs}):
        results += train_many([c for c in configs if c.seed == seed])
    out_root.mkdir(parents=True, exist_ok=True)
    # each run named by its folder under out_root, so a sweep folder moved or copied elsewhere
    # (a shared disk, a laptop) still leads to its runs
    rows = [(row := r.to_json()) | {"run": r.run.name, "config": row["config"] | {"out": r.run.name}}
            for r in results]
    earlier = _earlier_rows(out_root, results)
    if earlier:
        note(f"sweep.json also lists the {len(earlier)} earlier run(s) in {out_root} on this store "
             "that this grid did not train again, and pareto.png shows them.")
    rows = earlier + rows
    (out_root / "sweep.json").write_text(json.dumps(rows, indent=2))
    score = [(row["run"], row["params"], row["val_acc"] if row["test_acc"] is None else row["test_acc"])
             for row in rows if row["best_epoch"] >= 0]
    plot_pareto(score, out_root / "pareto.png", title=f"{location.name(base.cache)}: test accuracy "
                "(val without a test split) against trainable parameters")
    return results


def _once_each(configs: list[FitConfig]) -> list[FitConfig]:
    """One run per configuration as trained: `--variant auto,B` is B twice on an image store."""
    if len(configs) < 2:
        return configs
    store = open_store(configs[0].cache)
    first: dict[str, str] = {}
    out = []
    for c in configs:
        key = json.dumps({k: v for k, v in recorded(resolved(c, store)).items() if k != "out"}, sort_keys=True)
        if key in first:
            note(f"{Path(c.out).name} is {first[key]} on this store (the same configuration once "
                 f"resolved): trained once, in {first[key]}/.")
            continue
        first[key] = Path(c.out).name
        out.append(c)
    return out


def _continue_equal_runs(configs: list[FitConfig], out_root: Path) -> list[FitConfig]:
    """Point a configuration that a run of an earlier grid in out_root holds under another
    name at that run, rather than train it again: names hold what a grid varies, so the run
    `--rank 4,8 --lr 1e-3,3e-3` named losa-rank4-lr0.001 is `--rank 4 --lr 1e-3,1e-2`'s
    losa-lr0.001. A name that an earlier grid gave to another configuration (`--rank 4`
    then `--rank 2` both name their run losa) is not refused: the new run's name gets what
    differs (losa-rank2)."""
    if not configs or not out_root.is_dir():
        return configs
    store = open_store(configs[0].cache)
    keys = [f.name for f in fields(FitConfig) if f.name != "out" and f.name not in NOT_RECORDED]
    saved = {path.parent: config for path in sorted(out_root.glob("*/config.json"))
             if isinstance(config := read_json(path), dict)}
    taken = set(saved) | {Path(c.out) for c in configs}
    out = []
    for c in configs:
        now = recorded(resolved(c, store))

        def holds(run: Path) -> bool:  # this configuration, on this extraction (what resume asks)
            config = saved[run]
            return (config.get("data_order") == DATA_ORDER and config.get("store", {}).get("id") == store.meta.get("id")
                    and all(upgraded(config, c, now).get(k) == now[k] for k in keys))

        planned = Path(c.out)
        run = next((r for r in saved if _begun(r) and r != planned and holds(r)), None)
        if run is not None and not (planned in saved and holds(planned)):
            note(f"{planned.name}: {run} holds this configuration; taken up there, not trained again.")
            c = replace(c, out=run)
        elif planned in saved and not holds(planned):
            was = upgraded(saved[planned], c, now)
            differ = "".join(f"-{k}{now[k]}" for k in keys if was.get(k) != now[k] and k != "cache")
            name = re.sub(r"[^\w.+=-]", "_", planned.name + (differ or "-new"))
            free = next(path for i in itertools.count()  # (one this run began before: its own)
                        if (path := planned.with_name(name + (f"-{i}" if i else ""))) in saved and holds(path)
                        or path not in taken and not path.exists())
            taken.add(free)
            other = "another configuration" if differ else (
                "a run this one cannot continue (on another extraction of the store, or by an older sidetrain)")
            note(f"{planned} holds {other} (an earlier grid's): this one trains in {free.name}.")
            c = replace(c, out=free)
        out.append(c)
    return out


def _begun(run: Path) -> bool:
    """Whether a run folder holds training done (a checkpoint, or a finished run's adapter)."""
    return any((run / f).is_file() for f in ("checkpoint.pt", "adapter.safetensors"))


def _earlier_rows(out_root: Path, now: list[FitResult]) -> list[dict]:
    """The other finished runs in out_root trained on the same extraction of the same store,
    from their own summary.json: a rerun with other lists (fewer ranks, one more lr) adds to
    the folder's record instead of replacing it, and runs on another store stay out of it."""
    names = {r.run.name for r in now}
    this = json.loads((now[0].run / "config.json").read_text())  # its cache, absolute, and store id
    unfinished = sorted(p.parent.name for p in out_root.glob("*/config.json")
                        if p.parent.name not in names and not (p.parent / "summary.json").is_file())
    if unfinished:
        note(f"{len(unfinished)} run(s) in {out_root} are unfinished and left out of sweep.json "
             f"({', '.join(unfinished[:5])}{' ...' if len(unfinished) > 5 else ''}): the grid "
             "that began them finishes them.")
    rows = []
    for summary in sorted(out_root.glob("*/summary.json")):
        run = summary.parent
        if run.name in names or not (run / "adapter.safetensors").is_file():
            continue
        try:
            config, row = json.loads((run / "config.json").read_text()), json.loads(summary.read_text())
            cache = upgraded(config, now[0].config, this)["cache"]  # (older runs: as typed)
            same = (cache, config["store"].get("id")) == (this["cache"], this["store"].get("id"))
            if same:
                rows.append({**row, "run": run.name, "config": {**row["config"], "out": run.name}})
        except (OSError, ValueError, KeyError) as e:  # a run cut short, or from an older sidetrain
            note(f"{run} is left out of sweep.json: its config.json or summary.json cannot be read ({e!r}).")
    return rows
