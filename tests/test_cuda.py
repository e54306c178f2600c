"""The CUDA-only paths, checked against the CPU's: skipped where torch sees no GPU (CI).

Run them on a GPU machine with `pytest tests/test_cuda.py`. Tolerances allow for the GPU's
own rounding (cuDNN's TF32 patch-embedding convolution, other summation orders); the
loader's batches must be bit-identical, as it only moves bytes.
"""

from __future__ import annotations

import importlib
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from featcache import ExtractConfig, extract, open_store
from sidetrain import FitConfig, ShardLoader, evaluate_run, fit, train_many
from sidetrain import train as train_module

from .conftest import TINY, assert_predict_equals_cached

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU = {**TINY, "device": "cuda"}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("precision,dtype,bound", [("fp32", "fp32", 1e-2), ("fp16", "fp32", 2e-2),
                                                   ("fp32", "fp16", 1e-2), ("fp32", "bf16", 2e-2),
                                                   ("fp32", "int8", 4e-2)])
def test_extraction_on_the_gpu_matches_the_cpu(fp32_store, tmp_path, precision, dtype, bound):
    """Batches of 4 in shards of 5: many device-to-host copies in flight, crossing shards;
    each dtype encoded on the GPU, read back decoded (bounds: the CPU's storage error and
    the GPU's rounding)."""
    out = tmp_path / "gpu"
    extract(ExtractConfig(dataset="demo", out=out, dtype=dtype, limit=24, shard_size=5,
                          precision=precision, **GPU))
    for split in ("train", "val", "test"):
        cpu = torch.from_numpy(open_store(fp32_store).split(split).tokens[:])
        (gpu,) = ShardLoader(open_store(out), split, batch_size=24, shuffle=False).epoch(0)
        assert rel_err(gpu.tokens.float(), cpu) < bound, split


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8", "fp32"])
def test_gpu_stores_are_the_same_bytes_when_the_gpu_lags(tmp_path, monkeypatch, dtype):
    """Each batch's encode first waits ~30 ms on the GPU, so the host runs ahead while the
    copies back are still queued: a pinned buffer reused too early would mix rows."""
    cfg = dict(dataset="demo", dtype=dtype, limit=24, shard_size=5, **GPU)
    extract(ExtractConfig(out=tmp_path / "plain", **cfg))
    stage = importlib.import_module("featcache.extraction")
    encode = stage.encode

    def lagging(*args, **kwargs):
        torch.cuda._sleep(50_000_000)  # GPU cycles: the copies queue behind them
        return encode(*args, **kwargs)

    monkeypatch.setattr(stage, "encode", lagging)
    extract(ExtractConfig(out=tmp_path / "lagging", reuse=False, **cfg))  # not "plain" again
    plain, lagged = open_store(tmp_path / "plain"), open_store(tmp_path / "lagging")
    for split in plain.splits:
        a, b = plain.split(split), lagged.split(split)
        np.testing.assert_array_equal(a.tokens[:], b.tokens[:])
        np.testing.assert_array_equal(a.labels, b.labels)
        if a.scales is not None:
            np.testing.assert_array_equal(a.scales[:], b.scales[:])


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8", "fp32"])
def test_gpu_batches_are_the_cpu_batches(tmp_path, dtype):
    """Pinned gathers made ahead in a thread, buffer fills with carried samples, int8
    decoded on the device; and the split preloaded into the GPU's memory."""
    out = tmp_path / dtype
    extract(ExtractConfig(dataset="demo", out=out, dtype=dtype, limit=24, shard_size=5, **TINY))
    store = open_store(out)
    small = store.split("train").tokens.nbytes // 24 * 6
    for layers in (None, [0, 2]):
        cpu, gpu, held = (ShardLoader(store, "train", batch_size=4, shuffle=True, seed=3, buffer_bytes=small,
                                      layers=layers, device=d, preload=p)
                          for d, p in (("cpu", False), ("cuda", False), ("cuda", True)))
        for epoch in (1, 2):
            triples = list(zip(cpu.epoch(epoch), gpu.epoch(epoch), held.epoch(epoch)))
            assert len(triples) == len(cpu)
            for a, b, c in triples:
                assert b.tokens.is_cuda and c.tokens.is_cuda and c.labels.is_cuda
                assert torch.equal(a.tokens, b.tokens.cpu()) and torch.equal(a.tokens, c.tokens.cpu())
                assert torch.equal(a.labels, b.labels.cpu()) and torch.equal(a.labels, c.labels.cpu())
                assert np.array_equal(a.index, c.index)
    stop = gpu.epoch(3)  # a consumer that stops early leaves no thread behind
    next(stop)
    stop.close()


