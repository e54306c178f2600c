"""Many processes, one store: --shard K/N and --dask equal a single-process extraction."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr

from featcache import ExtractConfig, UserError, extract, open_store
from featcache.catalog import find_stores
from featcache.distribute import extract_on_dask
from featcache.lock import StoreLock
from featcache.store import write_shard
from featcache.verify import verify
from sidetrain import FitConfig, fit

from .conftest import TINY, make_image_folder

ARGS = ["--model", "vit_tiny", "--random-init", "--img-size", "32", "--dataset", "demo",
        "--limit", "12", "--shard-size", "4", "--batch-size", "2", "--workers", "0"]


def arrays(path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    return {f"{s}/{a}": root[s][a][:] for s in ("train", "val", "test") for a in ("tokens", "labels", "keys")}


def run_single(out, **env) -> None:
    subprocess.run([sys.executable, "-m", "featcache_cli.featcache", "extract", *ARGS, "--out", str(out)],
                   check=True, capture_output=True, env={**os.environ, **env})


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "s"
    run_single(out)
    return out


def test_n_processes_fill_one_store_bit_for_bit(single, tmp_path):
    out = tmp_path / "parts"
    procs = [subprocess.Popen([sys.executable, "-m", "featcache_cli.featcache", "extract", *ARGS, "--out", str(out),
                               "--shard", f"{k}/3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k in range(3)]
    for p in procs:
        assert p.wait() == 0, p.stderr.read().decode()
    assert sum("completed" in " ".join(p.stderr.read().decode().split()) for p in procs) == 1
    store = open_store(out)
    assert store.complete and store.meta["complete"] and verify(store).ok
    expected = arrays(single)
    for name, value in arrays(out).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_a_part_alone_leaves_the_store_incomplete(tmp_path, capsys):
    cfg = dict(dataset="demo", out=tmp_path / "p", limit=12, shard_size=4, **TINY)
    r = extract(ExtractConfig(shard=(0, 2), **cfg))
    assert r.status == "written" and not r.complete and not open_store(tmp_path / "p").complete
    assert extract(ExtractConfig(shard=(0, 2), **cfg)).status == "part done"
    train = FitConfig(cache=tmp_path / "p", epochs=1, out=tmp_path / "run")
    with pytest.raises(UserError, match="is incomplete: rerun the `featcache extract` command"):
        fit(train)
    with StoreLock(tmp_path / "p", (1, 2)), pytest.raises(  # the other part under way
            UserError, match="is incomplete: it is being written now by the parts of a --shard run"):
        fit(train)
    with StoreLock(tmp_path / "p", (1, 2)):  # a plain run is refused at once, before it says what is left
        capsys.readouterr()
        with pytest.raises(UserError, match=r"written by another featcache process \(the parts of a --shard run\)"):
            extract(ExtractConfig(**cfg))
        with pytest.raises(UserError, match=r"another featcache process \(pid "):  # the same part twice
            extract(ExtractConfig(shard=(1, 2), **cfg))
        with pytest.raises(UserError, match=r"--shard K/2 run: every part must use the same N"):
            extract(ExtractConfig(shard=(0, 3), **cfg))
        assert "part-written" not in capsys.readouterr().err
    r = extract(ExtractConfig(shard=(1, 2), **cfg))
    assert r.status == "resumed" and r.complete  # the store existed; this part completed it
    assert open_store(tmp_path / "p").complete


def test_parts_naming_other_splits_share_out_the_shards_alike(tmp_path):
    """Part 1/2 ran over every split; part 2/2 names val alone (--split val): it still takes
    the val shards that are its own, as every part numbers every shard of the store alike."""
    cfg = dict(dataset="demo", out=tmp_path / "p", limit=12, shard_size=4, **TINY)
    extract(ExtractConfig(**cfg, shard=(0, 2)))  # shards 0, 2, 4, 6, 8: train 0 and 2, val 1, test 0 and 2
    r = extract(ExtractConfig(**cfg, shard=(1, 2), split=["val"]))
    assert r.written == {"val": 8} and open_store(tmp_path / "p").split("val").done.all()


def test_parts_that_skip_inputs_record_them_all(tmp_path):
    """Unreadable inputs in shards of both parts (train shards 0 and 1, val's one): the
    store records every one, as one process would."""
    folder = make_image_folder(tmp_path / "images")
    for key in ("class0/img00.png", "class0/img04.png", "class1/img04.png"):  # (val holds the last)
        (folder / key).write_bytes(b"broken")
    cfg = dict(dataset=str(folder), shard_size=3, reuse=False, **TINY)
    parts = [extract(ExtractConfig(out=tmp_path / "parts", shard=(k, 2), **cfg)) for k in range(2)]
    assert [sorted(k for s in r.skipped.values() for k in s) for r in parts] == [
        ["class0/img00.png"], ["class0/img04.png", "class1/img04.png"]]  # each part skipped some
    whole = open_store(extract(ExtractConfig(out=tmp_path / "whole", **cfg)).path)
    store = open_store(tmp_path / "parts")
    assert store.complete and verify(store).ok
    for name in ("train", "val"):
        a, b = store.split(name), whole.split(name)
        assert sorted(a.attrs["skipped"]) == sorted(b.attrs["skipped"]) and len(a.attrs["skipped"])
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.tokens[:], b.tokens[:])


def test_parts_recording_skipped_inputs_at_once_lose_none(fp32_store, tmp_path):
    """Parts finishing shards at the same moment each add their skipped inputs to the
    split's attributes (read, merge, write): the meta lock keeps every addition."""
    out = tmp_path / "store"
    shutil.copytree(fp32_store, out)
    store = open_store(out)
    split = store.split("train")
    s = split.shard_size
    shards = range(len(split.done))
    barrier = threading.Barrier(len(shards))

    def finish(k: int) -> None:  # shard k rewritten as is, with one more skipped input
        lo, hi = k * s, min((k + 1) * s, split.n)
        tokens, labels, keys = split.tokens[lo:hi], split.labels[lo:hi], split.keys[lo:hi].tolist()
        barrier.wait()
        write_shard(open_store(out, "r+"), "train", k, tokens, None, labels, keys, {f"gone{k}": "unreadable"})

    with ThreadPoolExecutor(len(shards)) as pool:
        list(pool.map(finish, shards))
    assert sorted(open_store(out).split("train").attrs["skipped"]) == sorted(f"gone{k}" for k in shards)


def test_locks_between_parts(tmp_path):
    cfg = dict(dataset="demo", out=tmp_path / "l", limit=4, **TINY)
    with StoreLock(tmp_path / "l", (0, 2)):
        with pytest.raises(UserError, match="another featcache process"):
            extract(ExtractConfig(shard=(0, 2), **cfg))  # the same part twice
        with pytest.raises(UserError, match="another featcache process"):
            extract(ExtractConfig(**cfg))  # a whole-store writer beside a part
        with pytest.raises(UserError, match=r"the parts of a --shard K/2 run: every part must use the same N"):
            extract(ExtractConfig(shard=(1, 3), **cfg))  # its shards would be another's
        assert extract(ExtractConfig(shard=(1, 2), **cfg)).status == "written"  # another part
    extract(ExtractConfig(shard=(1, 3), **cfg))  # not refused: the N=2 parts are gone


def test_dask_local_cluster_equals_a_single_process(tmp_path, capfd):
    """Bits depend on the CPU thread count (the order of the matmul sums): dask workers run
    one thread each, so the reference runs with one thread too."""
    single = tmp_path / "single"
    run_single(single, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = tmp_path / "dask"
    zarr.open_group(str(out), mode="w")  # a layout killed before its attributes: laid out again
    r = extract_on_dask(ExtractConfig(dataset="demo", out=out, limit=12, shard_size=4, reuse=False,
                                      **{**TINY, "batch_size": 2}), "local:2")
    assert r.written == {"train": 12, "val": 12, "test": 12} and r.complete and r.status == "written"
    assert capfd.readouterr().err.count("store size:") == 1  # said once, not by each worker too
    assert open_store(out).complete
    expected = arrays(single)
    for name, value in arrays(out).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_an_identical_store_is_found_and_reused(tmp_path, capsys):
    cfg = dict(dataset="demo", limit=4, **TINY)
    first = extract(ExtractConfig(out=tmp_path / "cache" / "alice", **cfg))
    capsys.readouterr()
    assert extract(ExtractConfig(out=tmp_path / "cache" / "bob", dry_run=True, **cfg)).status == "dry run"
    assert "a real run would reuse it" in " ".join(capsys.readouterr().err.split())
    again = extract(ExtractConfig(out=tmp_path / "cache" / "bob", **{**cfg, "batch_size": 3}))
    assert again.status == "reused" and again.path == first.path
    # --out is a link to it, so that `extract --out X; fit --cache X` holds whichever store serves
    assert os.readlink(tmp_path / "cache" / "bob") == "alice" and open_store(tmp_path / "cache" / "bob").complete
    dask = extract_on_dask(ExtractConfig(out=tmp_path / "cache" / "erin", **cfg), "local:1")
    assert (dask.status, dask.path, dask.complete) == ("reused", first.path, True)  # no part run
    assert os.readlink(tmp_path / "cache" / "erin") == "alice"
    assert {Path(s["path"]).name: s["link"] for s in find_stores(tmp_path / "cache")} == \
        {"alice": None, "bob": "alice", "erin": "alice"}
    assert [s["bytes_on_disk"] > 0 for s in find_stores(tmp_path / "cache")] == [True, False, False]  # (one copy)
    capsys.readouterr()
    own = extract(ExtractConfig(out=tmp_path / "cache" / "erin", reuse=False, **cfg))  # a store of its own
    assert (own.status, own.path) == ("written", tmp_path / "cache" / "erin") and not own.path.is_symlink()
    assert "erin was a link to alice (--no-reuse): removed" in " ".join(capsys.readouterr().err.split())
    other = extract(ExtractConfig(out=tmp_path / "cache" / "carol", **{**cfg, "dtype": "fp32"}))
    assert other.status == "written"  # different content: extracted
    forced = extract(ExtractConfig(out=tmp_path / "cache" / "dave", reuse=False, **cfg))
    assert forced.status == "written"
    shutil.rmtree(first.path)  # bob's twin deleted: its link points nowhere
    capsys.readouterr()
    find_stores(tmp_path / "cache")
    assert "bob: a link to alice, which no longer exists: left out" in " ".join(capsys.readouterr().err.split())
    again = extract(ExtractConfig(out=tmp_path / "cache" / "bob", **cfg))
    assert again.status == "reused" and again.path != first.path  # (carol, dave or erin) not a write error
    assert "bob was a link to alice, which no longer exists: removed" in " ".join(capsys.readouterr().err.split())


def test_a_copy_with_the_same_names_elsewhere_is_not_taken_for_the_original(tmp_path):
    """Keys and labels do not identify images: an edited copy of a dataset keeps both."""
    original = make_image_folder(tmp_path / "flowers")
    edited = make_image_folder(tmp_path / "flowers-edited", seed=1)  # same names, other pixels
    first = extract(ExtractConfig(dataset=str(original), out=tmp_path / "cache" / "a", **TINY))
    again = extract(ExtractConfig(dataset=str(original), out=tmp_path / "cache" / "b", **TINY))
    assert again.status == "reused" and again.path == first.path
    copy = extract(ExtractConfig(dataset=str(edited), out=tmp_path / "cache" / "c", **TINY))
    assert copy.status == "written"
    a, c = open_store(first.path).split("train"), open_store(copy.path).split("train")
    assert list(a.keys) == list(c.keys) and not np.array_equal(a.tokens[:], c.tokens[:])


def test_images_regenerated_in_place_are_pointed_out_and_not_reused(tmp_path, capsys):
    """Same paths and labels, new pixels: the store at --out is kept but said to hold what
    the files held; a twin elsewhere is passed over for a current one. New dates alone (a
    copy with `cp -r`) are not a change."""
    folder = make_image_folder(tmp_path / "images")
    first = extract(ExtractConfig(dataset=str(folder), out=tmp_path / "cache" / "a", **TINY))
    for path in folder.rglob("*.png"):  # dated anew, as a copy would be, bytes unchanged
        os.utime(path, (path.stat().st_mtime + 60, path.stat().st_mtime + 60))
    assert extract(ExtractConfig(dataset=str(folder), out=tmp_path / "cache" / "z", **TINY)).status == "reused"
    assert "hold other bytes" not in capsys.readouterr().err
    make_image_folder(tmp_path / "images", seed=1)  # regenerated in place
    again = extract(ExtractConfig(dataset=str(folder), out=first.path, **TINY))
    said = " ".join(capsys.readouterr().err.split())
    assert again.status == "already complete"
    assert f"inputs {first.path} recorded hold other bytes now" in said and "Delete it" in said
    fresh = extract(ExtractConfig(dataset=str(folder), out=tmp_path / "cache" / "b", **TINY))
    assert fresh.status == "written" and "not reused" in " ".join(capsys.readouterr().err.split())
    a, b = open_store(first.path).split("train"), open_store(fresh.path).split("train")
    assert not np.array_equal(a.tokens[:], b.tokens[:])  # the new pixels
    third = extract(ExtractConfig(dataset=str(folder), out=tmp_path / "cache" / "c", **TINY))
    assert (third.status, third.path) == ("reused", fresh.path)  # past the stale one, the current one


def test_a_dask_worker_killed_mid_extraction_has_its_part_redone(tmp_path):
    """SIGKILL one of two worker processes once the store has some durable shards: the
    scheduler reruns its part elsewhere, which resumes, and the store ends as one process
    would have written it."""
    import signal
    import threading

    from dask.distributed import Client, LocalCluster

    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "featcache_cli.featcache", "extract", *ARGS, "--limit", "24",
                    "--shard-size", "2", "--out", str(single)], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    out = tmp_path / "dask"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        killed = []

        def kill_when_started() -> None:
            while not killed:
                try:
                    done = np.concatenate([zarr.open_group(str(out), mode="r")[s]["done"][:]
                                           for s in ("train", "val", "test")])
                except Exception:  # not laid out yet
                    done = np.zeros(1, bool)
                if 0 < done.sum() < len(done) - 4:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(int(done.sum()))
                threading.Event().wait(0.02)

        watcher = threading.Thread(target=kill_when_started, daemon=True)
        watcher.start()
        r = extract_on_dask(ExtractConfig(dataset="demo", out=out, limit=24, shard_size=2, reuse=False,
                                          **{**TINY, "batch_size": 2}), cluster.scheduler_address)
        watcher.join(timeout=1)
    assert killed, "the watcher never saw the extraction under way"
    assert open_store(out).complete and verify(open_store(out)).ok
    assert r.written == {"train": 24, "val": 24, "test": 24}  # the dead worker's shards counted too
    expected = arrays(single)
    for name, value in arrays(out).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    assert r.status in ("written", "resumed")
