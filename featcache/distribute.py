"""`featcache extract --dask ADDRESS`: the N parts of a sharded extraction as dask tasks.

One task per worker, so each worker loads the model once. A task is part K of N of the
same store (`--shard K/N`); a worker that dies loses nothing durable, and dask reruns its
task elsewhere (retries), which resumes from the part's last finished shard. Progress is
read from the store itself (its `done` flags), so it reflects what is durable.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import zarr
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .errors import UserError
from .console import console, escape
from .extraction import ExtractConfig, ExtractResult, extract, note_skipped
from .reuse import link
from .store import is_partial_layout, open_store


def _run_part(cfg: ExtractConfig) -> ExtractResult | UserError:
    """A dask task. Daemonic worker processes may not fork DataLoader workers. A UserError
    comes back as a value: the input is at fault, and dask's retries would only repeat it.
    Workers say nothing (local ones share the terminal: N copies of every note, through the
    bar); the client says what matters once, from the plan and the results."""
    console.quiet = True
    if multiprocessing.current_process().daemon:
        cfg = replace(cfg, workers=0)
    try:
        return extract(cfg)
    except UserError as e:
        return e


def _progress(out: Path, names: list[str]) -> tuple[int, int]:
    """(shards done, shards) over the run's splits of the store, or (0, 0) before it exists
    (or before a split the run adds is laid out)."""
    try:
        root = zarr.open_group(str(out), mode="r")
        flags = [root[s]["done"][:] for s in names]
    except Exception:  # not laid out yet
        return 0, 0
    return int(sum(f.sum() for f in flags)), int(sum(len(f) for f in flags))


def _stored(out: Path) -> tuple[dict[str, int], dict[str, dict[str, str]]]:
    """Per split, the samples in finished shards and the inputs recorded unreadable: what a
    run added is the difference (a part whose worker died, and was run again, reports only
    its second try)."""
    if not (out / "zarr.json").exists() or is_partial_layout(out):  # (a layout cut short: laid out again)
        return {}, {}
    store = open_store(out)
    written, skipped = {}, {}
    for name in store.splits:
        split = store.split(name)
        finished = split.done[np.arange(split.n) // split.shard_size]
        written[name] = int(((split.labels >= 0) & finished).sum())
        skipped[name] = dict(split.attrs["skipped"])
    return written, skipped


def extract_on_dask(cfg: ExtractConfig, address: str) -> ExtractResult:
    """Run the extraction as one `--shard K/N` task per worker of a dask cluster."""
    import dask
    from dask.distributed import Client, LocalCluster

    # the size, said once before any work (on this machine's CPU: it may have no GPU);
    # a URL store is refused here, as by every --shard part
    plan = extract(replace(cfg, dry_run=True, device="cpu", shard=(0, 1)))
    out, names = plan.path, list(plan.plan.splits)
    existed = (out / "zarr.json").exists() and not is_partial_layout(out)
    if not existed:
        plan.plan.check_fits(cfg.force)
    written_before, skipped_before = _stored(out)
    if cfg.dry_run:
        return plan
    if plan.twin is not None:  # (the plan said so) every part would return it: run none
        link(out, plan.twin)
        return ExtractResult(path=plan.twin, plan=plan.plan, status="reused", complete=True)
    if address.startswith("local:"):
        try:
            n = int(address[6:])
        except ValueError:
            n = 0
        if n < 1:
            raise UserError(f"--dask local:N needs a worker count N >= 1, not '{address}'")
        with dask.config.set({"distributed.worker.daemon": False}):
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                   dashboard_address=None)
        client = Client(cluster)
    else:
        try:
            client = Client(address, timeout=30)
        except OSError as e:
            raise UserError(f"cannot reach the dask scheduler at {address}: {e}") from None
        cluster = None
    try:
        parts = max(1, len(client.scheduler_info()["workers"]))
        futures = client.map(_run_part, [replace(cfg, shard=(k, parts)) for k in range(parts)],
                             retries=3, pure=False)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        t0 = time.perf_counter()
        with Progress(*columns, console=console) as bar:
            task = bar.add_task(f"{parts} dask worker{'s' * (parts > 1)} -> {escape(str(out))} (shards)",
                                total=None)
            while not all(f.done() for f in futures):
                done, total = _progress(out, names)
                bar.update(task, completed=done, total=total or None)
                time.sleep(0.5)
            done, total = _progress(out, names)
            bar.update(task, completed=done, total=total)
        results: list[ExtractResult | UserError] = client.gather(futures)
    finally:
        client.close()
        if cluster is not None:
            # a worker that has imported torch takes more than the nanny's 4 s to exit, and
            # is killed with a warning; its work is done and on disk by then
            nanny = logging.getLogger("distributed.nanny")
            level = nanny.level
            nanny.setLevel(logging.ERROR)
            try:
                cluster.close()
            except (TimeoutError, asyncio.TimeoutError):  # (after a worker died) the work is done, checked below
                pass
            finally:
                nanny.setLevel(level)
    for r in results:
        if isinstance(r, UserError):
            raise r
    merged = ExtractResult(path=out, plan=plan.plan, seconds=time.perf_counter() - t0, left=plan.left)
    written, skipped = _stored(out)
    for split in written:
        if written[split] > written_before.get(split, 0):
            merged.written[split] = written[split] - written_before.get(split, 0)
        new = {k: why for k, why in skipped[split].items() if k not in skipped_before.get(split, {})}
        if new:
            merged.skipped[split] = new
    statuses = {r.status for r in results}
    merged.status = "already complete" if statuses == {"already complete"} else \
        "resumed" if existed else "written"  # (parts find the store another part laid out)
    if total and done < total:
        raise UserError(f"only {done} of {total} shards of {out} are done; rerun the command.")
    merged.complete = open_store(out).complete  # (not when a --split run leaves other splits unfinished)
    note_skipped(merged)
    return merged
