"""The store written by extract: readable with plain zarr, exact, and honest about itself."""

from __future__ import annotations

import errno
import shutil
import numpy as np
import pytest
import timm.data
import torch
import zarr

from featcache import ExtractConfig, UserError, extract, load_backbone, open_dataset, open_store
from featcache.catalog import find_stores
from featcache.fastread import MemmapReader
from featcache.info import store_info
from featcache import fastwrite
from featcache.fastwrite import write_samples
from featcache.store import FORMAT_VERSION
from featcache.verify import verify
from sidetrain import ShardLoader

from .conftest import TINY, make_image_folder


def test_plain_zarr_reads_the_documented_layout(fp32_store):
    root = zarr.open_group(str(fp32_store), mode="r")
    meta = root.attrs["featcache"]
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["taps"] == list(range(12)) and meta["dtype"] == "fp32" and meta["complete"]
    assert meta["layout"]["tokens"] == 1 + 2 * 2 and meta["layout"]["width"] == 192
    assert meta["model"]["name"].startswith("vit_tiny_patch16_224")
    assert len(meta["weights"]["sha256"]) == 64
    for split in ("train", "val", "test"):
        g = root[split]
        assert g["tokens"].shape == (24, 12, 5, 192) and g["tokens"].dtype == np.float32
        assert g["labels"].dtype == np.int64 and set(g["labels"][:]) <= set(range(10))
        assert all(k.startswith(f"fashion-mnist/{split}/") for k in g["keys"][:])
        assert g["done"][:].all() and g.attrs["featcache"]["complete"]
    assert root["backbone/norm.weight"].shape == (192,)


