"""Who may write a store: flocks that the kernel releases when their holder dies.

zarr-python gives no protection against two writers on one shard (they silently lose data,
zarr-python#3682). So:

- a single-process extraction holds `.featcache.lock` exclusively;
- a `--shard K/N` extraction holds it shared (the N parts may run together) and
  `.featcache.lock.KofN` exclusively (the same part may not run twice; a part of another N
  is refused while one of these is held);
- every read-modify-write of the store's attributes (layout, skipped inputs, completeness)
  happens under `.featcache.meta.lock`, waited for rather than refused.

A flock is never left behind by a crashed or SIGKILLed process: no stale-lock cleanup.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError
from .location import Location, is_url

LOCK_NAME = ".featcache.lock"
META_LOCK = ".featcache.meta.lock"
PARTS = "the parts of a --shard run"  # who holds the lock shared, unnamed
TAKE_PATIENCE = 0.5  # seconds a writer retries a lock before it is refused (see _lock)

# A flock belongs to the open file, which a forked child (a DataLoader worker) shares: after
# a kill -9 the orphaned workers would hold the lock for seconds more. So a child points
# its copies of the lock files at /dev/null (the numbers stay valid) and holds nothing.
_held: set = set()


def _drop_in_child() -> None:
    for f in _held:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, f.fileno())
        os.close(null)
    _held.clear()


os.register_at_fork(after_in_child=_drop_in_child)


class StoreLock:
    """Held while writing a local store. Object stores have no locks: a URL store takes one
    writer, which extract enforces by refusing --shard and --dask there."""

    def __init__(self, store_dir: Location, part: tuple[int, int] | None = None):
        self.remote = is_url(store_dir)
        self.dir = Path(store_dir) if not self.remote else store_dir
        self.part = part
        self.files: list = []

    def _take(self, name: str, mode: int) -> None:
        try:
            f = _open(self.dir / name)
        except UserError:
            self.release()
            raise
        if not _lock(f, mode, patience=TAKE_PATIENCE):
            f.seek(0)
            # an exclusive writer names itself; the --shard parts share the lock unnamed (and
            # leave the line of the last exclusive writer in place)
            parts = mode == fcntl.LOCK_EX and name == LOCK_NAME and _live_parts(self.dir)
            holder = PARTS if parts else f.read().strip() or "another process"
            f.close()
            self.release()
            raise _busy(self.dir, holder) from None
        if mode == fcntl.LOCK_EX:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
        self.files.append(f)
        _held.add(f)

    def __enter__(self) -> "StoreLock":
        if self.remote:
            return self
        if self.part is None or self.part[1] == 1:
            self._take(LOCK_NAME, fcntl.LOCK_EX)
        else:
            k, n = self.part
            self._take(LOCK_NAME, fcntl.LOCK_SH)
            self._take(f"{LOCK_NAME}.{k}of{n}", fcntl.LOCK_EX)
            other = next((m for m in _live_parts(self.dir) if m != n), None)
            if other is not None:  # parts of another N would write one another's shards
                self.release()
                raise _other_parts(self.dir, other, self.part)
        return self

    def release(self) -> None:
        for f in self.files:
            _held.discard(f)
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()
        self.files = []

    def __exit__(self, *exc) -> None:
        self.release()


def _lock(f, mode: int, patience: float = 0.0) -> bool:
    """Take a flock without waiting for a holder, but retrying for `patience` seconds: a
    probe (below) holds a shared lock for an instant, which must not refuse a writer."""
    deadline = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(f, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def _held_exclusively(lock_file: Path) -> str | None:
    """The holder's line if someone holds `lock_file` exclusively, else None. A shared probe,
    released at once: it never stands in the way of shared holders."""
    try:
        f = open(lock_file)
    except OSError:  # never made, or not ours to read
        return None
    with f:
        if _lock(f, fcntl.LOCK_SH):
            fcntl.flock(f, fcntl.LOCK_UN)
            return None
        return f.read().strip() or "another process"


def _busy(store_dir: Location, holder: str) -> UserError:
    return UserError(f"{store_dir} is being written by another featcache process ({holder}). "
                     "Wait for it to finish, or stop it first.")


def _other_parts(store_dir: Location, other: int, part: tuple[int, int]) -> UserError:
    return UserError(f"{store_dir} is being written by the parts of a --shard K/{other} run: every "
                     f"part must use the same N as those (this one: {part[0]}/{part[1]}).")


def refuse_if_written(store_dir: Location, part: tuple[int, int] | None) -> None:
    """Refuse at once, before any work, what StoreLock would refuse later: a store that
    another process writes (for a --shard part: one that is not a part of the same N, or
    the same part run twice). StoreLock still decides: it may be taken in between."""
    if is_url(store_dir):
        return
    d = Path(store_dir)
    holder, parts = _held_exclusively(d / LOCK_NAME), _live_parts(d)
    if part is None or part[1] == 1:
        if holder or parts:
            raise _busy(d, holder or PARTS)
        return
    same_part = _held_exclusively(d / f"{LOCK_NAME}.{part[0]}of{part[1]}")
    if holder or same_part:
        raise _busy(d, holder or same_part)
    other = next((m for m in parts if m != part[1]), None)
    if other is not None:
        raise _other_parts(d, other, part)


def _live_parts(store_dir: Path) -> set[int]:
    """The N of every --shard K/N part writing the store now."""
    return {int(p.name.rsplit("of", 1)[1]) for p in store_dir.glob(f"{LOCK_NAME}.*of*")
            if p.name.rsplit("of", 1)[1].isdigit() and _held_exclusively(p)}


def writer(store_dir: Location) -> str | None:
    """Who is writing a local store now ("pid N on HOST", or the parts of a --shard run),
    or None."""
    if is_url(store_dir):
        return None
    return _held_exclusively(Path(store_dir) / LOCK_NAME) or (
        PARTS if _live_parts(Path(store_dir)) else None)


def _open(lock_file: Path):
    """A lock file, opened to be locked (and made, with its store's folder, if need be)."""
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        return open(lock_file, "a+")
    except OSError as e:  # permissions, a read-only mount, a full disk
        what = {errno.EROFS: "extract to a folder on a writable disk (--out)",
                errno.ENOSPC: "free some space first", errno.EDQUOT: "free some space first"}.get(e.errno, (
                    "only who may write a store's folder can extract into it. In a lab, make "
                    "the cache group-writable (a setgid group folder, `chmod -R g+w`, and umask "
                    "002 for whoever extracts)"))
        raise UserError(f"cannot write to {lock_file.parent} ({e.strerror}): {what}.") from None


@contextmanager
def meta_lock(store_dir: Location):
    """Serialise attribute updates between the parts of a sharded extraction (local stores:
    a URL store has a single writer)."""
    if is_url(store_dir):
        yield
        return
    with _open(Path(store_dir) / META_LOCK) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        _held.add(f)  # (int8 calibration may fork loader workers meanwhile)
        try:
            yield
        finally:
            _held.discard(f)
            fcntl.flock(f, fcntl.LOCK_UN)
