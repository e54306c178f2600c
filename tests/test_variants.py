"""Every LoSA option, sweeps, resume, NaN, eval and predict."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from featcache import ExtractConfig, UserError, extract, open_store
from featcache.models import TokenLayout
from sidetrain import (FitConfig, ModelSpec, build_classifier, evaluate_run, fit, load_predictor, predict,
                       sweep, train_many)
from sidetrain.plots import plot_pareto
from sidetrain.sweep import expand
from sidetrain import train as train_module
from sidetrain.losa import LoSA, TokenMixer, norm_linear
from sidetrain.readout import HEAD_INPUTS, Readout, head_layers

from .conftest import TINY, assert_predict_equals_cached


@pytest.mark.parametrize("variant", ["A", "B", "C"])
@pytest.mark.parametrize("order", ["channel-token", "token-channel", "alternate"])
@pytest.mark.parametrize("head_input", ["pool", "cls+mean", "last4", "all"])
def test_every_variant_starts_at_its_probe_and_learns(fp32_store, variant, order, head_input):
    store = open_store(fp32_store)
    z = torch.from_numpy(store.split("train").tokens[:8])
    y = torch.from_numpy(store.split("train").labels[:8])
    spec = ModelSpec("losa", rank=4, variant=variant, order=order, head_input=head_input)
    losa = build_classifier(spec, store, seed=1)
    probe = build_classifier(ModelSpec("linear", head_input=head_input), store, seed=1)
    torch.testing.assert_close(losa(z), probe(z), rtol=0, atol=0)
    opt = torch.optim.AdamW(losa.parameters(), lr=1e-2)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(losa(z), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.allclose(losa(z), probe(z))  # the side network moved the logits
    # every layer's mixer gets a gradient, not only those the head reads (from random up-
    # projections: zero ones pass none back to the layers before them at the first step)
    warm = build_classifier(replace(spec, zero_init=False), store, seed=1)
    torch.nn.functional.cross_entropy(warm(z), y).backward()
    ups = [p.grad for n, p in warm.side.named_parameters() if n.endswith("_up.weight")]
    assert len(ups) >= len(warm.side.mixers) and all(g.abs().sum() > 0 for g in ups)


@pytest.mark.parametrize("variant", ["A", "B", "C"])
@pytest.mark.parametrize("order", ["channel-token", "token-channel", "alternate"])
def test_keep_gives_the_last_refined_layers_and_sums_stay_in_full_precision(variant, order):
    # a two-frame clip: spatial and temporal mixing, prefix tokens joined
    layout = TokenLayout(prefix_tokens=2, class_token=True, register_tokens=0, grid=(2, 3),
                         frames=2, width=8, pool="token")
    side = LoSA(3, layout, rank=2, variant=variant, order=order)
    for p in side.parameters():
        torch.nn.init.normal_(p, std=0.5)
    z = torch.randn(2, 3, layout.tokens, 8)
    full = side(z)
    assert full.shape == z.shape
    torch.testing.assert_close(side(z, keep=2), full[:, -2:], rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # Linear outputs bf16; the sums must not
        assert all(g(z[:, 0]).dtype == torch.float32 for g in side.mixers)
        assert side(z).dtype == torch.float32


def test_a_rank_above_the_tokens_names_the_largest_that_fits():
    """What tiny test images meet first: ViT-Ti at 32 px has 5 tokens, the default rank 16."""
    layout = TokenLayout(prefix_tokens=1, class_token=True, register_tokens=0, grid=(2, 2),
                         frames=1, width=192, pool="token")
    with pytest.raises(UserError, match=r"tokens per frame 5\) = 5; pass --rank 5 or less"):
        LoSA(2, layout, rank=16)


def test_norm_linear_gives_layernorm_then_linear_and_their_gradients():
    """It keeps half of what LayerNorm + Linear keep for backward, with the same results."""
    norm, linear = torch.nn.LayerNorm(8).double(), torch.nn.Linear(8, 3).double()
    for p in [*norm.parameters(), *linear.parameters()]:
        torch.nn.init.normal_(p)
    x = (torch.randn(2, 5, 8, dtype=torch.double) * 3 + 1).requires_grad_()  # off-centre tokens
    inputs = [x, *norm.parameters(), *linear.parameters()]
    got, expected = norm_linear(x, norm, linear), linear(norm(x))
    torch.testing.assert_close(got, expected)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(expected, inputs, g)):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda x: norm_linear(x, norm, linear), (x,))


@pytest.mark.parametrize("frames,prefix", [(1, "join"), (2, "join"), (2, "channel")])
def test_the_token_mixer_is_a_low_rank_product_over_each_frames_tokens(frames, prefix):
    """Against the formula of docs/losa.md, written out frame by frame: values and gradients."""
    layout = TokenLayout(prefix_tokens=frames, class_token=True, register_tokens=0, grid=(2, 3),
                         frames=frames, width=8, pool="token")
    mixer = TokenMixer(layout, rank=2, temporal=False, prefix=prefix)
    for p in mixer.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(3, layout.tokens, 8, requires_grad=True)
    y = mixer.token_norm(x)
    expected = torch.zeros_like(x)  # prefix tokens left to channel mixing get no update
    for f in range(frames):
        tokens = ([f] if prefix == "join" else []) + [frames + 6 * f + i for i in range(6)]
        down = torch.einsum("rq,bqd->brd", mixer.token_down.weight, y[:, tokens]) + mixer.token_down.bias[:, None]
        expected[:, tokens] = torch.einsum("qr,brd->bqd", mixer.token_up.weight, torch.nn.functional.gelu(down))
    got = mixer(x)
    torch.testing.assert_close(got, expected)
    inputs, g = [x, *mixer.parameters()], torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(expected, inputs, g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("head_input", HEAD_INPUTS)
@pytest.mark.parametrize("frames,pool", [(1, "token"), (1, "avg"), (3, "token")])
def test_the_readout_averages_the_class_tokens_and_the_patches(head_input, frames, pool):
    """The readout pools through a matrix of token weights: it must equal the slicing it
    replaced, with a register token in each frame's prefix and frames on the token axis."""
    layout = TokenLayout(prefix_tokens=2 * frames, class_token=True, register_tokens=1, grid=(2, 3),
                         frames=frames, width=8, pool=pool)
    readout = Readout({"norm": {"type": "identity"}, "fc_norm": {"type": "identity"}}, layout, head_input)
    x = torch.randn(2, head_layers(head_input, 5), layout.tokens, 8)
    cls = x[:, :, 0:2 * frames:2].mean(2)  # each frame's class token, averaged over frames
    mean = x[:, :, 2 * frames:].mean(2)  # every patch of every frame
    if head_input == "pool":
        expected = (cls if pool == "token" else mean)[:, -1]
    else:
        expected = torch.cat([cls, mean], -1).flatten(1)
    assert readout.features(x.shape[1], 8) == expected.shape[1]
    torch.testing.assert_close(readout(x), expected)


