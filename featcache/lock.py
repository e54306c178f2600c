"""One writer per store: an exclusive flock that the kernel releases when the writer dies.

zarr-python gives no protection against two writers on one shard (they silently lose data,
zarr-python#3682), so extract holds this lock for the whole run. A flock is never left
behind by a crashed or SIGKILLed process, so no stale-lock cleanup is ever needed.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from .errors import UserError

LOCK_NAME = ".featcache.lock"


class StoreLock:
    def __init__(self, store_dir: Path):
        self.path = Path(store_dir) / LOCK_NAME
        self.file = None

    def __enter__(self) -> "StoreLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown process"
            self.file.close()
            raise UserError(f"{self.path.parent} is being written by another featcache process "
                            f"({holder}). Wait for it to finish, or stop it first.") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
