"""Batches from a store split, read a stripe of a shard per call and shuffled in a RAM buffer.

Reading one sample per zarr call is dominated by per-call overhead (~100 MB/s here), so
we read stripes: runs of consecutive samples of a shard, several MB each. Each epoch
shuffles the stripes of the whole split, fills the buffer with the next ones and shuffles
the samples inside it. Stripes rather than whole shards because stores keep their
dataset's order, often sorted by class: a buffer of a few whole shards then holds a few
classes, and the batches drawn from it are skewed (at 224 px a 512 MB buffer held 3 of
15 shards, and the 224 px study's train losses swung above chance). Buckets are the
exception: zarr reads part of a shard with one request per sample, so there a stripe is a
whole shard. The order is a pure function of (seed, epoch), which lets the end-to-end
reference (and any resumed run) replay exactly the same batches. Tokens leave the loader on
the training device as stored when 16-bit (fp16, bf16: a batch takes half the memory, and
the models widen to float32 what they read, LoSA one layer at a time), else as float32
(int8 is expanded on the device, not on the CPU). For a GPU, a batch is gathered straight
into pinned memory, in a background thread while the GPU trains on the batch before, and
copied without blocking; or, preloaded, the whole split is held in the GPU's memory and
batches are drawn there (the same batches).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from featcache.codec import decode
from featcache.errors import UserError, is_int, require
from featcache.fastread import make_reader
from featcache.location import is_url
from featcache.plan import human_bytes
from featcache.store import Store, open_store

# torch warns (once) that tensors made from read-only arrays must not be written to: the
# memory-mapped shard files are read-only, and the loader only reads them
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)

T = TypeVar("T")
_TORCH_DTYPE = {np.dtype(t): getattr(torch, t) for t in ("float32", "float16", "uint16", "int8")}
BUFFER_BYTES = 512 * 2**20
DATA_ORDER = "stripes-1"  # saved with each run: a run resumes only under the order it began with
READ_BYTES = 8 * 2**20  # a stripe of at least this much, so zarr's per-call cost stays small
MIN_STRIPES = 16  # ... but a buffer fill draws from at least this many places of the split


@dataclass
class Batch:
    """One batch: tokens (as the store holds them when 16-bit: `.float()` them for a head
    of your own), labels, and which samples of the split they are."""

    tokens: torch.Tensor  # (B, L, T, D) float16 / bfloat16 (16-bit stores) or float32, on the device
    labels: torch.Tensor  # (B,) int64, on the device
    index: np.ndarray  # sample indices in the split


class ShardLoader:
    """Shuffled (or in-order) batches of a split, epoch by epoch:

        loader = ShardLoader(open_store("cache/demo"), "train", batch_size=64, shuffle=True)
        for epoch in range(10):
            for batch in loader.epoch(epoch):  # the order is a function of (seed, epoch)
                logits = head(batch.tokens.float()[:, -1, 0])  # last tap, first token

    `for batch in loader` gives the next epoch, as a torch DataLoader that reshuffles would
    (the first loop epoch 0, the next epoch 1, ...). `len(loader)` is the number of batches an
    epoch gives. Unreadable inputs (label -1) are left out."""

    def __init__(self, store: Store, split: str, batch_size: int, shuffle: bool = False, seed: int = 0,
                 buffer_bytes: int = BUFFER_BYTES, layers: list[int] | None = None,
                 device: str | torch.device = "cpu", reader: str = "auto", recycle: bool = False,
                 preload: bool = False):
        """`layers`: positions among the store's taps to hand out (None: all of them).
        `reader`: auto (memory-map local shard files where possible), memmap, or zarr.
        `recycle`: copy or decode into two buffers used in turn (CPU only), so a batch is
        valid until the next-but-one is asked for: for loops that use each batch at once.
        Fresh tensors cost page faults: recycling made CPU decoding several times faster.
        `preload`: read the split (its selected layers) into the device's memory at the first
        epoch and draw every batch there, the same batches: on a GPU with room for the
        split, no host work per batch (streamed, the host's copies set the pace)."""
        if not isinstance(store, Store):  # a folder or URL, as the other entry points take
            store = open_store(store)
        require(is_int(batch_size) and batch_size >= 1, "batch_size", "a whole number of at least 1",
                batch_size)
        self.split = store.split(split)
        self.split.check_intact(store.path)  # lost shard files would read as zeros: never train on them
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.dtype, self.device = store.dtype, torch.device(device)
        self.out_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.dtype, torch.float32)
        taps = self.split.tokens.shape[1]
        if layers is not None and not all(-taps <= p < taps for p in layers):
            raise UserError(f"layers={layers}: positions among the store's {taps} taps (blocks "
                            f"{store.taps}) are 0 to {taps - 1}, or -1 (the last) to -{taps}")
        picked = np.arange(taps)[slice(None) if layers is None else list(layers)]
        # a run of consecutive layers (all of them, the last few) is a slice: rows read as views
        run = len(picked) == 1 or bool((np.diff(picked) == 1).all())
        self.layers = slice(int(picked[0]), int(picked[-1]) + 1) if run else picked
        self.n_layers = len(picked)
        cs = store.channel_scale
        self.channel_scale = None if cs is None else torch.from_numpy(cs[self.layers]).to(self.device)
        self.arrays = [a for a in (self.split.tokens, self.split.scales) if a is not None]
        folder = None if is_url(store.path) else Path(store.path) / split  # buckets: zarr reads
        self.readers = [make_reader(a, folder and folder / name, reader)
                        for a, name in zip(self.arrays, ("tokens", "scales"))]
        sample_bytes = sum(int(np.prod(a.shape[1:])) * a.dtype.itemsize for a in self.arrays)
        buffer_samples = max(1, buffer_bytes // sample_bytes)
        shard = self.split.shard_size
        self.stripe = max(1, min(-(-READ_BYTES // sample_bytes), buffer_samples // MIN_STRIPES, shard))
        if folder is None:  # a bucket: one request per shard (see above)
            self.stripe = shard
        self.stripes_per_shard = -(-shard // self.stripe)
        # stripe key k * stripes_per_shard + j: the j-th stripe of shard k (none crosses a shard)
        self.stripes = np.array([k * self.stripes_per_shard + j for k in range(-(-self.split.n // shard))
                                 for j in range(self.stripes_per_shard)
                                 if k * shard + j * self.stripe < self.split.n])
        self.fits = buffer_samples >= self.split.n  # then the split is read once and kept
        self.buffer_stripes = len(self.stripes) if self.fits else max(1, buffer_samples // self.stripe)
        self.valid = self.split.labels >= 0  # unreadable inputs were stored with label -1
        # (a recycled buffer is valid until the next-but-one batch: never with batches made ahead)
        self.recycle = recycle and self.device.type == "cpu"
        self.direct = self.recycle and self.dtype in ("fp16", "bf16")  # gathered into the ring
        self._ring: dict[tuple, list[torch.Tensor]] = {}  # shape -> the two buffers
        self._turn = 0
        self._resident: dict[int, list[np.ndarray]] | None = None  # every stripe, when all fit the buffer
        self.preload = preload
        self._preloaded: list[torch.Tensor] | None = None  # every array, then the labels, on the device
        self._epochs_begun = 0  # by `for batch in loader`

    def __len__(self) -> int:
        return -(-int(self.valid.sum()) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        self._epochs_begun += 1
        return self.epoch(self._epochs_begun - 1)

    def _stripe_range(self, key: int) -> np.ndarray:
        k, j = divmod(int(key), self.stripes_per_shard)
        lo = k * self.split.shard_size + j * self.stripe
        return np.arange(lo, min(lo + self.stripe, (k + 1) * self.split.shard_size, self.split.n))

    def _stripe_of(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sample indices -> (stripe key, row in the stripe)."""
        k, pos = np.divmod(index, self.split.shard_size)
        j, row = np.divmod(pos, self.stripe)
        return k * self.stripes_per_shard + j, row

    def plan(self, epoch: int) -> Iterator[tuple[np.ndarray, list[np.ndarray], np.ndarray]]:
        """Per buffer fill: (stripes to read, batches of sample indices, indices carried over)."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.fits:  # one fill, whatever the stripes: a bucket and a local copy agree
            groups = [self.stripes]
        else:  # (streamed, they do not: a bucket's stripes are whole shards)
            order = rng.permutation(self.stripes) if self.shuffle else self.stripes
            groups = [order[g:g + self.buffer_stripes] for g in range(0, len(order), self.buffer_stripes)]
        carry = np.empty(0, dtype=np.int64)
        for gi, group in enumerate(groups):
            new = np.concatenate([self._stripe_range(key) for key in group])
            new = new[self.valid[new]]
            pool = np.concatenate([carry, rng.permutation(new) if self.shuffle else new])
            cut = len(pool) if gi == len(groups) - 1 else len(pool) // self.batch_size * self.batch_size
            yield group, [pool[i:i + self.batch_size] for i in range(0, cut, self.batch_size)], pool[cut:]
            carry = pool[cut:]

    def _sources(self, index: np.ndarray, carry: tuple[np.ndarray, list[torch.Tensor]] | None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where each sample is: (stripe key, row in it, whether `carry` holds it instead)."""
        stripe, pos = self._stripe_of(index)
        return stripe, pos, np.zeros(len(index), bool) if carry is None else np.isin(index, carry[0])

    def _gather(self, blocks: dict[int, list[np.ndarray]], index: np.ndarray,
                carry: tuple[np.ndarray, list[torch.Tensor]] | None = None, pin: bool = False,
                into: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The samples `index` (with the selected layers) of every array, each sample copied
        once, straight from the stripes read (views into the shard files on the memmap path)
        or from `carry`, (sorted ids, rows) kept over from the previous buffer fill. Into
        fresh tensors, page-locked ones with `pin` (a copy to the GPU then runs without
        blocking, and torch's pinned-memory cache holds a buffer back until its copy is
        done), or the tokens `into` a recycled buffer. One torch copy per sample: numpy's
        fancy indexing went through a temporary, moving every byte twice at about half the
        speed (on an H200 machine a ViT-B batch was gathered at 1.8 GB/s that way)."""
        stripe, pos, kept = self._sources(index, carry)
        pick = self.layers if isinstance(self.layers, slice) else torch.from_numpy(self.layers)
        out = []
        for i, a in enumerate(self.arrays):
            raw = _TORCH_DTYPE[np.dtype(a.dtype)]
            if i == 0 and into is not None:
                dest = into.view(raw)
            else:
                dest = torch.empty((len(index), self.n_layers, *a.shape[2:]), dtype=raw, pin_memory=pin)
            for j, sample in enumerate(index):
                if kept[j]:  # carried rows hold the selected layers already
                    dest[j].copy_(carry[1][i][np.searchsorted(carry[0], sample)])
                else:
                    src = torch.from_numpy(blocks[stripe[j]][i][pos[j]])
                    if isinstance(pick, slice):
                        dest[j].copy_(src[pick])
                    else:
                        torch.index_select(src, 0, pick, out=dest[j])
            out.append(dest)
        return out

    def _host(self, blocks: dict[int, list[np.ndarray]], index: np.ndarray,
              carry: tuple[np.ndarray, list[torch.Tensor]] | None = None
              ) -> tuple[list[torch.Tensor], torch.Tensor, np.ndarray]:
        """A batch's share of the work on the host: its arrays gathered, its labels."""
        pin = self.device.type == "cuda"  # a copy from pageable memory may wait for the GPU
        labels = torch.from_numpy(self.split.labels[index])
        into = self._buffer((len(index), self.n_layers, *self.arrays[0].shape[2:])) if self.direct else None
        return self._gather(blocks, index, carry, pin, into), labels.pin_memory() if pin else labels, index

    def _on_device(self, parts: list[torch.Tensor], labels: torch.Tensor, index: np.ndarray) -> Batch:
        """A gathered batch moved to the training device (without blocking) and decoded there."""
        labels = labels.to(self.device, non_blocking=True)
        stored = [p.to(self.device, non_blocking=True) for p in parts]
        if self.out_dtype != torch.float32:  # 16-bit tokens leave as they are
            return Batch(stored[0].view(self.out_dtype), labels, index)
        tokens = decode(stored[0], self.dtype, stored[1] if len(stored) > 1 else None,
                        self.channel_scale, self._buffer(tuple(stored[0].shape)))
        return Batch(tokens, labels, index)

    def _buffer(self, shape: tuple) -> torch.Tensor | None:
        if not self.recycle or self.dtype == "fp32":  # fp32 batches are the gathered arrays
            return None
        ring = self._ring.setdefault(shape, [torch.empty(shape, dtype=self.out_dtype) for _ in range(2)])
        self._turn ^= 1
        return ring[self._turn]

    def _read(self, group: np.ndarray) -> dict[int, list[np.ndarray]]:
        """Stripe key -> every array's samples of that stripe, one read call each (a view
        into the shard file on the memmap path, so nothing is copied until a batch takes them)."""
        blocks = {}
        for key in np.sort(group):  # shard by shard: each shard file mapped once per fill
            r = self._stripe_range(key)
            blocks[int(key)] = [reader.read(int(r[0]), int(r[-1]) + 1) for reader in self.readers]
        return blocks

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        """The batches of epoch `epoch` (each epoch its own order when shuffling). Streamed to
        a GPU, the next batch is gathered in a background thread while the GPU trains on this
        one; preloaded, each is picked from the split on the device."""
        if self.preload:
            preload([self])
            *arrays, labels = self._preloaded
            batches = [b for _, fill, _ in self.plan(epoch) for b in fill]
            # every batch's rows copied over at once: a copy per batch would wait for the GPU
            rows = torch.from_numpy(np.concatenate([np.empty(0, np.int64), *batches])).to(self.device)
            start = 0
            for b in batches:
                r, start = rows[start:start + len(b)], start + len(b)
                yield self._on_device([a.index_select(0, r) for a in arrays], labels.index_select(0, r), b)
            return
        host = self._host_batches(epoch)
        for parts, labels, index in (_ahead(host) if self.device.type == "cuda" else host):
            yield self._on_device(parts, labels, index)

    @property
    def preload_bytes(self) -> int:
        """The device memory the split takes when preloaded (its selected layers)."""
        return sum(self.split.n * self.n_layers * int(np.prod(a.shape[2:])) * a.dtype.itemsize
                   for a in self.arrays)

    def _read_all(self) -> None:
        """The split's arrays (selected layers) and labels onto the device, a buffer's worth
        of stripes at a time."""
        out = [torch.empty((self.split.n, self.n_layers, *a.shape[2:]), dtype=_TORCH_DTYPE[np.dtype(a.dtype)],
                           device=self.device) for a in self.arrays]
        for g in range(0, len(self.stripes), self.buffer_stripes):
            for key, parts in self._read(self.stripes[g:g + self.buffer_stripes]).items():
                r = self._stripe_range(key)
                for dest, part in zip(out, parts):
                    dest[r[0]:r[-1] + 1].copy_(torch.from_numpy(np.ascontiguousarray(part[:, self.layers])))
        self._preloaded = [*out, torch.from_numpy(self.split.labels).to(self.device)]

    def _host_batches(self, epoch: int) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, np.ndarray]]:
        if self.fits:
            if self._resident is None:  # memmap: views into one mapping per shard file
                self._resident = self._read(self.stripes)
            for _, batches, _ in self.plan(epoch):
                for b in batches:
                    yield self._host(self._resident, b)
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
                    yield self._host(blocks, b, carry)
                left = np.sort(left)  # the few samples the next fill's batches still need
                carry = (left, self._gather(blocks, left, carry))


def preload(loaders: list[ShardLoader]) -> None:
    """Read the splits of `loaders` (train and val, say) onto their device, once, and draw
    their batches there from now on; refused before anything is read where they would not
    fit together (_require_room)."""
    todo = [loader for loader in loaders if loader._preloaded is None]
    _require_room(todo)
    for loader in todo:
        loader.preload = True
        loader._read_all()


def _require_room(loaders: list[ShardLoader]) -> None:
    """Refuse to preload splits that together would leave less than a fifth of the
    device's free memory to training (its activations and optimiser)."""
    if not loaders:
        return
    device = loaders[0].device
    need, room = sum(loader.preload_bytes for loader in loaders), _free_bytes(device)
    if room is not None and need > 0.8 * room:
        names = " and ".join(loader.split.name for loader in loaders)
        raise UserError(f"preload: the {names} split{'s take' if len(loaders) > 1 else ' takes'} "
                        f"{human_bytes(need)}, more than 80% of the {human_bytes(room)} free on "
                        f"{device} (a fifth is left for training). Train without preloading "
                        "(--no-preload: batches stream from the host), or on fewer taps (--taps).")


def _free_bytes(device: torch.device) -> int | None:
    """The device's free memory, of which a preload may take 80%: on a GPU, the driver's
    free memory and what torch's cache holds unused; on the CPU, Linux's MemAvailable
    (None where unknown)."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:")), None)


def _ahead(items: Iterator[T]) -> Iterator[T]:
    """`items`, each next one made in a background thread while this one is used (the
    copies and reads that make a batch release the GIL)."""
    end = object()
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        pending = pool.submit(next, items, end)
        while (item := pending.result()) is not end:
            pending = pool.submit(next, items, end)
            yield item
    finally:  # also when the consumer stops early: the item in the making is waited for
        pool.shutdown(wait=True)
        items.close()