def test_adapters_saved_before_video_support_still_load(fp32_store):
    """The token mixer's weights moved into a submodule (`token.token_down`): old names load."""
    store = open_store(fp32_store)
    model = build_classifier(ModelSpec("losa", rank=4, zero_init=False), store, seed=0)
    old = {k.replace(".token.token_", ".token_"): v for k, v in model.state_dict().items()}
    assert any(".token_down." in k for k in old) and not any(".token.token_" in k for k in old)
    again = build_classifier(ModelSpec("losa", rank=4), store, seed=1)
    again.load_state_dict(old)
    z = torch.from_numpy(store.split("train").tokens[:4])
    torch.testing.assert_close(again(z), model(z), rtol=0, atol=0)


def test_zero_init_off_and_mlp_head(fp32_store):
    store = open_store(fp32_store)
    z = torch.from_numpy(store.split("train").tokens[:4])
    a = build_classifier(ModelSpec("losa", rank=4, zero_init=False), store, seed=0)
    b = build_classifier(ModelSpec("linear"), store, seed=0)
    assert not torch.allclose(a(z), b(z))
    assert a.side.variant == "B"  # auto: B for images
    mlp = build_classifier(ModelSpec("mlp", mlp_hidden=32), store, seed=0)
    assert mlp(z).shape == (4, 10)


