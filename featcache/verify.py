"""`featcache verify`: is every byte of a store there and sound?

Reads every shard (zarr checks each chunk's crc32c as it decodes), and checks
completeness, label range, that no read sample is missing (all zeros: zarr returns the
fill value for a shard file that is gone), and that no token is NaN or infinite.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from rich.progress import Progress

from .codec import decode
from .store import Store


@dataclass
class VerifyReport:
    path: str
    shards: int = 0  # shards checked: all that are flagged done, damaged or not
    samples: int = 0  # stored samples read back (rows of unreadable inputs left out)
    skipped: int = 0  # rows of unreadable inputs in those shards (label -1, no tokens)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _few(items) -> str:
    """The first ten of a list of shards or samples, and how many there are in all."""
    items = [int(i) for i in items]
    return str(items) if len(items) <= 10 else f"{str(items[:10])[:-1]}, ... ({len(items)} in all)]"


def verify(store: Store, progress: Progress | None = None) -> VerifyReport:
    report = VerifyReport(store.path)
    classes = len(store.classes)
    if not store.meta.get("complete"):
        report.problems.append("store is not marked complete (rerun its extract command)")
    for name in store.splits:
        split = store.split(name)
        if not split.done.all():
            missing = np.flatnonzero(~split.done)
            report.problems.append(f"{name}: {len(missing)} shard(s) never finished: {_few(missing)}")
        bad = (split.labels < -1) | (split.labels >= classes)
        if bad.any():
            report.problems.append(f"{name}: {bad.sum()} label(s) outside -1..{classes - 1}")
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
        s = split.shard_size
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
                continue
            z = decode(torch.from_numpy(tokens), store.dtype,
                       None if scales is None else torch.from_numpy(scales),
                       None if store.channel_scale is None else torch.from_numpy(store.channel_scale))
            nonfinite = (~torch.isfinite(z)).flatten(1).any(1).numpy()
            if nonfinite.any():
                report.problems.append(f"{name}: samples {_few(lo + np.flatnonzero(nonfinite))} "
                                       "hold NaN or Inf")
            empty = (z.flatten(1) == 0).all(1).numpy() & (split.labels[lo:hi] >= 0)
            if empty.any():
                report.problems.append(f"{name}: samples {_few(lo + np.flatnonzero(empty))} "
                                       "are all zeros (missing data)")
            stored = int((split.labels[lo:hi] >= 0).sum())
            report.samples += stored
            report.skipped += int(hi - lo) - stored
            if progress:
                progress.advance(task)
    return report