def test_gpu_training_resumes_and_scores_like_the_cpu(fp32_store, tmp_path, monkeypatch):
    cfg = FitConfig(cache=fp32_store, rank=4, epochs=3, batch_size=8, dropout=0.1, device="cuda")
    whole = fit(FitConfig(**{**vars(cfg), "out": tmp_path / "whole"}))
    original = train_module.Trainer.end_epoch

    def crash_after_one(self, *args):
        original(self, *args)
        if self.epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module.Trainer, "end_epoch", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        fit(FitConfig(**{**vars(cfg), "out": tmp_path / "resumed"}))
    monkeypatch.setattr(train_module.Trainer, "end_epoch", original)
    resumed = fit(FitConfig(**{**vars(cfg), "out": tmp_path / "resumed"}))  # the CUDA RNG state
    a, b = (load_file(str(r.run / "adapter.safetensors")) for r in (whole, resumed))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    on_cpu = evaluate_run(whole.run, fp32_store)
    assert evaluate_run(whole.run, fp32_store, device="cuda") == pytest.approx(on_cpu, abs=1 / 24)
    assert whole.val_acc == pytest.approx(on_cpu["val"], abs=1 / 24)


def test_compiled_training_on_the_gpu_is_the_uncompiled_run(fp32_store, tmp_path):
    """--compile on CUDA (Triton's kernels), preloaded: the run an uncompiled one gives, up to
    rounding; and under bf16 autocast it learns."""
    cfg = FitConfig(cache=fp32_store, rank=4, epochs=2, batch_size=8, device="cuda", preload=True)
    plain = fit(FitConfig(**{**vars(cfg), "out": tmp_path / "plain"}))
    fast = fit(FitConfig(**{**vars(cfg), "out": tmp_path / "fast", "compile": True}))
    np.testing.assert_allclose([h["val_loss"] for h in fast.history],
                               [h["val_loss"] for h in plain.history], rtol=1e-4)
    bf16 = fit(FitConfig(**{**vars(cfg), "out": tmp_path / "bf16", "compile": True, "precision": "bf16",
                            "epochs": 4, "lr": 3e-3}))
    losses = [h["train_loss"] for h in bf16.history]
    assert bf16.failed is None and losses[-1] < losses[0]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_training_learns_and_times_each_configuration(fp32_store, tmp_path, precision):
    base = FitConfig(cache=fp32_store, epochs=4, batch_size=8, lr=3e-3, device="cuda", precision=precision)
    t0 = time.perf_counter()
    results = train_many([FitConfig(**{**vars(base), "rank": r, "out": tmp_path / f"r{r}"}) for r in (2, 4)]
                         + [FitConfig(**{**vars(base), "method": "linear", "out": tmp_path / "linear"})])
    elapsed = time.perf_counter() - t0
    for r in results:
        losses, seconds = ([h[k] for h in r.history] for k in ("train_loss", "seconds"))
        assert r.failed is None and losses[-1] < losses[0]
        assert 0 < seconds[0] < seconds[1] < seconds[2] < seconds[3]  # each epoch's own time added
    # the configurations' times share out the epochs' wall time: in seconds, not more
    assert 0 < sum(r.seconds for r in results) <= elapsed


def test_predict_on_the_gpu_runs_the_backbone_as_the_store_did(image_folder, tmp_path):
    """An fp16-forward store: predict's backbone under fp16 autocast, nested in the run's."""
    store = tmp_path / "store"
    extract(ExtractConfig(dataset=str(image_folder), out=store, dtype="fp32", precision="fp16", **GPU))
    r = fit(FitConfig(cache=store, rank=2, epochs=2, batch_size=4, device="cuda", out=tmp_path / "run"))
    files = [image_folder / k for k in open_store(store).split("val").keys]
    assert_predict_equals_cached(r.run, store, files, device="cuda", atol=2e-3)


def test_a_store_that_records_no_device_is_continued_on_the_gpu_with_a_note(tmp_path, capsys):
    """Stores made before the device was recorded were begun on the CPU (the default then)."""
    import zarr
    cfg = dict(dataset="demo", out=tmp_path / "s", limit=4, shard_size=2, **TINY)
    extract(ExtractConfig(**cfg))
    root = zarr.open_group(str(tmp_path / "s"), mode="r+")
    meta = {k: v for k, v in root.attrs["featcache"].items() if k != "device"}
    root.attrs["featcache"] = {**meta, "complete": False}
    root["train"]["done"][0] = False
    capsys.readouterr()
    assert extract(ExtractConfig(**{**cfg, "device": "cuda"})).status == "resumed"
    assert "does not record the device it was begun on" in " ".join(capsys.readouterr().err.split())