def test_a_sweep_trains_each_configuration_as_fit_would(fp32_store, tmp_path, capsys):
    base = FitConfig(cache=fp32_store, epochs=2, batch_size=8, dropout=0.1)
    # the four probes share one readout per batch (the mlp heads with dropout); each must
    # still train exactly as it would alone
    grid = {"method": ["losa", "linear", "mlp"], "rank": [2, 4], "lr": [1e-3, 1e-2]}
    t0 = time.perf_counter()
    results = sweep(base, grid, tmp_path / "sw")
    # each configuration's time is its share of the epochs' wall time: together, no more
    assert 0 < sum(r.seconds for r in results) <= time.perf_counter() - t0
    assert sorted(r.run.name for r in results) == [
        "linear-lr0.001", "linear-lr0.01", "losa-rank2-lr0.001", "losa-rank2-lr0.01",
        "losa-rank4-lr0.001", "losa-rank4-lr0.01", "mlp-lr0.001", "mlp-lr0.01"]
    assert (tmp_path / "sw" / "pareto.png").is_file()
    plot_pareto([], tmp_path / "none.png", "every configuration failed")  # still a picture
    assert (tmp_path / "none.png").is_file()
    for bad, why in (({"ranks": [2]}, "'ranks' is not a FitConfig field"),
                     ({"epochs": [1, 2]}, "'epochs' cannot vary within a sweep"),
                     ({"rank": 4}, "'rank' takes a list of values, like \\[4\\]"),
                     ({"rank": []}, "'rank' has no values"),
                     ({"grad_clip": [1.0, -1.0]}, "--grad-clip must be a number of at least 0")):
        with pytest.raises(UserError, match=why):
            sweep(base, bad, str(tmp_path / "bad"))
    for r in results:
        alone = fit(r.config.__class__(**{**vars(r.config), "out": tmp_path / "alone" / r.run.name}))
        assert alone.val_acc == r.val_acc and alone.history[-1]["train_loss"] == pytest.approx(
            r.history[-1]["train_loss"], abs=1e-6)
        a, b = load_file(str(r.run / "adapter.safetensors")), load_file(str(alone.run / "adapter.safetensors"))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    moved = tmp_path / "moved"  # sweep.json names runs under its own folder: it survives a move
    (tmp_path / "sw").rename(moved)
    rows = json.loads((moved / "sweep.json").read_text())
    assert sorted(row["run"] for row in rows) == sorted(r.run.name for r in results)
    assert all((moved / row["config"]["out"] / "adapter.safetensors").is_file() for row in rows)
    # a rerun with other lists adds its runs to the folder's sweep.json; it keeps the others
    (moved / "mlp-lr0.01" / "adapter.safetensors").unlink()  # a run deleted by hand is dropped
    shutil.copytree(moved / "mlp-lr0.001", moved / "elsewhere")  # and one on another store left out
    config = json.loads((moved / "elsewhere" / "config.json").read_text())
    (moved / "elsewhere" / "config.json").write_text(json.dumps({**config, "cache": "/another/store"}))
    shutil.copytree(moved / "mlp-lr0.001", moved / "cut")  # and one whose summary was cut short
    (moved / "cut" / "summary.json").write_text('{"run": ')
    shutil.copytree(moved / "mlp-lr0.001", moved / "half")  # and one not finished, named
    (moved / "half" / "summary.json").unlink()
    capsys.readouterr()
    again = sweep(base, {"method": ["linear"], "lr": [1e-3, 1e-2, 0.1]}, moved)
    said = " ".join(capsys.readouterr().err.split())
    assert f"1 run(s) in {moved} are unfinished and left out of sweep.json (half)" in said
    rows = json.loads((moved / "sweep.json").read_text())
    assert [row["run"] for row in rows] == [
        "losa-rank2-lr0.001", "losa-rank2-lr0.01", "losa-rank4-lr0.001", "losa-rank4-lr0.01",
        "mlp-lr0.001", "linear-lr0.001", "linear-lr0.01", "linear-lr0.1"]
    assert rows[-1]["val_acc"] == again[-1].val_acc and rows[0]["val_acc"] == results[0].val_acc
    # a grid that names a configuration differently ("losa": nothing varies) continues its run
    (same,) = sweep(base, {"rank": [2]}, moved)
    assert same.run == moved / "losa-rank2-lr0.001" and not (moved / "losa").exists()
    # a name that an earlier grid gave to another configuration: the new run's says what differs
    (three,) = sweep(base, {"rank": [3]}, tmp_path / "names")
    capsys.readouterr()
    (one,) = sweep(base, {"rank": [1]}, tmp_path / "names")
    assert three.run.name == "losa" and one.run.name == "losa-rank1" and one.config.rank == 1
    assert "names/losa holds another configuration (an earlier grid's): this one trains in losa-rank1" in \
        " ".join(capsys.readouterr().err.split())
    (again,) = sweep(base, {"rank": [1]}, tmp_path / "names")  # and finds it there next time
    assert again.run == one.run and again.val_acc == one.val_acc


