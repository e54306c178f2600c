"""Who may write a store: flocks that the kernel releases when their holder dies.

zarr-python gives no protection against two writers on one shard (they silently lose data,
zarr-python#3682). So:

- a single-process extraction holds `.featcache.lock` exclusively;
- a `--shard K/N` extraction holds it shared (the N parts may run together) and
  `.featcache.lock.KofN` exclusively (the same part may not run twice);
- every read-modify-write of the store's attributes (layout, skipped inputs, completeness)
  happens under `.featcache.meta.lock`, waited for rather than refused.

A flock is never left behind by a crashed or SIGKILLed process: no stale-lock cleanup.
"""

from __future__ import annotations

import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError
from .location import Location, is_url

LOCK_NAME = ".featcache.lock"
META_LOCK = ".featcache.meta.lock"


class StoreLock:
    """Held while writing a local store. Object stores have no locks: a URL store takes one
    writer, which extract enforces by refusing --shard and --dask there."""

    def __init__(self, store_dir: Location, part: tuple[int, int] | None = None):
        self.remote = is_url(store_dir)
        self.dir = Path(store_dir) if not self.remote else store_dir
        self.part = part
        self.files: list = []

    def _take(self, name: str, mode: int) -> None:
        f = open(self.dir / name, "a+")
        try:
            fcntl.flock(f, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            self.release()
            raise UserError(f"{self.dir} is being written by another featcache process ({holder}). "
                            "Wait for it to finish, or stop it first.") from None
        if mode == fcntl.LOCK_EX:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
        self.files.append(f)

    def __enter__(self) -> "StoreLock":
        if self.remote:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.part is None or self.part[1] == 1:
            self._take(LOCK_NAME, fcntl.LOCK_EX)
        else:
            self._take(LOCK_NAME, fcntl.LOCK_SH)
            self._take(f"{LOCK_NAME}.{self.part[0]}of{self.part[1]}", fcntl.LOCK_EX)
        return self

    def release(self) -> None:
        for f in self.files:
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()
        self.files = []

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def meta_lock(store_dir: Location):
    """Serialise attribute updates between the parts of a sharded extraction (local stores:
    a URL store has a single writer)."""
    if is_url(store_dir):
        yield
        return
    Path(store_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(store_dir) / META_LOCK, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