class _Full:
    """A file on a disk that fills up half-way through the write."""

    def __init__(self, error: OSError, path, mode):
        self.file, self.error = open(path, mode), error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, data) -> None:
        self.file.write(bytes(data)[:len(data) // 2])
        raise self.error


@pytest.mark.parametrize("dtype,tail", [("float16", (2, 3, 4)), ("float32", (2, 3)), ("int8", (2, 3))])
def test_shards_written_directly_are_the_bytes_zarr_writes(tmp_path, dtype, tail, monkeypatch):
    """The extractor writes local shard files itself (fastwrite.py): they must be zarr's own,
    for full shards, a short last one and the all-zero rows of unreadable inputs (zarr
    leaves them out, and writes no file for a shard of nothing else), and a range that is
    not a whole shard goes through zarr."""
    x = (np.random.default_rng(0).random((10, *tail)) * 100 + 1).astype(dtype)
    x[1] = x[6:9] = 0  # shard 0 lacks a sample, shard 2 has none; shard 3 is 1 sample long
    arrays = {}
    for name in ("zarr", "direct"):
        g = zarr.open_group(str(tmp_path / name), mode="w")
        arrays[name] = g.create_array("t", shape=(10, *tail), dtype=dtype, chunks=(1, *tail),
                                      shards=(3, *tail), compressors=[zarr.codecs.Crc32cCodec()],
                                      fill_value=0)
    folder = tmp_path / "direct" / "t"
    assert MemmapReader.supports(arrays["direct"], folder)
    for lo in (0, 3, 6, 9):
        arrays["zarr"][lo:lo + 3] = x[lo:lo + 3]
        write_samples(arrays["direct"], folder, lo, x[lo:lo + 3])
    files = sorted(p.relative_to(tmp_path / "zarr" / "t") for p in (tmp_path / "zarr" / "t" / "c").rglob("*")
                   if p.is_file())
    assert [f.parts[1] for f in files] == ["0", "1", "3"]
    assert sorted(p.relative_to(folder) for p in (folder / "c").rglob("*") if p.is_file()) == files
    for f in files:
        assert (folder / f).read_bytes() == (tmp_path / "zarr" / "t" / f).read_bytes(), f
    assert not list(folder.rglob("*.tmp"))
    np.testing.assert_array_equal(arrays["direct"][:], x)
    write_samples(arrays["direct"], folder, 4, x[:1])  # part of a shard: zarr's read-modify-write
    np.testing.assert_array_equal(arrays["direct"][4], x[0])
    # a write cut short (a full disk) leaves the shard as it was and no temp file; one left by
    # a killed writer goes when the shard is written again
    (folder / "c" / "0").joinpath(*["0"] * (len(tail) - 1), ".0.99999.tmp").write_bytes(b"old")
    before = sorted((p, p.read_bytes()) for p in folder.rglob("*") if p.is_file())
    full = OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(fastwrite, "open", lambda *a, **k: _Full(full, *a, **k), raising=False)
        with pytest.raises(OSError) as cut:
            write_samples(arrays["direct"], folder, 0, x[3:6])
    assert cut.value is full and not list(folder.rglob("*.99999.tmp"))
    assert [(p, b) for p, b in before if not p.name.endswith(".tmp")] == \
        sorted((p, p.read_bytes()) for p in folder.rglob("*") if p.is_file())


def test_the_memmap_reader_reads_shards_with_gaps_as_zarr_does(tmp_path):
    """Shards zarr wrote sample by sample, some samples never written: not one strided view
    (the fast path), yet the same arrays as zarr's, for every range inside a shard."""
    x = (np.random.default_rng(1).random((7, 2, 3)) * 100 + 1).astype("float16")
    a = zarr.open_group(str(tmp_path), mode="w").create_array(
        "t", shape=(7, 2, 3), dtype="float16", chunks=(1, 2, 3), shards=(3, 2, 3),
        compressors=[zarr.codecs.Crc32cCodec()], fill_value=0)
    for i in (5, 2, 0, 4, 3):  # shard 0 lacks sample 1, shard 2 sample 6
        a[i] = x[i]
    reader = MemmapReader(a, tmp_path / "t")
    assert MemmapReader.supports(a, tmp_path / "t")
    for lo in range(7):
        for hi in range(lo + 1, (lo // 3 + 1) * 3 + 1):
            np.testing.assert_array_equal(reader.read(lo, min(hi, 7)), a[lo:min(hi, 7)])
    assert (reader.read(0, 3)[1] == 0).all() and (reader.read(6, 7) == 0).all()


def test_tokens_equal_timm_blocks_computed_independently(fp32_store):
    store = open_store(fp32_store)
    split = store.split("val")
    bb = load_backbone("vit_tiny", random_init=True, img_size=32)
    assert bb.weights["sha256"] == store.meta["weights"]["sha256"]
    tf = timm.data.create_transform(**bb.data_config, is_training=False)
    ds = open_dataset("demo", limit=24)
    images = torch.stack([tf(ds.splits["val"].open(i).convert("RGB")) for i in range(6)])
    m = bb.model
    with torch.no_grad():
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))
        for i, block in enumerate(m.blocks):
            x = block(x)
            np.testing.assert_allclose(split.tokens[:6, i], x.numpy(), atol=1e-5, rtol=0)


def test_fp16_store_is_the_rounded_fp32_store(fp32_store, tmp_path):
    out = tmp_path / "fp16"
    extract(ExtractConfig(dataset="demo", out=out, dtype="fp16", limit=24, shard_size=5, **TINY))
    a = open_store(fp32_store).split("train").tokens[:]
    b = open_store(out).split("train").tokens[:]
    assert b.dtype == np.float16
    np.testing.assert_array_equal(a.astype(np.float16), b)


def test_rerun_is_a_noop_and_other_settings_are_refused(fp32_store):
    r = extract(ExtractConfig(dataset="demo", out=fp32_store, dtype="fp32", limit=24, shard_size=5, **TINY))
    assert r.status == "already complete" and not r.written
    unbatched = {k: v for k, v in TINY.items() if k != "batch_size"}  # a resume takes the store's
    r = extract(ExtractConfig(dataset="demo", out=fp32_store, dtype="fp32", limit=24, **unbatched))
    assert r.status == "already complete"
    with pytest.raises(UserError, match=r"batch_size: store has 4, this run 8 \(leave --batch-size out"):
        extract(ExtractConfig(dataset="demo", out=fp32_store, dtype="fp32", limit=24, **{**TINY, "batch_size": 8}))
    with pytest.raises(UserError, match=r"use another --out \(e.g. --out \S*demo32-vit_small_patch16_224\)"):
        extract(ExtractConfig(dataset="demo", out=fp32_store, dtype="fp32", limit=24, dry_run=True,
                              **{**TINY, "model": "vit_small"}))
    with pytest.raises(UserError, match=r"--out \S*demo32-48px-int8\) or delete it\. Differences: .*"
                                        r"transform\.input_size: store has \[3, 32, 32\], this run \[3, 48, 48\]"):
        extract(ExtractConfig(dataset="demo", out=fp32_store, dtype="int8", limit=24, dry_run=True,
                              **{**TINY, "img_size": 48}))  # (not the whole transform: what differs in it)
    for dry_run in (True, False):  # a dry run is refused as the run would be
        with pytest.raises(UserError, match="dtype"):
            extract(ExtractConfig(dataset="demo", out=fp32_store, dtype="fp16", limit=24, dry_run=dry_run, **TINY))
    with pytest.raises(UserError, match="weights"):
        extract(ExtractConfig(dataset="demo", out=fp32_store, dtype="fp32", limit=24,
                              **{**TINY, "seed": 1}))
    with pytest.raises(UserError, match="split train: different inputs"):  # other images
        extract(ExtractConfig(dataset="demo", out=fp32_store, dtype="fp32", limit=12, **TINY))
    r = extract(ExtractConfig(dataset="demo", out=fp32_store, dtype="fp32", limit=24, split=["train"], **TINY))
    assert r.status == "already complete" and not r.written  # (a split it holds: nothing to add)


def test_a_split_that_came_later_is_added_and_the_others_kept(tmp_path, capsys):
    """The test set arrives after train and val were extracted: the same command adds it,
    and the store is then the one a single extraction of all three makes."""
    data = tmp_path / "data"
    for split, seed in (("train", 0), ("val", 1)):
        make_image_folder(data / split, per_class=4, seed=seed)
    out = tmp_path / "cache" / "s"
    settings = dict(dataset=str(data), dtype="fp32", shard_size=5, **TINY)
    extract(ExtractConfig(out=out, **settings))
    written = {f: f.stat().st_mtime_ns for f in (out / "train").rglob("*") if f.is_file()}
    make_image_folder(data / "test", per_class=4, seed=2)
    capsys.readouterr()
    r = extract(ExtractConfig(out=out, **settings))
    assert r.status == "resumed" and r.written == {"test": 12} and r.complete
    assert "holds train, val; this run adds test (12 samples), and leaves" in " ".join(capsys.readouterr().err.split())
    assert {f: f.stat().st_mtime_ns for f in written} == written  # train untouched
    added = open_store(out)
    assert added.splits == ["train", "val", "test"] and added.complete and added.meta["complete"]
    assert set(added.meta["input_digests"]) == {"train", "val", "test"} and verify(added).ok
    splits = store_info(added)["splits"]
    assert splits["train"]["added"] is None and splits["test"]["added"].startswith("20")  # (when)
    assert extract(ExtractConfig(out=out, **settings)).status == "already complete"
    # the content key is a single extraction's: a colleague's run of all three reuses it
    assert extract(ExtractConfig(out=tmp_path / "cache" / "again", **settings)).path == out
    fresh = open_store(extract(ExtractConfig(out=tmp_path / "fresh", reuse=False, **settings)).path)
    assert fresh.meta["content_key"] == added.meta["content_key"]
    for split in added.splits:
        np.testing.assert_array_equal(added.read_tokens(split), fresh.read_tokens(split))
    shutil.copytree(data, tmp_path / "copy")  # a split from elsewhere: refused
    extract(ExtractConfig(out=tmp_path / "two", split=["train", "val"], **settings))
    linked = extract(ExtractConfig(out=tmp_path / "link", split=["train", "val"], **settings))
    assert linked.status == "reused" and (tmp_path / "link").is_symlink()
    with pytest.raises(UserError, match=r"link is a link to two, a store reused from elsewhere: adding test"):
        extract(ExtractConfig(out=tmp_path / "link", **settings))  # (not written through the link)
    moved = {**settings, "dataset": str(tmp_path / "copy")}  # known by the splits it shares with the store
    with pytest.raises(UserError, match=r"would add test from imagefolder:\S*copy to a store made from \S*data, "
                                        r"and names none of the splits the store holds"):
        extract(ExtractConfig(out=tmp_path / "two", split=["test"], **moved))
    assert extract(ExtractConfig(out=tmp_path / "two", **moved)).written == {"test": 12}
    assert open_store(tmp_path / "two").meta["dataset"]["source"].endswith("copy")
    (data / "val" / "class0" / "img00.png").unlink()  # a split it holds, changed: still refused
    with pytest.raises(UserError, match="split val: different inputs"):
        extract(ExtractConfig(out=out, **settings))


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_splits_added_in_any_order_key_as_one_extraction_would(tmp_path, dtype, capsys):
    settings = dict(dataset="demo", dtype=dtype, limit=8, per_class=2, shard_size=4, **TINY)
    whole = open_dataset("demo", limit=8, per_class=2)  # each split's subset, whatever the others
    for names in (["test"], ["val", "test"]):
        alone = open_dataset("demo", limit=8, per_class=2, split=names)
        assert all(list(alone.splits[n].keys) == list(whole.splits[n].keys) for n in names)
    fresh = open_store(extract(ExtractConfig(out=tmp_path / "fresh", **settings)).path)
    out = tmp_path / "late"
    extract(ExtractConfig(out=out, split=["test"], **settings))  # the test set first, then the rest
    assert extract(ExtractConfig(out=out, **settings)).written == {"train": 8, "val": 8}
    late = open_store(out)
    assert late.splits == ["test", "train", "val"] and late.complete and verify(late).ok
    # int8 took its scale from test, where one extraction takes it from train: another content
    assert (late.meta["content_key"] == fresh.meta["content_key"]) == (dtype == "fp32")
    if dtype == "fp32":
        for name in fresh.splits:
            np.testing.assert_array_equal(late.read_tokens(name), fresh.read_tokens(name))
    # a run that names fewer splits than a store holds leaves the others as they are, and says so
    zarr.open_group(str(out / "test"), mode="r+")["done"][0] = False
    capsys.readouterr()
    r = extract(ExtractConfig(out=out, split=["train"], **settings))
    assert r.status == "part done" and not r.complete and not r.written
    assert "split(s) test are not finished; the extract command without --split (or with --split test)" \
        in " ".join(capsys.readouterr().err.split())
    assert extract(ExtractConfig(out=out, **settings)).written == {"test": 4} and open_store(out).complete


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_missing_shard_is_recomputed_bit_for_bit(tmp_path, dtype):
    """int8: the tokens and their per-token scales alike."""
    out = tmp_path / "s"
    extract(ExtractConfig(dataset="demo", out=out, limit=24, dtype=dtype, **TINY))
    g = zarr.open_group(str(out), mode="r+")
    arrays = [a for a in ("tokens", "scales") if a in g["val"]]
    before = {a: g[f"val/{a}"][:] for a in arrays}
    g["val/done"][0] = False  # as if killed before the shard was durable
    for a in arrays:
        g[f"val/{a}"][:] = 0
    unbatched = {k: v for k, v in TINY.items() if k != "batch_size"}  # the store's batch size, 4
    r = extract(ExtractConfig(dataset="demo", out=out, limit=24, dtype=dtype, **unbatched))
    assert r.status == "resumed" and r.written == {"val": 24} and len(arrays) == 1 + (dtype == "int8")
    for a in arrays:
        np.testing.assert_array_equal(g[f"val/{a}"][:], before[a])


def test_dry_run_writes_nothing_and_size_is_checked(tmp_path, monkeypatch):
    out = tmp_path / "dry"
    r = extract(ExtractConfig(dataset="demo", out=out, limit=24, dry_run=True, **TINY))
    assert r.status == "dry run" and not out.exists()
    assert r.plan.total == 3 * 24 * 12 * 5 * 192 * 2
    monkeypatch.setattr("featcache.plan.free_bytes", lambda p: 1000)
    with pytest.raises(UserError, match="--force"):
        extract(ExtractConfig(dataset="demo", out=out, limit=24, **TINY))
    assert not out.exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("mine")
    for dry_run in (True, False):  # a dry run is refused as the run would be
        with pytest.raises(UserError, match="is not empty and is not a featcache store"):
            extract(ExtractConfig(dataset="demo", out=tmp_path / "notes", limit=24, dry_run=dry_run, **TINY))


def test_unreadable_images_are_skipped_and_recorded(image_folder, tmp_path, capsys):
    (image_folder / "class0" / "broken.png").write_bytes(b"not an image")
    (image_folder / "class1" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "bad"  # shards of 3: skipped rows in several shards
    r = extract(ExtractConfig(dataset=str(image_folder), out=out, shard_size=3, **TINY))
    skipped = {k for split in r.skipped.values() for k in split}
    assert skipped == {"class0/broken.png", "class1/empty.jpg"}
    told = " ".join(capsys.readouterr().err.split())  # (rich wraps lines)
    assert all(f"{key}: UnidentifiedImageError" in told for key in skipped)  # said, not only returned
    store = open_store(out)
    recorded = {k for s in store.splits for k in store.split(s).attrs["skipped"]}
    assert recorded == skipped
    for s in store.splits:
        arr = store.split(s)
        bad = np.isin(arr.keys, list(skipped))
        assert (arr.labels[bad] == -1).all() and (arr.labels[~bad] >= 0).all()
        tokens = arr.tokens[:]  # a skipped row holds zeros, every other row tokens
        assert (tokens[bad] == 0).all() and (tokens[~bad] != 0).any(axis=(1, 2, 3)).all()
        # training reads every readable row once an epoch, and never a skipped one
        loader = ShardLoader(store, s, batch_size=2, shuffle=True, buffer_bytes=tokens[0].nbytes * 4)
        seen = np.concatenate([b.index for b in loader.epoch(0)])
        assert sorted(seen.tolist()) == np.flatnonzero(~bad).tolist()
    # verify and ls count them apart from the samples stored
    report = verify(store)
    assert report.ok and (report.samples, report.skipped) == (sum(r.written.values()), 2)
    (listed,) = find_stores(tmp_path)
    assert sum(listed["unreadable_inputs"].values()) == 2
    assert all(listed["splits"][s] == store.split(s).n for s in store.splits)


def test_a_store_from_before_precision_was_recorded_resumes_and_is_reused(tmp_path):
    """Such stores ran fp32: they are neither refused on a rerun nor missed by reuse."""
    cfg = dict(dataset="demo", limit=8, **TINY)
    old = tmp_path / "old"
    extract(ExtractConfig(out=old, **cfg))
    group = zarr.open_group(str(old), mode="r+")
    group.attrs["featcache"] = {k: v for k, v in group.attrs["featcache"].items() if k != "precision"}
    assert "precision" not in open_store(old).meta and open_store(old).precision == "fp32"
    assert extract(ExtractConfig(out=old, **cfg)).status == "already complete"
    assert extract(ExtractConfig(out=tmp_path / "new", **cfg)).status == "reused"
    assert extract(ExtractConfig(out=tmp_path / "half", precision="fp16", **cfg)).status == "written"


@pytest.mark.parametrize("bad, why", [
    ({"val_fraction": 1.5}, "--val-fraction must be a share between 0 and 1"),
    ({"img_size": 0}, "--img-size must be a whole number of at least 1"),  # (it fell back to 224)
    ({"workers": -1}, "--workers must be 0 or more"),
    ({"crop_pct": 0.0}, "--crop-pct must be a share above 0"),  # (it fell back to 0.9)
    ({"interpolation": "bicubik"}, "--interpolation must be one of nearest, bilinear, bicubic"),
    ({"mean": (0.5, 0.5)}, "--mean must be three numbers"),
    ({"shard": "0/2"}, r"--shard must be K/N \(in Python a tuple \(K, N\)\)"),  # (not a TypeError)
    ({"shard": (2, 2)}, "--shard K/N counts parts from 0: 0/2 to 1/2, not 2/2"),
    ({"device": "gpu"}, "--device must be auto, cpu, cuda or cuda:N"),
])
def test_settings_that_cannot_work_are_refused_before_anything_is_written(tmp_path, bad, why):
    for dry_run in (True, False):
        with pytest.raises(UserError, match=why):
            extract(ExtractConfig(**{**TINY, "dataset": "demo", "out": tmp_path / "s", "limit": 4,
                                     "dry_run": dry_run, **bad}))
    assert not (tmp_path / "s").exists()


def test_splits_may_be_named_in_one_string_as_on_the_command_line(tmp_path):
    r = extract(ExtractConfig(dataset="demo", out=tmp_path / "s", limit=4, split="train,val", **TINY))
    assert list(r.written) == ["train", "val"]


def test_a_store_begun_on_another_kind_of_device_is_continued_with_a_note(tmp_path, capsys):
    cfg = ExtractConfig(dataset="demo", out=tmp_path / "s", limit=4, shard_size=2, **TINY)
    extract(cfg)
    root = zarr.open_group(str(tmp_path / "s"), mode="r+")
    assert root.attrs["featcache"]["device"] == "cpu"
    root.attrs["featcache"] = {**root.attrs["featcache"], "device": "cuda", "complete": False}  # as if
    root["train"]["done"][0] = False  # begun on a GPU machine, and cut short there
    capsys.readouterr()
    r = extract(cfg)
    assert (r.status, r.left, sum(r.written.values())) == ("resumed", 2, 2)  # (no GPU here: not refused)
    said = " ".join(capsys.readouterr().err.split())
    assert "was begun on cuda; this run continues it on cpu" in said and "is part-written: 2 samples" in said