def test_a_sweep_varies_taps_and_drops_options_a_method_lacks(fp32_store, tmp_path, capsys):
    base = FitConfig(cache=fp32_store, rank=2, epochs=1, batch_size=8)
    names = [c.out.name for c in expand(base, {"method": ["losa", "linear", "mlp"], "mlp_hidden": [8, 16]},
                                        tmp_path)]
    assert names == ["losa", "linear", "mlp-mlp_hidden8", "mlp-mlp_hidden16"]  # one losa, one linear
    capsys.readouterr()
    assert len(expand(base, {"method": ["losa", "linear"], "mlp_hidden": [8, 16]}, tmp_path)) == 2
    assert "varies mlp_hidden, which only mlp have, and trains none of them" in \
        " ".join(capsys.readouterr().err.split())
    # LoSA on all taps and on the last two, from one pass that reads their union
    results = sweep(base, {"taps": ["all", "last:2"]}, tmp_path / "taps")
    assert [r.run.name for r in results] == ["losa-tapsall", "losa-tapslast_2"]
    alone = fit(FitConfig(**{**vars(results[1].config), "out": tmp_path / "alone"}))
    assert alone.params < results[0].params and alone.params == results[1].params
    assert alone.history[-1]["val_loss"] == pytest.approx(results[1].history[-1]["val_loss"], abs=1e-6)
    capsys.readouterr()
    (once,) = sweep(base, {"variant": ["auto", "B"]}, tmp_path / "auto")  # auto is B on images
    assert once.run.name == "losa-variantauto" and once.config.variant == "B"
    assert "losa-variantB is losa-variantauto on this store" in " ".join(capsys.readouterr().err.split())


