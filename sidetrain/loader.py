"""Batches from a store split, read a whole shard per call and shuffled in a RAM buffer.

Reading one sample per zarr call is dominated by per-call overhead (~100 MB/s here), so
we read shards whole, shuffle the shard order, and shuffle samples inside a buffer of a
few shards. The order is a pure function of (seed, epoch), which lets the end-to-end
reference (and any resumed run) replay exactly the same batches. Tokens leave the loader
decoded to float32 on the training device (bf16 and int8 are expanded there, not on the CPU).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from featcache.codec import decode
from featcache.fastread import make_reader
from featcache.location import is_url
from featcache.store import Store

BUFFER_BYTES = 512 * 2**20


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, L, T, D) float32, on the device
    labels: torch.Tensor  # (B,) int64, on the device
    index: np.ndarray  # sample indices in the split


class ShardLoader:
    def __init__(self, store: Store, split: str, batch_size: int, shuffle: bool, seed: int = 0,
                 buffer_bytes: int = BUFFER_BYTES, layers: list[int] | None = None,
                 device: str | torch.device = "cpu", reader: str = "auto", recycle: bool = False):
        """`layers`: positions among the store's taps to hand out (None: all of them).
        `reader`: auto (memory-map local shard files where possible), memmap, or zarr.
        `recycle`: decode into two float32 buffers used in turn (CPU only), so a batch is
        valid until the next-but-one is asked for: for loops that use each batch at once.
        Fresh tensors cost page faults: recycling made CPU decoding several times faster."""
        self.split = store.split(split)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.dtype, self.device = store.dtype, torch.device(device)
        self.layers = slice(None) if layers is None else np.asarray(layers)
        cs = store.channel_scale
        self.channel_scale = None if cs is None else torch.from_numpy(cs[self.layers]).to(self.device)
        self.arrays = [a for a in (self.split.tokens, self.split.scales) if a is not None]
        folder = None if is_url(store.path) else Path(store.path) / split  # buckets: zarr reads
        self.readers = [make_reader(a, folder and folder / name, reader)
                        for a, name in zip(self.arrays, ("tokens", "scales"))]
        sample_bytes = sum(int(np.prod(a.shape[1:])) * a.dtype.itemsize for a in self.arrays)
        self.buffer_shards = max(1, buffer_bytes // (self.split.shard_size * sample_bytes))
        self.num_shards = -(-self.split.n // self.split.shard_size)
        self.valid = self.split.labels >= 0  # unreadable inputs were stored with label -1
        self.recycle = recycle and self.device.type == "cpu"
        self._ring: dict[tuple, list[torch.Tensor]] = {}  # shape -> the two buffers
        self._turn = 0
        self._resident: dict[int, list[np.ndarray]] | None = None  # all shards, when they fit the buffer

    def __len__(self) -> int:
        return -(-int(self.valid.sum()) // self.batch_size)

    def _shard_range(self, k: int) -> np.ndarray:
        s = self.split.shard_size
        return np.arange(k * s, min((k + 1) * s, self.split.n))

    def plan(self, epoch: int) -> Iterator[tuple[np.ndarray, list[np.ndarray], np.ndarray]]:
        """Per buffer fill: (shards to read, batches of sample indices, indices carried over)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_shards) if self.shuffle else np.arange(self.num_shards)
        groups = [order[g:g + self.buffer_shards] for g in range(0, len(order), self.buffer_shards)]
        carry = np.empty(0, dtype=np.int64)
        for gi, group in enumerate(groups):
            new = np.concatenate([self._shard_range(k) for k in group])
            new = new[self.valid[new]]
            pool = np.concatenate([carry, rng.permutation(new) if self.shuffle else new])
            cut = len(pool) if gi == len(groups) - 1 else len(pool) // self.batch_size * self.batch_size
            yield group, [pool[i:i + self.batch_size] for i in range(0, cut, self.batch_size)], pool[cut:]
            carry = pool[cut:]

    def _gather(self, blocks: dict[int, list[np.ndarray]], index: np.ndarray,
                carry: tuple[np.ndarray, list[np.ndarray]] | None = None) -> list[np.ndarray]:
        """The samples `index` (with the selected layers) of every array, in one copy each:
        straight from the shard blocks (views into the shard files on the memmap path), or
        from `carry`, (sorted ids, rows) kept over from the previous buffer fill."""
        shard, pos = np.divmod(index, self.split.shard_size)
        kept = np.zeros(len(index), bool) if carry is None else np.isin(index, carry[0])
        out = []
        for i, a in enumerate(self.arrays):
            tail = a.shape[1:] if isinstance(self.layers, slice) else (len(self.layers), *a.shape[2:])
            dest = np.empty((len(index), *tail), a.dtype)
            if kept.any():
                dest[kept] = carry[1][i][np.searchsorted(carry[0], index[kept])]
            for k in np.unique(shard[~kept]):
                m = (shard == k) & ~kept
                rows = pos[m]
                dest[m] = blocks[k][i][rows if isinstance(self.layers, slice) else np.ix_(rows, self.layers)]
            out.append(dest)
        return out

    def _batch(self, parts: list[np.ndarray], index: np.ndarray) -> Batch:
        cuda = self.device.type == "cuda"  # pinned pages let the copy overlap compute
        stored = [(torch.from_numpy(p).pin_memory() if cuda else torch.from_numpy(p))
                  .to(self.device, non_blocking=True) for p in parts]
        tokens = decode(stored[0], self.dtype, stored[1] if len(stored) > 1 else None,
                        self.channel_scale, self._buffer(tuple(stored[0].shape)))
        labels = torch.from_numpy(self.split.labels[index]).to(self.device, non_blocking=True)
        return Batch(tokens, labels, index)

    def _buffer(self, shape: tuple) -> torch.Tensor | None:
        if not self.recycle or self.dtype == "fp32":  # fp32 batches are the gathered arrays
            return None
        ring = self._ring.setdefault(shape, [torch.empty(shape), torch.empty(shape)])
        self._turn ^= 1
        return ring[self._turn]

    def _read(self, group: np.ndarray) -> dict[int, list[np.ndarray]]:
        """Shard k -> every array's samples of that shard, one read call each (a view into
        the shard file on the memmap path, so nothing is copied until a batch gathers)."""
        blocks = {}
        for k in group:
            r = self._shard_range(int(k))
            blocks[int(k)] = [reader.read(int(r[0]), int(r[-1]) + 1) for reader in self.readers]
        return blocks

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        if self.buffer_shards >= self.num_shards:  # the buffer holds it all: read it once
            if self._resident is None:  # memmap: one mapping (and descriptor) per shard file
                self._resident = self._read(np.arange(self.num_shards))
            for _, batches, _ in self.plan(epoch):
                for b in batches:
                    yield self._batch(self._gather(self._resident, b), b)
            return
        plan = list(self.plan(epoch))
        carry = None
        # the next fill is read (zarr) or mapped with read-ahead asked for (memmap) meanwhile
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self._read, plan[0][0])
            for g, (_, batches, left) in enumerate(plan):
                blocks = pending.result()
                if g + 1 < len(plan):
                    pending = pool.submit(self._read, plan[g + 1][0])
                for b in batches:
                    yield self._batch(self._gather(blocks, b, carry), b)
                left = np.sort(left)  # the few samples the next fill's batches still need
                carry = (left, self._gather(blocks, left, carry))
