"""Stores in an S3 bucket: moto's S3 server on 127.0.0.1, reached through s3fs like a real one.

Extraction straight to s3://, the server going away mid-extraction and coming back (the
rerun resumes and ends bit-identical to a local extraction), then info, verify, ls over
the bucket, fit and sweep from the bucket.
"""

from __future__ import annotations

import socket
import urllib.request

import numpy as np
import pytest

from featcache import ExtractConfig, UserError, extract, open_store, shards
from featcache.catalog import find_stores
from featcache.info import store_info
from featcache.verify import verify
from sidetrain import FitConfig, fit, sweep

from .conftest import TINY

moto_server = pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

BUCKET = "lab-cache"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    """A running moto S3 server with an empty bucket; yields a restartable handle."""
    import fsspec.config
    import s3fs
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    # what FSSPEC_S3_ENDPOINT_URL=... in the environment gives a fresh process
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})

    class Server:
        def start(self):
            self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            self.server.start()

        def stop(self):
            self.server.stop()

    server = Server()
    server.start()
    # moto keeps its buckets in this process across servers: start from none
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"))
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem(endpoint_url=endpoint).mkdir(BUCKET)
    yield server
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


def test_extract_to_a_bucket_survives_the_server_going_away_then_reads_back(s3, tmp_path, monkeypatch):
    cfg = dict(dataset="demo", limit=12, shard_size=4, dtype="fp32", **TINY)
    local = extract(ExtractConfig(out=tmp_path / "local", **cfg)).path
    url = f"s3://{BUCKET}/cache/demo"
    writes = []
    real_write = shards.write_shard

    def write_then_fail(*args):  # the server goes away after the first two shards
        if len(writes) == 2:
            s3.stop()
        real_write(*args)
        writes.append(args[2])

    monkeypatch.setattr(shards, "write_shard", write_then_fail)
    with pytest.raises(UserError, match="rerun the same command"):
        extract(ExtractConfig(out=url, **cfg))
    monkeypatch.setattr(shards, "write_shard", real_write)
    s3.start()  # the same server again: moto keeps the bucket's objects in this process

    r = extract(ExtractConfig(out=url, **cfg))
    assert r.status == "resumed" and sum(r.written.values()) < 36  # only what was missing
    remote, here = open_store(url), open_store(local)
    assert remote.complete
    for name in here.splits:
        np.testing.assert_array_equal(remote.split(name).tokens[:], here.split(name).tokens[:])
        np.testing.assert_array_equal(remote.split(name).labels, here.split(name).labels)
    assert extract(ExtractConfig(out=url, **cfg)).status == "already complete"

    info = store_info(remote)
    assert info["complete"] and info["bytes_on_disk"] > 0 and info["path"] == url
    assert verify(remote).ok
    assert [s["path"] for s in find_stores(f"s3://{BUCKET}")] == [url]

    a = fit(FitConfig(cache=url, rank=2, epochs=2, batch_size=8, out=tmp_path / "from-s3"))
    b = fit(FitConfig(cache=local, rank=2, epochs=2, batch_size=8, out=tmp_path / "from-disk"))
    assert a.val_acc == b.val_acc and a.history[-1]["train_loss"] == pytest.approx(b.history[-1]["train_loss"], abs=1e-6)
    runs = sweep(FitConfig(cache=url, epochs=1, batch_size=8), {"method": ["linear", "losa"], "rank": [2]},
                 tmp_path / "sweep")
    assert len(runs) == 2


def test_a_bucket_store_takes_one_writer_and_never_lands_on_other_data(s3, tmp_path):
    import s3fs
    with pytest.raises(UserError, match="one writer"):
        extract(ExtractConfig(dataset="demo", limit=4, out=f"s3://{BUCKET}/x", shard=(0, 2), **TINY))
    s3fs.S3FileSystem().pipe(f"{BUCKET}/data/train/results.csv", b"precious")
    with pytest.raises(UserError, match="not empty and is not a featcache store"):
        extract(ExtractConfig(dataset="demo", limit=4, out=f"s3://{BUCKET}/data", **TINY))
    assert s3fs.S3FileSystem().cat(f"{BUCKET}/data/train/results.csv") == b"precious"