def test_killed_fit_resumes_to_the_uninterrupted_result(fp32_store, tmp_path, monkeypatch, capsys):
    cfg = FitConfig(cache=fp32_store, rank=4, epochs=4, batch_size=8, dropout=0.1)
    whole = fit(FitConfig(**{**vars(cfg), "out": tmp_path / "whole"}))
    original = train_module.Trainer.end_epoch

    def crash_after_two(self, *args):
        original(self, *args)
        if self.epoch == 2:
            raise KeyboardInterrupt  # as if killed right after the epoch-1 checkpoint

    monkeypatch.setattr(train_module.Trainer, "end_epoch", crash_after_two)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        fit(FitConfig(**{**vars(cfg), "out": tmp_path / "resumed"}))
    assert f"kept in the checkpoint: {tmp_path / 'resumed'}: 2 of 4 epochs." in " ".join(capsys.readouterr().err.split())
    with pytest.raises(UserError, match="has not finished training .*rerun the `sidetrain fit` or `sweep` "
                                        "command that began it, which resumes it"):
        evaluate_run(tmp_path / "resumed")
    monkeypatch.setattr(train_module.Trainer, "end_epoch", original)
    resumed = fit(FitConfig(**{**vars(cfg), "out": tmp_path / "resumed"}))
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in whole.history]
    a = load_file(str(whole.run / "adapter.safetensors"))
    b = load_file(str(resumed.run / "adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match=r"another configuration \(it differs in rank \(4 there, 2 here\), "
                                        r"trainable_params .*\)\. Use another --out \(e\.g\. --out \S*resumed-rank2\)"):
        fit(FitConfig(**{**vars(cfg), "rank": 2, "out": tmp_path / "resumed"}))
    # a run from before the loader's batch order changed would not replay its batches
    saved = json.loads((whole.run / "config.json").read_text())
    del saved["data_order"]
    (whole.run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match="differs in data_order"):
        fit(FitConfig(**{**vars(cfg), "out": whole.run}))


@pytest.mark.parametrize("cut_before,nth", [("metrics.jsonl", 2), ("checkpoint.pt", 2), ("summary.json", 1)])
def test_a_run_killed_between_its_files_ends_with_all_of_them(fp32_store, tmp_path, monkeypatch, cut_before, nth):
    """Killed before or after the last epoch's metrics, or after the adapter but before the
    summary: the rerun leaves every file, as an uninterrupted run does."""
    cfg = FitConfig(cache=fp32_store, rank=4, epochs=2, batch_size=8, out=tmp_path / "run")
    write, seen = train_module._write_whole, []

    def killed(path, how):
        seen.append(path.name)
        if seen.count(cut_before) == nth:
            raise KeyboardInterrupt
        write(path, how)

    monkeypatch.setattr(train_module, "_write_whole", killed)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg)
    monkeypatch.setattr(train_module, "_write_whole", write)
    r = fit(cfg)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["epoch"] for row in rows] == [0, 1] and r.best_epoch >= 0
    assert all((tmp_path / "run" / f).is_file() for f in ("curves.png", "summary.json", "adapter.safetensors"))


