"""Reading many samples of a split at once: through zarr, or straight from the shard files.

zarr-python pays a large per-call cost (about 100 MB/s for one ~300 KB chunk per call
here), while the page cache serves bytes at several GB/s. For a local store written by
featcache (format 1: sharding with `bytes` + `crc32c` inner codecs, index at the end), the
shard file layout is simple enough to memory-map:

    [sample 0 bytes][crc32c 4 B][sample 1 bytes][crc32c 4 B] ... [index: S x (offset, nbytes)
    as little-endian uint64][crc32c 4 B]

MemmapReader returns views into those files (no decode) and asks the kernel to read the
samples ahead as soon as it is asked for them (the loader gathers them into batches later);
it compares each sample's checksum the first time it reads it (crc32c at ~15 GB/s here: a
first epoch's cost), as zarr does on every read, so a damaged store stops training rather
than train it on altered bytes. ZarrReader is the path for anything else (remote or
foreign codecs). Both return the same arrays (tested).
"""

from __future__ import annotations

import mmap
from collections import OrderedDict
from pathlib import Path

import crc32c
import numpy as np
import zarr

from .errors import DAMAGED_REMEDY, UserError

EMPTY = np.uint64(2**64 - 1)  # the index's offset/nbytes of a chunk that was never written
OPEN_SHARDS = 16


def corrupt(where: object, detail: str) -> UserError:
    """What to say of a chunk whose bytes fail their checksum."""
    return UserError(f"{where}: {detail} fails its checksum: the store is damaged (a disk error, "
                     "or a copy altered or cut short). `featcache verify` lists every damaged "
                     f"shard. {DAMAGED_REMEDY}")


def checked_read(array: zarr.Array, read):
    """`read(array)` (a zarr read), with a failed checksum said as `corrupt` says it."""
    try:
        return read(array)
    except ValueError as e:
        if "checksum" not in str(e):
            raise
        raise corrupt(str(array.store_path).removeprefix("file://"), "a chunk") from None


class ZarrReader:
    def __init__(self, array: zarr.Array):
        self.array = array

    def read(self, lo: int, hi: int) -> np.ndarray:
        return checked_read(self.array, lambda a: a[lo:hi])


class MemmapReader:
    def __init__(self, array: zarr.Array, folder: Path):
        self.array, self.folder = array, Path(folder)
        self.shard = array.shards[0]
        self.tail = array.shape[1:]
        self.dtype = np.dtype(array.dtype)
        self.sample_bytes = int(np.prod(self.tail)) * self.dtype.itemsize
        self.checked = np.zeros(array.shape[0], bool)  # samples whose checksum has been compared
        self._open: OrderedDict[int, tuple[mmap.mmap, np.ndarray, np.ndarray]] = OrderedDict()

    @staticmethod
    def supports(array: zarr.Array, folder: Path) -> bool:
        """A local sharded array whose inner chunks are single samples, raw + crc32c."""
        codecs = array.metadata.to_dict().get("codecs", ())
        if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed" or not Path(folder).is_dir():
            return False
        conf = codecs[0]["configuration"]
        inner = [c["name"] for c in conf["codecs"]]
        endian = conf["codecs"][0].get("configuration", {}).get("endian", "little")
        return (inner == ["bytes", "crc32c"] and endian == "little" and conf["index_location"] == "end"
                and tuple(conf["chunk_shape"]) == (1, *array.shape[1:])
                and [c["name"] for c in conf["index_codecs"]] == ["bytes", "crc32c"])

    def _shard(self, k: int) -> tuple[mmap.mmap, np.ndarray, np.ndarray] | None:
        """The shard file mapped, keeping at most OPEN_SHARDS in this cache (each mapping holds
        a descriptor until the last view into it is gone)."""
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        path = self.folder.joinpath("c", str(k), *["0"] * len(self.tail))
        if not path.is_file():
            return None
        with open(path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        mm = np.frombuffer(mapping, dtype=np.uint8)
        end = len(mm) - 16 * self.shard - 4
        if end < 0 or crc32c.crc32c(mm[end:-4]) != int.from_bytes(mm[-4:].tobytes(), "little"):
            raise corrupt(path, "the index of this shard file")
        index = np.frombuffer(mm[end:-4], dtype="<u8")
        self._open[k] = (mapping, mm, index.reshape(self.shard, 2))
        if len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)  # the mapping closes when its arrays are gone
        return self._open[k]

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Samples lo..hi-1, which must lie in one shard."""
        k, first = divmod(lo, self.shard)
        if (hi - 1) // self.shard != k:
            raise ValueError("MemmapReader.read spans two shards")
        opened = self._shard(k)
        n = hi - lo
        if opened is None:  # a shard never written reads as the fill value, as in zarr
            return np.zeros((n, *self.tail), self.dtype)
        mapping, mm, index = opened
        offsets, sizes = index[first:first + n, 0], index[first:first + n, 1]
        stride = self.sample_bytes + 4
        written = offsets[offsets != EMPTY]
        if len(written):  # read-ahead of these samples only: a loader reads stripes of many shards
            lo_byte = int(written.min()) // mmap.PAGESIZE * mmap.PAGESIZE
            hi_byte = int((written + sizes[offsets != EMPTY]).max())
            mapping.madvise(mmap.MADV_WILLNEED, lo_byte, hi_byte - lo_byte)
        self._check(lo, mm, offsets)  # (after the read-ahead is asked for: it reads them)
        if (offsets != EMPTY).all() and (sizes == stride).all() and \
                (n == 1 or (np.diff(offsets) == stride).all()):  # contiguous: one strided view
            start = int(offsets[0])
            rows = mm[start:start + n * stride].reshape(n, stride)[:, :self.sample_bytes]
            return rows.view(self.dtype).reshape(n, *self.tail)
        out = np.zeros((n, *self.tail), self.dtype)
        for i, (off, size) in enumerate(zip(offsets, sizes)):
            if off != EMPTY:
                out[i] = mm[int(off):int(off) + self.sample_bytes].view(self.dtype).reshape(self.tail)
        return out

    def _check(self, lo: int, mm: np.ndarray, offsets: np.ndarray) -> None:
        """Compare the checksums of samples lo.. (at `offsets` in the shard file `mm`) that
        were not compared before."""
        size = self.sample_bytes
        for i in np.flatnonzero(~self.checked[lo:lo + len(offsets)] & (offsets != EMPTY)):
            off = int(offsets[i])
            stored = int.from_bytes(mm[off + size:off + size + 4].tobytes(), "little")
            if crc32c.crc32c(mm[off:off + size]) != stored:
                raise corrupt(self.folder, f"sample {lo + i}")
        self.checked[lo:lo + len(offsets)] = True


def make_reader(array: zarr.Array, folder: Path | None, mode: str = "auto"):
    """mode: auto (memmap where supported), memmap (must be supported) or zarr."""
    if mode == "zarr" or folder is None:
        return ZarrReader(array)
    if MemmapReader.supports(array, folder):
        return MemmapReader(array, folder)
    if mode == "memmap":
        raise ValueError(f"{folder} cannot be memory-mapped (remote, or codecs other than bytes+crc32c)")
    return ZarrReader(array)
