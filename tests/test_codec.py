"""Precisions: bf16 and int8 storage stay within their error budgets; a 16-bit forward is recorded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from featcache import ExtractConfig, UserError, extract, open_store
from featcache.catalog import find_stores
from featcache.codec import calibrate, decode, encode
from sidetrain import FitConfig, ModelSpec, ShardLoader, build_classifier, evaluate_run, fit

from .conftest import TINY, assert_predict_equals_cached


def roundtrip(z: torch.Tensor, dtype: str, calib: torch.Tensor | None = None) -> torch.Tensor:
    cs = calibrate(z if calib is None else calib)
    q, s = encode(z, dtype, cs)
    return decode(q, dtype, s, torch.from_numpy(cs))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Relative L2 error per layer of (B, L, T, D) tensors."""
    return (a - b).pow(2).sum((0, 2, 3)).sqrt() / b.pow(2).sum((0, 2, 3)).sqrt()


def test_int8_on_gaussian_tokens():
    z = torch.randn(8, 3, 17, 64, generator=torch.Generator().manual_seed(0))
    assert rel_err(roundtrip(z, "int8"), z).max() < 0.01


def test_int8_copes_with_outlier_channels():
    """ViT-like: a few channels 100x the rest; calibration on other samples than encoded."""
    g = torch.Generator().manual_seed(1)
    gain = torch.ones(64)
    gain[[3, 40]] = 100.0
    z = torch.randn(16, 4, 17, 64, generator=g) * gain
    ours = rel_err(roundtrip(z[8:], "int8", calib=z[:8]), z[8:])
    q, s = encode(z[8:], "int8", np.ones((4, 64), np.float32))  # per-token scale alone
    naive = rel_err(decode(q, "int8", s, torch.ones(4, 64)), z[8:])
    assert ours.max() < 0.01
    assert (naive > 2 * ours).all()  # measured: 1.6 % against 0.6 %


def test_int8_channel_scales_do_not_depend_on_the_batch_size(tmp_path):
    """The content key leaves the batch size out: two stores that differ only in it are
    twins, so their scales (the absmax over the first 32 inputs) must agree."""
    scales = [open_store(extract(ExtractConfig(dataset="demo", split=["train"], limit=40, dtype="int8",
                                               out=tmp_path / f"b{b}", **{**TINY, "batch_size": b},
                                               reuse=False)).path).channel_scale for b in (4, 32)]
    np.testing.assert_allclose(scales[0], scales[1], rtol=1e-5)


def test_tokens_fp16_cannot_hold_or_nan_stop_the_extraction(tmp_path, monkeypatch):
    from featcache import extraction
    forward = extraction.forward_taps
    cfg = ExtractConfig(dataset="demo", split=["val"], limit=4, out=tmp_path / "s", **TINY)
    monkeypatch.setattr(extraction, "forward_taps", lambda *a, **k: forward(*a, **k) * 1e5)
    with pytest.raises(UserError, match=r"split val, input .* or one of the 3 after it in its batch: the "
                       r"backbone's tokens reach .*e\+0\d, beyond fp16's largest 65504: extract with --dtype bf16"):
        extract(cfg)
    extract(ExtractConfig(**{**vars(cfg), "dtype": "bf16", "out": tmp_path / "b"}))  # bf16 holds them
    monkeypatch.setattr(extraction, "forward_taps", lambda *a, **k: forward(*a, **k) * np.nan)
    with pytest.raises(UserError, match="the backbone's tokens hold NaN or Inf"):
        extract(ExtractConfig(**{**vars(cfg), "dtype": "int8", "out": tmp_path / "n"}))


def test_bf16_roundtrip():
    z = torch.randn(4, 2, 5, 32) * 10
    q, s = encode(z, "bf16")
    assert q.dtype == torch.uint16 and s is None
    assert rel_err(decode(q, "bf16"), z).max() < 0.005


def test_int8_and_bf16_stores_load_close_to_fp32(fp32_store, tmp_path):
    exact = open_store(fp32_store).split("train").tokens[:]
    for dtype, bound in (("int8", 0.01), ("bf16", 0.005)):  # int8: 0.0077 here, 0.015 truncating
        out = tmp_path / dtype
        extract(ExtractConfig(dataset="demo", out=out, dtype=dtype, limit=24, shard_size=5, **TINY))
        loader = ShardLoader(open_store(out), "train", batch_size=24, shuffle=False)
        (batch,) = list(loader.epoch(0))
        assert rel_err(batch.tokens, torch.from_numpy(exact)).max() < bound, dtype
        assert batch.tokens.dtype == {"int8": torch.float32, "bf16": torch.bfloat16}[dtype]
        store = open_store(out)  # the numpy decoding, for readers of their own, gives the same
        np.testing.assert_array_equal(store.read_tokens("train"), batch.tokens.float().numpy())
        np.testing.assert_array_equal(store.read_tokens("train", [3, 1]), batch.tokens.float()[[3, 1]].numpy())
        np.testing.assert_array_equal(store.read_tokens("train", 2), batch.tokens.float()[2].numpy())
        assert store.read_tokens("train", []).shape == (0, *batch.tokens.shape[1:])
        # 16-bit batches: the models widen them inside, to exactly what float32 batches give
        for spec in (ModelSpec("losa", rank=4, zero_init=False), ModelSpec("linear")):
            model = build_classifier(spec, store, seed=0)
            torch.testing.assert_close(model(batch.tokens), model(batch.tokens.float()), rtol=0, atol=0)
        if dtype == "bf16":  # the store's raw bits are not tokens
            with pytest.raises(TypeError, match="floating point"):
                model(torch.from_numpy(store.split("train").tokens[:2]))


def test_a_bf16_forward_is_recorded_kept_apart_and_replayed_by_predict(image_folder, tmp_path, capsys):
    """--precision bf16: the store says so, holds tokens near the fp32 forward's but not
    equal to them, is not taken for (nor resumed as) an fp32 store, and `predict` runs the
    backbone as the store did."""
    exact, half = tmp_path / "fp32", tmp_path / "bf16"
    common = dict(dataset=str(image_folder), dtype="fp32", **TINY)
    extract(ExtractConfig(out=exact, **common))
    assert extract(ExtractConfig(out=half, precision="bf16", **common)).status == "written"
    a, b = open_store(exact), open_store(half)
    assert (a.precision, b.precision) == ("fp32", "bf16")
    assert {s["path"]: s["precision"] for s in find_stores(tmp_path)} == {str(exact): "fp32", str(half): "bf16"}
    za, zb = (torch.from_numpy(s.split("train").tokens[:]) for s in (a, b))
    assert 0 < rel_err(zb, za).max() < 0.02
    with pytest.raises(UserError, match="precision: store has 'bf16', this run 'fp16'"):
        extract(ExtractConfig(out=half, precision="fp16", **common))
    r = fit(FitConfig(cache=half, rank=2, epochs=2, batch_size=4, out=tmp_path / "run"))
    assert json.loads((r.run / "config.json").read_text())["store"]["precision"] == "bf16"
    assert_predict_equals_cached(r.run, half, [image_folder / k for k in b.split("val").keys])
    capsys.readouterr()
    evaluate_run(r.run, exact)  # scored on the fp32 forward's tokens: allowed, with a word
    assert "trained on tokens computed in bf16" in " ".join(capsys.readouterr().err.split())