def test_a_sweep_killed_between_two_checkpoints_resumes_to_the_uninterrupted_result(
        fp32_store, tmp_path, monkeypatch):
    """Killed after the first configuration saved epoch 1 and before the second did: the
    rerun trains the second alone through epoch 1, then both together, as if never killed."""
    base = FitConfig(cache=fp32_store, rank=2, epochs=3, batch_size=8, dropout=0.1)
    grid = {"method": ["losa", "mlp"]}
    whole = sweep(base, grid, tmp_path / "whole")
    original = train_module.Trainer.end_epoch

    def crash_between(self, *args):
        original(self, *args)
        if self.epoch == 2 and self.cfg.method == "losa":
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module.Trainer, "end_epoch", crash_between)
    with pytest.raises(KeyboardInterrupt):
        sweep(base, grid, tmp_path / "resumed")
    monkeypatch.setattr(train_module.Trainer, "end_epoch", original)
    resumed = sweep(base, grid, tmp_path / "resumed")
    for a, b in zip(whole, resumed):
        assert [h["val_loss"] for h in a.history] == [h["val_loss"] for h in b.history]
        wa, wb = load_file(str(a.run / "adapter.safetensors")), load_file(str(b.run / "adapter.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(fp32_store, tmp_path, monkeypatch, run_cli):
    original = train_module.Trainer.train_batch

    def poisoned(self, tokens, labels):
        return original(self, tokens * float("nan") if self.epoch >= 2 else tokens, labels)

    monkeypatch.setattr(train_module.Trainer, "train_batch", poisoned)
    with pytest.raises(UserError, match="loss became nan at epoch 2"):
        fit(FitConfig(cache=fp32_store, rank=4, epochs=4, batch_size=8, out=tmp_path / "nan"))
    state = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert len((tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()) == 2
    # the best epoch kept is scored on test, as any run's
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["best_epoch"] == 1 and summary["test_acc"] == evaluate_run(tmp_path / "nan")["test"]
    # a grid refused for another folder's sake removes nothing from this one
    fit(FitConfig(cache=fp32_store, rank=4, epochs=1, batch_size=8, out=tmp_path / "other"))
    with pytest.raises(UserError, match="other holds a run with another configuration"):
        train_many([FitConfig(cache=fp32_store, rank=4, epochs=4, batch_size=8, out=tmp_path / "nan"),
                    FitConfig(cache=fp32_store, rank=2, epochs=4, batch_size=8, out=tmp_path / "other")])
    assert (tmp_path / "nan" / "adapter.safetensors").is_file() and (tmp_path / "nan" / "summary.json").is_file()
    # the same command, the cause gone: it continues from the last good epoch, and no summary
    # or adapter of the stopped attempt is left while it trains
    monkeypatch.setattr(train_module.Trainer, "train_batch", original)
    end_epoch = train_module.Trainer.end_epoch

    def look(self, *args):
        assert not (self.run / "summary.json").exists() and not (self.run / "adapter.safetensors").exists()
        end_epoch(self, *args)

    monkeypatch.setattr(train_module.Trainer, "end_epoch", look)
    again = fit(FitConfig(cache=fp32_store, rank=4, epochs=4, batch_size=8, out=tmp_path / "nan"))
    monkeypatch.setattr(train_module.Trainer, "end_epoch", end_epoch)
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert again.failed is None and summary["failed"] is None and len(summary["history"]) == 4
    # weights gone bad by an epoch's end show in the val loss first: that stops it too
    evaluate = train_module.Trainer.eval_batch
    monkeypatch.setattr(train_module.Trainer, "eval_batch", lambda self, x, labels: evaluate(
        self, x * float("nan") if self.epoch >= 1 else x, labels))
    with pytest.raises(UserError, match=r"val loss became nan at epoch 1; lower --lr .* says\). Kept the best "
                                        r"epoch before it \(epoch 0, val acc"):
        fit(FitConfig(cache=fp32_store, rank=4, epochs=4, batch_size=8, out=tmp_path / "val-nan"))
    # stopped in its first epoch: no model is kept, and eval says why rather than load none
    monkeypatch.setattr(train_module.Trainer, "eval_batch", evaluate)
    monkeypatch.setattr(train_module.Trainer, "train_batch", lambda self, x, labels: original(
        self, x * float("nan"), labels))
    with pytest.raises(UserError, match="No epoch finished before it: nothing is kept"):
        fit(FitConfig(cache=fp32_store, rank=4, epochs=4, batch_size=8, out=tmp_path / "nan0"))
    assert not (tmp_path / "nan0" / "adapter.safetensors").exists()
    with pytest.raises(UserError, match="stopped before its first epoch finished, so it holds no model: loss"):
        evaluate_run(tmp_path / "nan0")
    r = run_cli("sidetrain", "sweep", "--cache", str(fp32_store), "--method", "linear", "--lr", "1e-3,1e-2",
                "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "sweep"), "--json")
    assert r.returncode == 2 and "every configuration stopped early" in r.stderr  # (not exit 0)
    assert [row["val_acc"] for row in json.loads(r.stdout)] == [None, None]  # (not a -1 to average)
    with pytest.raises(UserError, match="differs in lr"):  # (its advice, "lower --lr", needs another --out)
        fit(FitConfig(cache=fp32_store, rank=4, epochs=4, batch_size=8, lr=1e-4, out=tmp_path / "nan0"))


def test_a_nan_loss_stops_training_within_check_every_steps(fp32_store, tmp_path, monkeypatch):
    """The loss is read every CHECK_EVERY steps (each read waits for a GPU): a NaN in the
    middle of an epoch stops that epoch there, and the checkpoint stays the last good one."""
    monkeypatch.setattr(train_module, "CHECK_EVERY", 2)
    original, steps = train_module.Trainer.train_batch, []

    def poisoned(self, tokens, labels):
        steps.append(self.step)
        return original(self, tokens * float("nan") if self.step >= 7 else tokens, labels)

    monkeypatch.setattr(train_module.Trainer, "train_batch", poisoned)
    with pytest.raises(UserError, match=r"loss became nan at epoch 1 \(by step 8\); lower --lr .* says\). Kept the best epoch before it \(epoch 0"):
        fit(FitConfig(cache=fp32_store, rank=4, epochs=4, batch_size=4, out=tmp_path / "nan"))
    assert steps[-1] == 7  # 6 steps an epoch: stopped after step 7's check, not at the epoch's end
    assert torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_eval_matches_training_and_refuses_foreign_stores(fp32_store, tmp_path, run_cli):
    r = fit(FitConfig(cache=fp32_store, rank=4, epochs=2, batch_size=8, out=tmp_path / "run"))
    accs = evaluate_run(r.run, fp32_store)
    assert accs["val"] == r.val_acc and accs["test"] == r.test_acc
    assert evaluate_run(r.run) == accs  # by default on the store it was trained on
    cli = run_cli("sidetrain", "eval", "--run", str(r.run))
    assert f"val: {100 * r.val_acc:.2f}% of 24 samples" in cli.stdout
    cli = run_cli("sidetrain", "eval", "--run", str(r.run), "--cache", str(fp32_store), "--json")
    assert json.loads(cli.stdout)["val"] == {"accuracy": r.val_acc, "samples": 24}
    other = tmp_path / "other"
    extract(ExtractConfig(dataset="demo", out=other, limit=8, **{**TINY, "seed": 7}))
    with pytest.raises(UserError, match="weights"):
        evaluate_run(r.run, other)
    views = tmp_path / "views"  # the same features, its train split augmented: scored, not refused
    extract(ExtractConfig(dataset="demo", out=views, limit=8, views=2, split=["train", "val"], **TINY))
    assert set(evaluate_run(r.run, views)) == {"train", "val"}
    few = tmp_path / "few"  # the same backbone, fewer taps, larger images: each difference named
    extract(ExtractConfig(dataset="demo", out=few, limit=8, taps="last:2", **{**TINY, "img_size": 48}))
    with pytest.raises(UserError) as refused:
        evaluate_run(r.run, few)
    assert all(why in str(refused.value) for why in (
        "taps: the run uses blocks [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]", "layout.grid: run has [2, 2], store has [3, 3]",
        "transform.input_size"))
    from sidetrain.run import _difference  # another store's classes: which, not a cut-short list
    names = ["circle", "ellipse", "hexagon", "octagon", "pentagon", "rectangle", "square", "triangle"]
    assert _difference("classes", names, names[:-1] + ["trangle"]) == \
        "classes: run has 8, store has 8; the first difference is at 7: run 'triangle', store 'trangle'"


def test_predict_on_raw_images_equals_the_cached_path(image_folder, tmp_path, run_cli):
    store_path = tmp_path / "store"
    extract(ExtractConfig(dataset=str(image_folder), out=store_path, dtype="fp32", **TINY))
    r = fit(FitConfig(cache=store_path, rank=2, epochs=3, batch_size=4, head_input="last4",
                      out=tmp_path / "run"))
    keys = open_store(store_path).split("val").keys
    assert_predict_equals_cached(r.run, store_path, [image_folder.parent / "images" / k for k in keys])
    with pytest.raises(UserError, match="randomly initialised .* leave out --weights"):  # not ignored
        predict(r.run, [image_folder / keys[0]], weights=tmp_path / "store" / "zarr.json")
    (tmp_path / "empty.png").write_bytes(b"")
    files = [str(tmp_path / "empty.png"), str(image_folder / keys[0])]
    bad, good = predict(r.run, files)  # the bad file does not cost the good one its answer
    assert "as an image (the run was trained on images)" in bad["error"]
    assert good["class"] in open_store(store_path).classes
    (one,) = predict(str(r.run), str(image_folder / keys[0]))  # one path, as a str
    assert one["class"] == good["class"]
    predictor = load_predictor(r.run)  # the same model on an image in memory
    with Image.open(image_folder / keys[0]) as img:
        probs = predictor(predictor.transform(img)[None])
        with pytest.raises(UserError, match=r"takes a batch of transformed images \(B, 3, 32, 32\), not "
                                            r"torch.Size\(\[3, 32, 32\]\)"):
            predictor(predictor.transform(img))
        for wrong in (torch.zeros(1, 3, 64, 64), torch.zeros(1, 1, 32, 32), torch.zeros(1, 3, 32, 32, dtype=torch.uint8)):
            with pytest.raises(UserError, match=r"takes a batch of transformed images \(B, 3, 32, 32\)"):
                predictor(wrong)  # another size, one channel, untransformed bytes
    assert predictor.classes[int(probs.argmax())] == good["class"] and not predictor.model.training
    assert float(probs.max()) == pytest.approx(good["prob"], abs=1e-6)
    with pytest.raises(UserError, match="no run at .*: the path does not exist"):
        load_predictor(tmp_path / "nope")
    with pytest.raises(UserError, match=r"holds runs \(a sweep's\?\): pass one of them, e.g. --run .*run"):
        predict(tmp_path, [image_folder / keys[0]])
    (folder,) = predict(r.run, [image_folder])
    assert "is a folder: pass the files in it" in folder["error"]
    cli = run_cli("sidetrain", "predict", "--run", str(r.run), "--top", "2", *files)
    assert cli.returncode == 1 and "empty.png" in cli.stderr and cli.stdout.startswith(files[1])
    path, first, p1, second, p2 = cli.stdout.strip().split("\t")  # the two likeliest, in order
    assert first == good["class"] and first != second and float(p1) >= float(p2)


def test_predict_finds_the_weights_file_by_its_name_and_hash(image_folder, tmp_path, monkeypatch, capsys):
    """A store extracted with --weights w.safetensors: predict takes ./w.safetensors when
    its hash is the recorded one, and asks for --weights otherwise."""
    import timm
    from safetensors.torch import save_file
    src = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32)
    (tmp_path / "lab").mkdir()
    weights = tmp_path / "lab" / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(weights))
    tiny = {k: v for k, v in TINY.items() if k != "random_init"}
    extract(ExtractConfig(dataset=str(image_folder), out=tmp_path / "store", weights=weights, **tiny))
    r = fit(FitConfig(cache=tmp_path / "store", rank=2, epochs=1, batch_size=4, out=tmp_path / "run"))
    image = next(image_folder.rglob("*.png"))
    with pytest.raises(UserError, match="came from the file w.safetensors: pass it with --weights"):
        predict(r.run, [image])  # (not in the current folder)
    monkeypatch.chdir(tmp_path / "lab")
    assert predict(r.run, [image]) == predict(r.run, [image], weights=weights)
    assert "backbone weights: ./w.safetensors" in capsys.readouterr().err
    save_file({k: v.contiguous() + 1 for k, v in src.state_dict().items()}, str(weights))  # another file
    with pytest.raises(UserError, match=r"\./w.safetensors is not the file .* pass that one with --weights"):
        predict(r.run, [image])
