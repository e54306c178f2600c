"""Extraction that never loses work: kill -9 and resume, one writer, bad images, verify."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from featcache import ExtractConfig, UserError, extract, extraction, open_store
from featcache.images import collate
from featcache import catalog
from featcache.catalog import find_stores
from featcache.lock import StoreLock, writer
from featcache.verify import repair, verify
from sidetrain import FitConfig, ShardLoader, fit

from .conftest import TINY, make_image_folder

CMD = [sys.executable, "-m", "featcache_cli.featcache", "extract", "--model", "vit_tiny", "--random-init",
       "--img-size", "32", "--dataset", "demo", "--limit", "60", "--shard-size", "6",
       "--batch-size", "2", "--workers", "0", "--json", "--no-reuse"]


def arrays(path: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    return {f"{s}/{a}": root[s][a][:] for s in ("train", "val", "test") for a in ("tokens", "labels", "keys")}


def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path):
    subprocess.run(CMD + ["--out", str(tmp_path / "clean")], check=True, capture_output=True)
    victim = tmp_path / "killed"
    proc = subprocess.Popen(CMD + ["--out", str(victim)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once some, but not all, shards are durable
        try:
            if zarr.open_group(str(victim), mode="r")["train/done"][:].sum() >= 2:
                break
        except Exception:
            pass
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    r = subprocess.run(CMD + ["--out", str(victim)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "resumed"
    clean, resumed = arrays(tmp_path / "clean"), arrays(victim)
    for name in clean:
        np.testing.assert_array_equal(resumed[name], clean[name], err_msg=name)
    assert verify(open_store(victim)).ok


def test_a_stopped_extraction_says_what_it_keeps(tmp_path, monkeypatch, capsys):
    batches = []

    def ctrl_c_at_the_fourth(batch):  # (each split's first shard holds three batches of 4)
        if len(batches) == 3 + 1:
            raise KeyboardInterrupt
        batches.append(batch)
        return collate(batch)

    monkeypatch.setattr(extraction, "collate", ctrl_c_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        extract(ExtractConfig(dataset="demo", out=tmp_path / "s", limit=24, shard_size=12, **TINY))
    assert "s: 12 of 72 samples are in finished shards and kept (shards of 12)." in " ".join(capsys.readouterr().err.split())


def test_a_second_writer_is_refused_while_the_first_lives(tmp_path, capsys):
    out = tmp_path / "locked"
    with StoreLock(out):
        with pytest.raises(UserError, match="another featcache process"):
            extract(ExtractConfig(dataset="demo", out=out, limit=4, **TINY))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from featcache.lock import "
                               "StoreLock; lock = StoreLock(sys.argv[1]); lock.__enter__(); print(1, flush=True); "
                               "time.sleep(60)", str(out)], stdout=subprocess.PIPE)
    holder.stdout.readline()
    with pytest.raises(UserError, match="pid"):
        extract(ExtractConfig(dataset="demo", out=out, limit=4, **TINY))
    holder.kill()
    holder.wait()  # a dead writer holds nothing
    assert writer(out) is None
    # nor do the children it forked (loader workers), which outlive a kill -9 for seconds
    # (the child tells the parent it runs: its at-fork hooks have run by then)
    forks = ("import os, sys, time\nfrom featcache.lock import StoreLock\n"
             "lock = StoreLock(sys.argv[1]); lock.__enter__(); r, w = os.pipe(); child = os.fork()\n"
             "if not child: os.write(w, b'1'); time.sleep(60)\n"
             "os.read(r, 1); print(child, flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", forks, str(out)], stdout=subprocess.PIPE)
    child = int(holder.stdout.readline())
    assert writer(out) is not None
    holder.kill()
    holder.wait()
    try:
        assert writer(out) is None
    finally:
        os.kill(child, signal.SIGKILL)
    assert extract(ExtractConfig(dataset="demo", out=out, limit=4, **TINY)).status == "written"
    with StoreLock(out):  # who writes is told by a dry run (and `info`), which takes no lock
        assert writer(out) == f"pid {os.getpid()} on {socket.gethostname()}"
        extract(ExtractConfig(dataset="demo", out=out, limit=4, dry_run=True, **TINY))
        assert f"{out} is being written now by pid {os.getpid()}" in " ".join(capsys.readouterr().err.split())
    with StoreLock(out, (1, 2)):
        assert writer(out) == "the parts of a --shard run"
    assert writer(out) is None and writer(tmp_path / "nothing") is None


def test_every_kind_of_bad_image(tmp_path):
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        rgb = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / c / "ok.png")
    rgb = np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    a = root / "a"
    Image.fromarray(rgb).convert("L").save(a / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(a / "rgba.png")
    Image.fromarray(rgb).convert("P").save(a / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(a / "cmyk.jpg")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(a / "sixteen.png")
    Image.fromarray(rgb).save(a / "truncated.jpg")
    data = (a / "truncated.jpg").read_bytes()
    (a / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (a / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (a / "empty.jpg").write_bytes(b"")
    r = extract(ExtractConfig(dataset=str(root), out=tmp_path / "s", val_fraction=0.01, **TINY))
    skipped = {k for split in r.skipped.values() for k in split}
    assert skipped == {"a/truncated.jpg", "a/corrupt.png", "a/empty.jpg"}
    store = open_store(tmp_path / "s")
    keys = np.concatenate([store.split(s).keys[store.split(s).labels >= 0] for s in store.splits])
    assert {"a/gray.png", "a/rgba.png", "a/palette.png", "a/cmyk.jpg", "a/sixteen.png"} <= set(keys)
    assert verify(store).ok
    shard = tmp_path / "s" / "train" / "tokens" / "c" / "0" / "0" / "0" / "0"  # (with the unreadable)
    raw = bytearray(shard.read_bytes())
    raw[-100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert repair(store.path, verify(store)) == 1
    again = extract(ExtractConfig(dataset=str(root), out=tmp_path / "s", val_fraction=0.01, **TINY))
    assert again.status == "resumed" and {k for split in again.skipped.values() for k in split} == skipped
    assert verify(open_store(tmp_path / "s")).ok  # (its unreadable inputs recorded once again)


def test_a_split_of_inputs_none_readable_is_refused_with_its_cause(tmp_path):
    """A manifest moved away from its images: every path is wrong, which is not a success."""
    (tmp_path / "labels.csv").write_text("path,label,split\n" + "".join(
        f"img{i}.png,{'ab'[i % 2]},{'train' if i < 4 else 'val'}\n" for i in range(6)))
    for dry_run in (True, False):  # found before the run (or by a dry run), not at its end
        with pytest.raises(UserError, match=r"none of the 4 inputs of split 'train'.*img0.png.*--data-root"):
            extract(ExtractConfig(dataset=str(tmp_path / "labels.csv"), out=tmp_path / "s",
                                  dry_run=dry_run, **TINY))
        assert not (tmp_path / "s").exists()
    (tmp_path / "more.csv").write_text("path,label,split\n" + "".join(
        f"img{i}.png,{'ab'[i % 2]},{'train' if i < 20 else 'val'}\n" for i in range(24)))
    with pytest.raises(UserError, match=r"none of 8 inputs spread over the 20 inputs of split 'train' could be read"):
        extract(ExtractConfig(dataset=str(tmp_path / "more.csv"), out=tmp_path / "s", **TINY))
    few = make_image_folder(tmp_path / "few", classes=2, per_class=12)  # a run of bad files first
    for path in (few / "class0").iterdir():
        path.write_bytes(b"")
    r = extract(ExtractConfig(dataset=str(few), out=tmp_path / "f", **TINY))
    assert r.complete and sum(map(len, r.skipped.values())) == 12
    corrupt = make_image_folder(tmp_path / "corrupt")  # found, but none decodes: no path advice
    for path in corrupt.rglob("*.png"):
        path.write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"could be read \(most often: .*UnidentifiedImageError") as refused:
        extract(ExtractConfig(dataset=str(corrupt), out=tmp_path / "c", **TINY))
    assert "--data-root" not in str(refused.value)


def test_a_folder_one_level_too_high_is_pointed_out_and_not_trained(tmp_path, capsys):
    """<root>/mydata/<class>/... given as <root>: one class, 'mydata', found recursively."""
    make_image_folder(tmp_path / "wrap" / "mydata")
    r = extract(ExtractConfig(dataset=str(tmp_path / "wrap"), out=tmp_path / "s", **TINY))
    err = capsys.readouterr().err
    assert "one class, 'mydata'" in err and "classes: 1 (mydata)" in err
    with pytest.raises(UserError, match="one class .'mydata'.: a classifier needs two or more"):
        fit(FitConfig(cache=r.path, epochs=1, out=tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_verify_repair_then_extract_redoes_the_damaged_shards_alone(tmp_path, run_cli):
    out, settings = tmp_path / "v", dict(dataset="demo", limit=12, shard_size=4, **TINY)
    extract(ExtractConfig(out=out, **settings))
    before = {name: open_store(out).read_tokens(name) for name in ("train", "val", "test")}
    shard = out / "val" / "tokens" / "c" / "1" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    (out / "test" / "tokens" / "c" / "2" / "0" / "0" / "0").unlink()
    r = run_cli("featcache", "verify", str(out))
    assert r.returncode == 1 and "damaged shard(s): val: [1]; test: [2]. `featcache verify --repair" in \
        " ".join(r.stdout.split())
    with pytest.raises(UserError, match="run `featcache verify --repair` on it, then its extract command"):
        extract(ExtractConfig(out=out, **settings))
    r = run_cli("featcache", "verify", str(out), "--repair")
    assert r.returncode == 1 and "the done flags of 2 damaged shard(s) cleared (val: [1]; test: [2])" in \
        " ".join(r.stdout.split())
    assert not open_store(out).complete
    untouched = (out / "train" / "tokens" / "c" / "0" / "0" / "0" / "0").stat().st_mtime_ns
    again = extract(ExtractConfig(out=out, **settings))
    assert again.status == "resumed" and again.written == {"val": 4, "test": 4} and again.complete
    assert (out / "train" / "tokens" / "c" / "0" / "0" / "0" / "0").stat().st_mtime_ns == untouched
    assert verify(open_store(out)).ok
    for name, tokens in before.items():
        np.testing.assert_array_equal(open_store(out).read_tokens(name), tokens)


def test_verify_finds_corruption_and_missing_shards(tmp_path, run_cli):
    out = tmp_path / "v"
    extract(ExtractConfig(dataset="demo", out=out, limit=12, shard_size=4, **TINY))
    assert verify(open_store(out)).ok
    shard = out / "val" / "tokens" / "c" / "1" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    (out / "test" / "tokens" / "c" / "2" / "0" / "0" / "0").unlink()  # a partial copy, say
    problems = verify(open_store(out)).problems
    assert "val: shard 1 (samples 4-7) is damaged: its bytes changed since they were written (a " \
           "checksum does not match)" in problems, problems  # (not the checksums' raw bytes)
    for reader in ("memmap", "zarr"):  # training stops at the altered bytes, as verify does
        with pytest.raises(UserError, match="val/tokens: .* fails its checksum: the store is damaged"):
            list(ShardLoader(open_store(out), "val", batch_size=4, reader=reader))
    with pytest.raises(UserError, match="fails its checksum"):
        open_store(out).read_tokens("val")
    assert any(p.startswith("test: shard(s) [2] flagged done have no file") for p in problems), problems
    r = run_cli("featcache", "verify", str(out))
    assert r.returncode == 1 and "FAILED" in r.stdout and \
        "9 shards checked, 28 samples read back" in " ".join(r.stdout.split())  # (4 + 4 damaged, lost)
    info = " ".join(run_cli("featcache", "info", str(out)).stdout.split())  # (not "complete yes")
    listed = run_cli("featcache", "ls", str(tmp_path)).stdout
    assert "DAMAGED (1 finished shard(s) lost their files" in listed and " complete" not in listed, listed
    assert "complete no: store" in info and "is damaged: finished shards have lost their files (test: [2])" in info
    # the lost shard is never read as zeros: not trained on, not rerun as complete, not reused
    with pytest.raises(UserError, match=r"is damaged: finished shards have lost their files \(test: \[2\]\)"):
        ShardLoader(open_store(out), "test", batch_size=4, shuffle=False)
    ShardLoader(open_store(out), "train", batch_size=4, shuffle=False)  # a sound split still reads
    with pytest.raises(UserError, match="is damaged"):  # not "already complete"
        extract(ExtractConfig(dataset="demo", out=out, limit=12, shard_size=4, **TINY))
    twin = extract(ExtractConfig(dataset="demo", out=tmp_path / "again", limit=12, shard_size=4, **TINY))
    assert twin.status == "written" and twin.path == tmp_path / "again"  # not the damaged store
    shutil.copytree(tmp_path / "again", tmp_path / "a-bad")  # a chunk that does not decode: listed
    (tmp_path / "a-bad" / "val" / "labels" / "c" / "0").write_bytes(b"not zstd")  # as DAMAGED,
    assert "has a labels chunk that cannot be read" in \
        {s["path"]: s for s in find_stores(tmp_path)}[str(tmp_path / "a-bad")]["damaged"]
    reused = extract(ExtractConfig(dataset="demo", out=tmp_path / "third", limit=12, shard_size=4, **TINY))
    assert reused.path == tmp_path / "again"  # and passed over by a twin search
    shutil.rmtree(tmp_path / "a-bad")
    shutil.copytree(tmp_path / "again", tmp_path / "flip")  # one bit of a label: its checksum fails
    chunk = tmp_path / "flip" / "val" / "labels" / "c" / "1"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 1
    chunk.write_bytes(bytes(raw))
    problems = verify(open_store(tmp_path / "flip")).problems
    assert any("split 'val' has a labels chunk that cannot be read (ValueError: Stored and computed checksum"
               in p for p in problems), problems
    r = run_cli("featcache", "info", str(tmp_path / "flip"))  # one line, not a traceback
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "has a labels chunk that cannot be read" in r.stderr
    shutil.rmtree(tmp_path / "flip")
    shutil.copytree(out, tmp_path / "labels-lost")  # lost labels read as -1, "skipped": still lost
    (tmp_path / "labels-lost" / "test" / "labels" / "c" / "0").unlink()
    assert open_store(tmp_path / "labels-lost").missing_shards() == {"test": [0, 2]}
    (tmp_path / "labels-lost" / "val" / "labels" / "c" / "0").unlink()
    with pytest.raises(UserError, match=r"is damaged: finished shards have lost their files \(val: \[0\]\)"):
        fit(FitConfig(cache=tmp_path / "labels-lost", rank=4, epochs=1, out=tmp_path / "run"))  # (not "no labels")
    (tmp_path / "labels-lost" / "val" / "tokens" / "zarr.json").unlink()  # an array's metadata lost
    r = run_cli("featcache", "verify", str(tmp_path / "labels-lost"))
    assert r.returncode == 1 and "split 'val' has lost its tokens array (a zarr.json is gone)" in r.stdout
    listed = {s["path"]: s for s in find_stores(tmp_path)}
    assert not listed[str(tmp_path / "labels-lost")]["complete"] and "lost its tokens" in \
        listed[str(tmp_path / "labels-lost")]["damaged"]
    train = zarr.open_group(str(out / "train"), mode="r+")
    train["done"][0] = False  # as if interrupted before shard 0 was written: its labels unset
    train["labels"][:4] = -1
    assert not {s["path"]: s for s in find_stores(tmp_path)}[str(out)]["complete"]  # as info says
    with pytest.raises(UserError, match=r"rows of split 'train' in shard\(s\) \[0\] are not written yet"):
        open_store(out).read_tokens("train", [1, 5])  # (they would read as zeros)
    assert open_store(out).read_tokens("train", slice(4, 8)).any()  # written rows still read
    problems = verify(open_store(out)).problems
    assert any(p.startswith("train: 1 shard(s) never finished") for p in problems), problems
    assert not any("skipped" in p for p in problems), problems  # not a second, false problem
    val = zarr.open_group(str(out / "val"), mode="r+")  # written through zarr: checksums hold
    sample = val["tokens"][2]
    sample[0, 0, 0] = np.nan
    val["tokens"][2] = sample
    val["labels"][3] = 99
    problems = verify(open_store(out)).problems
    assert "val: samples [2] hold NaN or Inf" in problems and "val: 1 label(s) outside -1..9" in problems, problems


def test_a_store_not_ours_to_read_inside_is_listed_by_its_root(fp32_store, monkeypatch):
    def private(path, mode="r"):  # as open_store words a colleague's unreadable arrays
        try:
            raise PermissionError(13, "Permission denied", str(path))
        except PermissionError:
            raise UserError(f"cannot read {path}: permission denied") from None

    monkeypatch.setattr(catalog, "open_store", private)
    (listed,) = [s for s in find_stores(fp32_store.parent) if s["path"] == str(fp32_store)]
    assert listed["complete"] and listed["damaged"] is None  # (not DAMAGED: only private)


def test_ls_and_info_describe_stores(fp32_store, tmp_path, run_cli, capsys):
    part = tmp_path / "part"  # a store stopped half-way, then one being written
    shutil.copytree(fp32_store, part)
    zarr.open_group(str(part / "val"), mode="r+")["done"][1] = False
    listed = run_cli("featcache", "ls", str(tmp_path)).stdout
    assert listed.startswith(f"{part}  vit") and \
        listed.endswith("INCOMPLETE (stopped: its extract command, rerun, finishes it)\n")
    with StoreLock(part):
        assert run_cli("featcache", "ls", str(tmp_path)).stdout.endswith(
            f"INCOMPLETE (being written now by pid {os.getpid()} on {socket.gethostname()})\n")
    (stores,) = [s for s in find_stores(fp32_store.parent) if s["path"] == str(fp32_store)]
    assert stores["splits"] == {"train": 24, "val": 24, "test": 24} and stores["complete"]
    r = run_cli("featcache", "ls", str(fp32_store.parent))
    line = next(l for l in r.stdout.splitlines() if l.startswith(str(fp32_store) + " "))
    assert "train=24 val=24 test=24" in line and "fp32" in line and line.endswith("complete")
    assert "(RANDOM weights, seed=0)  32 px  demo (10 classes)" in line
    r = run_cli("featcache", "info", str(fp32_store))
    assert "vit_tiny_patch16_224" in r.stdout and "5 = 1 prefix + 1 x 2 x 2" in r.stdout
    assert "fp32 (the backbone's forward), batch 4" in r.stdout and "10: t-shirt/top, trouser" in r.stdout
    assert "32 px: resized to 35 (bicubic), center crop" in r.stdout  # (timm's crop_pct 0.9)
    # a store another process is laying out (its root's attributes not yet written, its
    # splits' already): neither it nor its splits are taken for stores, as ls or reuse walk by
    laying = tmp_path / "root" / "laying"
    shutil.copytree(fp32_store, laying)
    root = json.loads((laying / "zarr.json").read_text())
    (laying / "zarr.json").write_text(json.dumps({**root, "attributes": {}}))
    shutil.copytree(fp32_store, tmp_path / "root" / "done")
    capsys.readouterr()
    assert [s["path"] for s in find_stores(tmp_path / "root")] == [str(tmp_path / "root" / "done")]
    assert "laying: a store whose layout was begun and not finished" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(UserError, match="began to lay out and did not finish .* rerun that command"):
        open_store(laying)  # (not "is not a featcache store": it is extract's --out)
    zarr.open_group(str(tmp_path / "root" / "foreign"), mode="w").create_array("x", shape=(2,), dtype="f4")
    with pytest.raises(UserError, match="is not a featcache store"):  # another tool's group: no lock, no split of ours
        open_store(tmp_path / "root" / "foreign")


@contextmanager
def read_only(store: Path, at: Path):
    """`store` bind-mounted read-only at `at`, as a lab's readers see its shared cache
    (skipped where this process may not mount)."""
    at.mkdir(parents=True)
    mount = subprocess.run(["mount", "--bind", str(store), str(at)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip("cannot bind-mount here (needs root): " + mount.stderr.decode().strip())
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(at)], check=True, capture_output=True)
        with pytest.raises(OSError):
            (at / "probe").write_text("x")
        yield at
    finally:
        subprocess.run(["umount", str(at)], capture_output=True)


def test_a_read_only_store_serves_info_verify_ls_fit_sweep_and_eval(fp32_store, tmp_path):
    from featcache.info import store_info
    from sidetrain import evaluate_run, sweep

    with read_only(fp32_store, tmp_path / "ro" / "demo32") as ro:
        store = open_store(ro)
        assert store_info(store)["complete"] and verify(store).ok
        unbatched = {k: v for k, v in TINY.items() if k != "batch_size"}  # (the store's is taken)
        again = extract(ExtractConfig(dataset="demo", out=ro, dtype="fp32", limit=24, **unbatched))
        assert again.status == "already complete" and again.complete  # without a lock file
        assert [s["path"] for s in find_stores(ro.parent)] == [str(ro)]
        r = fit(FitConfig(cache=ro, rank=2, epochs=1, batch_size=8, out=tmp_path / "run"))
        assert evaluate_run(r.run, ro)["val"] == pytest.approx(r.val_acc)
        assert len(sweep(FitConfig(cache=ro, rank=2, epochs=1, batch_size=8), {"method": ["linear", "losa"]},
                         tmp_path / "sweep")) == 2


def test_finishing_a_store_one_may_not_write_says_so(fp32_store, tmp_path):
    shutil.copytree(fp32_store, tmp_path / "incomplete")
    zarr.open_group(tmp_path / "incomplete", mode="r+")["train"]["done"][0] = False
    with read_only(tmp_path / "incomplete", tmp_path / "ro" / "demo32") as ro:
        with pytest.raises(UserError, match=r"cannot write to .*ro/demo32 \(Read-only file system\)"):
            extract(ExtractConfig(dataset="demo", out=ro, dtype="fp32", limit=24, shard_size=5, **TINY))


@contextmanager
def small_disk(at: Path, size: str):
    """A tmpfs of `size` at `at`: a disk that fills up (skipped where this process may not mount)."""
    at.mkdir(parents=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(at)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): " + mount.stderr.decode().strip())
    try:
        yield at
    finally:
        subprocess.run(["umount", str(at)], capture_output=True)


def test_a_full_disk_is_said_in_one_line_keeps_no_half_file_and_the_rerun_finishes(fp32_store, tmp_path, run_cli):
    args = ["featcache", "extract", "--model", "vit_tiny", "--random-init", "--img-size", "32", "--dataset",
            "demo", "--limit", "24", "--shard-size", "8", "--batch-size", "4", "--workers", "0", "--no-reuse"]
    with small_disk(tmp_path / "disk", "1M") as disk:  # the store: 1.7 MB
        r = run_cli(*args, "--out", str(disk / "s"), "--force")
        assert r.returncode == 2 and "failed (the disk is full: free some space)" in " ".join(r.stderr.split())
        assert not list(disk.rglob("*.tmp"))  # a shard cut short is removed
        r = run_cli(*args, "--out", str(disk / "s"))  # the rerun checks what is left to write
        assert r.returncode == 2 and "B more but only" in " ".join(r.stderr.split())
        subprocess.run(["mount", "-o", "remount,size=4M", str(disk)], check=True)
        assert run_cli(*args, "--out", str(disk / "s")).returncode == 0
        assert verify(open_store(disk / "s")).ok and not list(disk.rglob("*.tmp"))
        # a fit whose checkpoint does not fit: one line, no half checkpoint, and it resumes
        filler = disk / "filler"
        filler.write_bytes(bytes(shutil.disk_usage(disk).free - 64 * 1024))
        fit_args = ["sidetrain", "fit", "--cache", str(fp32_store), "--rank", "2", "--epochs", "1",
                    "--batch-size", "8", "--out", str(disk / "run")]
        r = run_cli(*fit_args)
        assert r.returncode == 2 and "free some space and rerun the same command to resume" in r.stderr
        assert not list(disk.rglob("*.tmp"))
        filler.unlink()
        assert run_cli(*fit_args).returncode == 0
        assert oct((disk / "run" / "adapter.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~umask())


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
