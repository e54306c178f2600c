"""Shards as the extraction's unit of work: which batches are left, filling one, writing it.

Batches never straddle a shard, and a shard is flagged done only once it is written, so a
rerun recomputes exactly the shards that are not done.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import numpy as np

from .codec import out_of_range
from .console import say
from .errors import UserError, disk_full
from .readback import InFlight
from .sources import Split
from .store import STORAGE, Store, write_shard


def shard_batches(store: Store, names: list[str], batch_size: int,
                  part: tuple[int, int] | None) -> list[list]:
    """Batches of (split id, index) covering every shard not yet done (of this part, with
    --shard K/N: the shards whose position over all splits is K modulo N); never across
    shards. Split ids index `names`; the store's other splits (not named by --split) are
    left as they are, their shards counted all the same: parts that name other splits still
    number every shard alike."""
    batches, position = [], 0
    k_of, n_of = part or (0, 1)
    for name in store.splits:  # the store's order: every part numbers shards alike
        arrays = store.split(name)
        if name not in names:
            position += len(arrays.done)
            continue
        sid = names.index(name)
        s, n = arrays.shard_size, arrays.n
        for k, done in enumerate(arrays.done):
            mine = position % n_of == k_of
            position += 1
            if done or not mine:
                continue
            lo, hi = k * s, min((k + 1) * s, n)
            for b in range(lo, hi, batch_size):
                batches.append([(sid, i) for i in range(b, min(b + batch_size, hi))])
    return batches


@dataclass
class Shard:
    """The shard being filled: its rows arrive batch by batch, then it goes to the writer."""

    split: str
    index: int
    lo: int
    tokens: np.ndarray
    scales: np.ndarray | None
    labels: np.ndarray
    keys: list[str]
    dtype: str  # as the store holds tokens: what range they may span
    skipped: dict[str, str] = field(default_factory=dict)

    @classmethod
    def empty(cls, name: str, split: Split, index: int, size: int, shape: tuple, dtype: str) -> Shard:
        lo, hi = index * size, min((index + 1) * size, len(split))
        scales = np.zeros((hi - lo, *shape[:2]), np.float32) if dtype == "int8" else None
        return cls(name, index, lo, np.zeros((hi - lo, *shape), STORAGE[dtype]), scales,
                   split.labels[lo:hi].copy(), split.keys[lo:hi], dtype)

    def fill(self, items: list, encoded: InFlight | None, ok: np.ndarray, reasons: list[str]) -> None:
        """Rows `items` (of which `ok` were read; `reasons` says why the others were not)."""
        rows = np.array([i for _, i in items]) - self.lo
        if encoded is not None:
            tokens, scales, (lo, hi) = encoded.collect()
            why = out_of_range(float(lo), float(hi), self.dtype)
            if why:
                more = int(ok.sum()) - 1
                raise UserError(f"split {self.split}, input {self.keys[rows[ok][0]]}"
                                f"{f' or one of the {more} after it in its batch' if more else ''}: "
                                f"{why}. Then extract again into another --out, or delete this one.")
            self.tokens[rows[ok]] = tokens
            if self.scales is not None:
                self.scales[rows[ok]] = scales
        for r, why in zip(rows[~ok], np.array(reasons, dtype=object)[~ok]):
            self.labels[r] = -1
            self.skipped[self.keys[r]] = why

    @property
    def stored(self) -> int:
        """Samples stored (not `skipped`'s length: the views of an image share its key)."""
        return int((self.labels >= 0).sum())


BUGS = (TypeError, AttributeError, NameError, KeyError, IndexError, AssertionError,
        NotImplementedError)  # errors of the code, never of the disk or the network


class ShardWriter:
    """Writes finished shards on a background thread so the backbone never waits on I/O.
    Use it as a context manager: the thread runs from `with` until the exit has written
    every queued shard."""

    def __init__(self, store: Store):
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)  # started by `with`

    def _run(self) -> None:
        while (shard := self.queue.get()) is not None:
            if self.error is None:
                try:
                    write_shard(self.store, shard.split, shard.index, shard.tokens, shard.scales,
                                shard.labels, shard.keys, shard.skipped)
                except BUGS as e:  # our mistake, not the storage's: keep its traceback
                    self.error = e
                except Exception as e:  # disk full, a bucket gone away: say so, in one line
                    why = "the disk is full: free some space" if disk_full(e) else f"{type(e).__name__}: {e}"
                    self.error = UserError(
                        f"writing shard {shard.index} of split '{shard.split}' to {self.store.path} "
                        f"failed ({why}). Every shard written before it is kept: "
                        "rerun the same command to continue from there.")
                    self.error.__cause__ = e

    def put(self, shard: Shard) -> None:
        if self.error:
            raise self.error
        self.queue.put(shard)

    def __enter__(self) -> ShardWriter:
        self.thread.start()
        return self

    def __exit__(self, kind, error, trace) -> None:
        """Write what is queued and wait for it, even after an error elsewhere (Ctrl-C): no
        shard may be written once the store's lock is let go. Then raise a write's error."""
        if kind is not None and self.error is None and self.queue.qsize():
            say(f"writing the {self.queue.qsize()} shard(s) already computed before stopping ...")
        self.queue.put(None)
        self.thread.join()
        if self.error and kind is None:
            raise self.error
