"""`featcache verify`: is every byte of a store there and sound? (and `--repair`)

Reads every shard (zarr checks each chunk's crc32c as it decodes), and checks
completeness, label range, that no read sample is missing (all zeros: zarr returns the
fill value for a shard file that is gone), and that no token is NaN or infinite.

A damaged shard is redone, not mended: `repair` clears its done flag, so that a rerun of
the extract command that made the store recomputes it (and it alone) from its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from rich.progress import Progress

from .codec import decode
from .errors import UserError
from .lock import StoreLock, meta_lock
from .store import ATTR, Store, open_store


@dataclass
class VerifyReport:
    path: str
    id: str | None = None  # the extraction verified (a repair refuses another)
    shards: int = 0  # shards checked: all that are flagged done, damaged or not
    samples: int = 0  # stored samples read back (rows of unreadable inputs left out)
    skipped: int = 0  # rows of unreadable inputs in those shards (label -1, no tokens)
    problems: list[str] = field(default_factory=list)
    damaged: dict[str, list[int]] = field(default_factory=dict)  # per split, the shards to redo

    @property
    def ok(self) -> bool:
        return not self.problems


def _few(items) -> str:
    """The first ten of a list of shards or samples, and how many there are in all."""
    items = [int(i) for i in items]
    return str(items) if len(items) <= 10 else f"{str(items[:10])[:-1]}, ... ({len(items)} in all)]"


def verify(store: Store, progress: Progress | None = None) -> VerifyReport:
    report = VerifyReport(store.path, store.meta.get("id"))
    classes = len(store.classes)
    if not store.meta.get("complete"):
        report.problems.append("store is not marked complete (rerun its extract command)")
    for name in store.splits:
        try:
            split = store.split(name)
        except UserError as e:  # (its labels or flags unreadable: nothing of it can be checked)
            report.problems.append(f"{name}: {e}")
            continue
        if not split.done.all():
            missing = np.flatnonzero(~split.done)
            report.problems.append(f"{name}: {len(missing)} shard(s) never finished: {_few(missing)}")
        s = split.shard_size
        redo = set()  # this split's damaged shards
        bad = (split.labels < -1) | (split.labels >= classes)
        if bad.any():
            report.problems.append(f"{name}: {bad.sum()} label(s) outside -1..{classes - 1}")
            redo |= set((np.flatnonzero(bad) // s).tolist())
        # only in finished shards: an unwritten row reads -1 too, and a shard's skipped
        # inputs are recorded just before it is flagged done
        written = split.done[np.arange(split.n) // split.shard_size]
        unread = set(split.keys[(split.labels == -1) & written].tolist())
        if unread != set(split.attrs["skipped"]) - set(split.keys[~written].tolist()):
            report.problems.append(f"{name}: labels of -1 do not match the recorded skipped inputs")
        lost = set(split.lost_shards(store.path))
        if lost:
            report.problems.append(f"{name}: shard(s) {_few(sorted(lost))} flagged done have no file "
                                   "(the store was damaged or copied in part)")
            redo |= lost
        task = progress.add_task(f"verify {name}", total=len(split.done)) if progress else None
        for k in np.flatnonzero(split.done):
            report.shards += 1
            if k in lost:
                continue
            lo, hi = k * s, min((k + 1) * s, split.n)
            try:
                tokens = split.tokens[lo:hi]
                scales = split.scales[lo:hi] if split.scales is not None else None
            except Exception as e:  # a checksum mismatch or an unreadable shard file
                why = ("its bytes changed since they were written (a checksum does not match)"
                       if "checksum" in str(e).lower() else
                       f"unreadable: {(str(e).splitlines() or [type(e).__name__])[0][:200]}")
                report.problems.append(f"{name}: shard {k} (samples {lo}-{hi - 1}) is damaged: {why}")
                redo.add(int(k))
                continue
            z = decode(torch.from_numpy(tokens), store.dtype,
                       None if scales is None else torch.from_numpy(scales),
                       None if store.channel_scale is None else torch.from_numpy(store.channel_scale))
            nonfinite = (~torch.isfinite(z)).flatten(1).any(1).numpy()
            if nonfinite.any():
                report.problems.append(f"{name}: samples {_few(lo + np.flatnonzero(nonfinite))} "
                                       "hold NaN or Inf")
                redo.add(int(k))
            empty = (z.flatten(1) == 0).all(1).numpy() & (split.labels[lo:hi] >= 0)
            if empty.any():
                report.problems.append(f"{name}: samples {_few(lo + np.flatnonzero(empty))} "
                                       "are all zeros (missing data)")
                redo.add(int(k))
            stored = int((split.labels[lo:hi] >= 0).sum())
            report.samples += stored
            report.skipped += int(hi - lo) - stored
            if progress:
                progress.advance(task)
        if redo:
            report.damaged[name] = sorted(redo & set(np.flatnonzero(split.done).tolist()))
    return report


def repair(path: str, report: VerifyReport) -> int:
    """Clear the done flags of the shards `report` found damaged, and the complete flags
    above them (those first: a repair cut short leaves a store that says it is incomplete),
    under the writer's lock; return how many shards were cleared. The unreadable inputs
    recorded for those shards are dropped too: the rerun records them again. The store keeps
    its id, so runs trained on it stay valid once it is whole again."""
    with StoreLock(path), meta_lock(path):
        store = open_store(path, mode="r+")
        if store.meta.get("id") != report.id:
            raise UserError(f"{path} was extracted again since it was verified: verify it again.")
        store.group.attrs[ATTR] = {**store.meta, "complete": False}
        for name, shards in report.damaged.items():
            split, g = store.split(name), store.group[name]
            done = split.done.copy()
            done[shards] = False
            kept = done[np.arange(split.n) // split.shard_size] & (split.labels == -1)
            unread = set(split.keys[kept].tolist()) if kept.any() else set()
            attrs = dict(g.attrs[ATTR])
            attrs["skipped"] = {k: why for k, why in attrs["skipped"].items() if k in unread}
            attrs["complete"] = False
            g.attrs[ATTR] = attrs
            for k in shards:  # (one flag a chunk: the others are not rewritten)
                g["done"][k] = False
    return sum(map(len, report.damaged.values()))
