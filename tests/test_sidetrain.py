"""LoSA and the loader: starts at the probe, matches end-to-end training, reads every sample."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import timm.data
import torch
import zarr
from safetensors.torch import load_file

from featcache import UserError, load_backbone, open_dataset, open_store
from sidetrain import (EndToEnd, FitConfig, ModelSpec, ShardLoader, build_classifier, evaluate_run, fit,
                       train_many)
from sidetrain import loader as loader_module
from sidetrain import train as train_module


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, z: torch.Tensor, y: torch.Tensor) -> None:
    loss = torch.nn.functional.cross_entropy(model(z), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def test_losa_starts_exactly_at_the_linear_probe(fp32_store):
    store = open_store(fp32_store)
    z = torch.from_numpy(store.split("val").tokens[:8])
    losa = build_classifier(ModelSpec("losa", rank=4), store, seed=3)
    linear = build_classifier(ModelSpec("linear"), store, seed=3)
    torch.testing.assert_close(losa(z), linear(z), rtol=0, atol=0)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(losa) == count(linear) + count(losa.side) and count(losa.side) > 0  # the same head


def test_cache_training_equals_end_to_end_training(fp32_store):
    """Same seed, same batches: LoSA from the fp32 cache == LoSA with the backbone run live."""
    store = open_store(fp32_store)
    bb = load_backbone("vit_tiny", random_init=True, img_size=32)
    tf = timm.data.create_transform(**bb.data_config, is_training=False)
    images = open_dataset("demo", limit=24).splits["train"]
    cached = build_classifier(ModelSpec("losa", rank=4), store, seed=0)
    live = EndToEnd(bb.model, store.taps, build_classifier(ModelSpec("losa", rank=4), store, seed=0))
    opt_c = torch.optim.AdamW(cached.parameters(), lr=1e-3)
    opt_l = torch.optim.AdamW(live.classifier.parameters(), lr=1e-3)
    loader = ShardLoader(store, "train", batch_size=8, shuffle=True, seed=0)
    for epoch in range(2):
        for b in loader.epoch(epoch):
            x = torch.stack([tf(images.open(int(i)).convert("RGB")) for i in b.index])
            train_step(cached, opt_c, b.tokens, b.labels)
            train_step(live, opt_l, x, b.labels)
    assert any(p.abs().sum() > 0 for n, p in cached.named_parameters() if n.endswith("up.weight"))
    for (name, a), b in zip(cached.state_dict().items(), live.classifier.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=name)


@pytest.fixture(params=[1, 2], ids=["stripe1", "stripe2"])
def stripe(request, monkeypatch, fp32_store):
    """Stripes of 1 or 2 samples (5-sample shards: a short last stripe in each shard)."""
    split = open_store(fp32_store).split("train")
    monkeypatch.setattr(loader_module, "READ_BYTES", request.param * (split.tokens.nbytes // split.n))
    monkeypatch.setattr(loader_module, "MIN_STRIPES", 1)
    return request.param


def test_loader_visits_every_sample_once_in_a_seeded_order(fp32_store, stripe):
    store = open_store(fp32_store)
    split = store.split("train")
    tiny_buffer = split.tokens.nbytes // split.n * 5  # 5 samples: many buffer fills
    in_order = ShardLoader(store, "train", batch_size=4, shuffle=False, buffer_bytes=tiny_buffer)
    assert np.concatenate([b.index for b in in_order.epoch(0)]).tolist() == list(range(split.n))
    orders = {}
    for seed in (0, 0, 1):
        loader = ShardLoader(store, "train", batch_size=4, shuffle=True, seed=seed,
                             buffer_bytes=tiny_buffer)
        assert loader.stripe == stripe and not loader.fits
        seen = []
        for b in loader.epoch(0):
            np.testing.assert_array_equal(b.tokens.numpy(), split.tokens[:][b.index])
            np.testing.assert_array_equal(b.labels.numpy(), split.labels[b.index])
            seen.extend(b.index.tolist())
        assert sorted(seen) == list(range(split.n))
        orders.setdefault(seed, []).append(seen)
    assert orders[0][0] == orders[0][1] != orders[1][0]
    # `for batch in loader` runs epoch 0, then 1, ...: each epoch's own order, as epoch(e) gives
    by_iter = [np.concatenate([b.index for b in loader]) for _ in range(2)]
    assert [o.tolist() for o in by_iter] == [np.concatenate([b.index for b in loader.epoch(e)]).tolist()
                                             for e in (0, 1)]
    assert by_iter[0].tolist() != by_iter[1].tolist()


def test_rank_beyond_the_dimensions_is_refused(fp32_store):
    with pytest.raises(UserError, match="--rank"):
        build_classifier(ModelSpec("losa", rank=6), open_store(fp32_store), seed=0)  # 5 tokens


def test_fit_writes_a_complete_run(fp32_store, tmp_path):
    r = fit(FitConfig(cache=fp32_store, method="losa", rank=4, epochs=2, batch_size=8, out=tmp_path / "run"))
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.json", "metrics.jsonl", "adapter.safetensors", "summary.json", "curves.png",
            "checkpoint.pt"} <= files
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]
    adapter = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    assert sum(v.numel() for v in adapter.values()) == r.params  # trainable weights only
    assert not any(k.startswith("readout") for k in adapter)
    assert r.val_acc == max(h["val_acc"] for h in r.history) and r.test_acc is not None
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [summary[k] for k in ("val_acc", "test_acc", "best_epoch")] == [r.val_acc, r.test_acc, r.best_epoch]
    # the variant recorded is the one trained, not "auto" (whose meaning may change)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["variant"] == summary["config"]["variant"] == r.config.variant == "B"
    config["variant"] = "auto"  # a run from before: continued, not refused as another configuration
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    written = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "run").iterdir() if f.name != "config.json"}
    again = fit(FitConfig(cache=fp32_store, method="losa", rank=4, epochs=2, batch_size=8, out=tmp_path / "run"))
    assert (again.val_acc, again.test_acc) == (r.val_acc, r.test_acc)
    # scored again, not written again (a colleague's finished run may be read-only)
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "run").iterdir() if f.name != "config.json"} == written
    stale = json.loads((tmp_path / "run" / "summary.json").read_text())  # scores changed since (a test
    (tmp_path / "run" / "summary.json").write_text(json.dumps({**stale, "test_acc": None}))  # split completed)
    fit(FitConfig(cache=fp32_store, method="losa", rank=4, epochs=2, batch_size=8, out=tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["test_acc"] == r.test_acc
    written["summary.json"] = (tmp_path / "run" / "summary.json").stat().st_mtime_ns  # (its adapter not)
    (tmp_path / "run" / "checkpoint.pt").unlink()  # deleted once final, as the README allows: still finished
    del written["checkpoint.pt"]
    again = fit(FitConfig(cache=fp32_store, method="losa", rank=4, epochs=2, batch_size=8, out=tmp_path / "run"))
    assert (again.val_acc, again.test_acc, again.best_epoch) == (r.val_acc, r.test_acc, r.best_epoch)
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "run").iterdir() if f.name != "config.json"} == written


def test_a_probe_records_and_compares_only_the_options_it_has(fp32_store, tmp_path, capsys):
    r = fit(FitConfig(cache=fp32_store, method="linear", rank=3, variant="C", epochs=1, batch_size=8,
                      out=tmp_path / "probe"))
    assert "linear has no use for --rank, --variant: left out of its run." in " ".join(capsys.readouterr().err.split())
    config = json.loads((tmp_path / "probe" / "config.json").read_text())
    assert (config["rank"], config["variant"], r.rank) == (16, "auto", None)
    config["rank"] = 3  # as runs recorded it before: continued, not refused as another configuration
    (tmp_path / "probe" / "config.json").write_text(json.dumps(config))
    again = fit(FitConfig(cache=fp32_store, method="linear", epochs=1, batch_size=8, out=tmp_path / "probe"))
    assert again.val_acc == r.val_acc


def test_the_best_val_epoch_is_kept_not_the_last(fp32_store, tmp_path, monkeypatch):
    """Val (loss, accuracy) of (1.0, 50 %), (0.8, 90 %), (0.6, 90 %), (0.3, 70 %): epoch 2 is
    kept (a tie in accuracy goes to the lower loss; a lower loss alone does not win), its
    weights are the adapter, and the test split is scored with them."""
    scripted, states = [(1.0, 0.5), (0.8, 0.9), (0.6, 0.9), (0.3, 0.7)], []
    take_eval, end_epoch = train_module.Trainer.take_eval, train_module.Trainer.end_epoch

    def scripted_eval(self):
        real = take_eval(self)  # (which also resets the sums)
        return scripted[self.epoch] if self.epoch < len(scripted) else real

    def recording_end(self, *args):
        end_epoch(self, *args)
        states.append({k: v.clone() for k, v in self.model.state_dict().items()})

    monkeypatch.setattr(train_module.Trainer, "take_eval", scripted_eval)
    monkeypatch.setattr(train_module.Trainer, "end_epoch", recording_end)
    r = fit(FitConfig(cache=fp32_store, rank=2, epochs=4, batch_size=8, out=tmp_path / "run"))
    assert (r.best_epoch, r.val_acc, r.val_loss) == (2, 0.9, 0.6)  # (a sweep's table ranks by both)
    assert [(h["val_loss"], h["val_acc"]) for h in r.history] == scripted
    adapter = load_file(str(r.run / "adapter.safetensors"))
    assert all(torch.equal(adapter[k], states[2][k]) for k in adapter)
    assert not all(torch.equal(adapter[k], states[3][k]) for k in adapter)
    monkeypatch.undo()
    assert evaluate_run(r.run, fp32_store)["test"] == r.test_acc  # scored with epoch 2's weights


def test_a_run_is_not_continued_on_a_store_extracted_again(tmp_path, monkeypatch):
    import shutil

    from featcache import ExtractConfig, extract
    from featcache.store import ATTR

    from .conftest import TINY
    make = ExtractConfig(dataset="demo", out=tmp_path / "s", limit=8, **TINY)
    store = extract(make).path
    monkeypatch.chdir(tmp_path)  # a relative --cache: recorded absolute, found from anywhere
    cfg = FitConfig(cache="s", method="linear", epochs=1, batch_size=8, out=tmp_path / "run")
    fit(cfg)
    monkeypatch.chdir(tmp_path / "run")
    assert set(evaluate_run(cfg.out)) == {"train", "val", "test"}
    monkeypatch.chdir(tmp_path)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    shutil.rmtree(store)
    extract(make)  # the same settings, extracted again
    with pytest.raises(UserError, match="was trained on an earlier extraction of .*extracted again since"):
        fit(cfg)
    with pytest.raises(UserError, match="is not the extraction .* was trained on"):
        evaluate_run(cfg.out)  # by default on the run's store, which is another one now
    assert set(evaluate_run(cfg.out, store)) == {"train", "val", "test"}  # named: scored
    with pytest.raises(UserError, match="differs in cache"):  # another store: not called the same one
        fit(FitConfig(**{**vars(cfg), "cache": extract(ExtractConfig(**{**vars(make), "out": tmp_path / "t",
                                                                         "reuse": False})).path}))
    del saved["store"]["id"]  # a run from before stores had an id: continued, and given one
    saved["cache"] = "s"  # (and from before caches were recorded absolute, as typed)
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    assert fit(cfg).best_epoch == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["store"]["id"] == \
        zarr.open_group(str(store), mode="r").attrs[ATTR]["id"]


def test_training_on_a_subset_of_the_taps(fp32_store, tmp_path):
    r = fit(FitConfig(cache=fp32_store, rank=4, epochs=1, taps="last:3", out=tmp_path / "sub"))
    full = build_classifier(ModelSpec("losa", rank=4), open_store(fp32_store), seed=0)
    sub = build_classifier(ModelSpec("losa", rank=4), open_store(fp32_store), seed=0, layers=3)
    assert len(full.side.mixers) == 12
    # three mixers, and a last4 head that finds three taps to read
    assert r.params == 3 * sum(p.numel() for p in full.side.mixers[0].parameters()) + \
        sum(p.numel() for p in sub.head.parameters())
    config = json.loads((tmp_path / "sub" / "config.json").read_text())
    assert config["blocks"] == [9, 10, 11]
    with pytest.raises(UserError, match="--taps"):
        fit(FitConfig(cache=fp32_store, taps="12", out=tmp_path / "bad"))
    with pytest.raises(UserError, match="more taps than .* holds: 12"):  # not quietly all 12
        fit(FitConfig(cache=fp32_store, taps="last:13", out=tmp_path / "bad"))


@pytest.mark.parametrize("dtype", ["fp32", "int8", "fp16", "bf16"])
def test_memmap_and_zarr_readers_give_identical_batches(fp32_store, tmp_path, dtype, stripe):
    from featcache import ExtractConfig, extract
    from featcache.fastread import MemmapReader
    from .conftest import TINY
    path = fp32_store
    if dtype != "fp32":
        path = tmp_path / dtype
        extract(ExtractConfig(dataset="demo", out=path, dtype=dtype, limit=24, shard_size=5, **TINY))
    store = open_store(path)
    small = store.split("train").tokens.nbytes // 24 * 6  # forces the buffered, prefetching path
    loaders = {mode: ShardLoader(store, "train", batch_size=4, shuffle=True, seed=2, reader=mode,
                                 buffer_bytes=small) for mode in ("memmap", "zarr")}
    assert isinstance(loaders["memmap"].readers[0], MemmapReader)
    assert loaders["memmap"].stripe == stripe or dtype != "fp32"  # int8 samples are smaller
    batches = [list(loader.epoch(1)) for loader in loaders.values()]
    assert len(batches[0]) == len(batches[1])
    for a, b in zip(*batches):
        assert np.array_equal(a.index, b.index)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)
    # recycled buffers (what training uses; fp16 and bf16 copied there sample by sample)
    # give the same batches, in two buffers used in turn, for every layer, runs of layers
    # (views) and picks, streamed or resident; and so does the split preloaded (--preload)
    for layers in (None, [0, 1, 2], [-1], [0, 2], [2, 0]):
        for buffer in (small, None):
            kept = dict(buffer_bytes=buffer) if buffer else {}
            plain = ShardLoader(store, "train", batch_size=4, shuffle=True, seed=2, reader="zarr", **kept)
            recycled = ShardLoader(store, "train", batch_size=4, shuffle=True, seed=2, recycle=True,
                                   layers=layers, **kept)
            preloaded = ShardLoader(store, "train", batch_size=4, shuffle=True, seed=2, layers=layers,
                                    preload=True, **kept)
            assert recycled.direct == (dtype in ("fp16", "bf16")) and recycled.fits == (buffer is None)
            pointers = set()
            for epoch in (1, 2):  # (a preloaded split is read once, at its first epoch)
                for a, b, c in zip(plain.epoch(epoch), recycled.epoch(epoch), preloaded.epoch(epoch),
                                   strict=True):
                    assert torch.equal(a.tokens[:, layers or slice(None)], b.tokens), (layers, buffer)
                    assert torch.equal(b.tokens, c.tokens) and torch.equal(a.labels, c.labels)
                    assert np.array_equal(a.index, c.index)
                    pointers.add(b.tokens.data_ptr())
            if dtype != "fp32":  # (fp32 batches are the gathered arrays themselves)
                assert len(pointers) == 2


def test_preloading_changes_where_batches_come_from_not_the_run(fp32_store, tmp_path, monkeypatch, capsys):
    """--preload trains on the same batches, held in the device's memory: the same run,
    recorded alike, so a run begun without it goes on with it."""
    cfg = FitConfig(cache=fp32_store, rank=2, epochs=3, batch_size=4)
    plain = fit(replace(cfg, out=tmp_path / "plain"))
    held = fit(replace(cfg, out=tmp_path / "held", preload=True))
    assert "--preload is for GPUs" in capsys.readouterr().err
    assert [h["val_loss"] for h in held.history] == [h["val_loss"] for h in plain.history]
    assert (held.val_acc, held.test_acc) == (plain.val_acc, plain.test_acc)
    config = json.loads((tmp_path / "held" / "config.json").read_text())
    assert "preload" not in config and config == json.loads((tmp_path / "plain" / "config.json").read_text()) | {
        "out": config["out"]}
    assert "preload" not in json.loads((tmp_path / "held" / "summary.json").read_text())["config"]
    # splits that do not fit together are refused before the first epoch, and before the
    # run's folder is made
    room = ShardLoader(open_store(fp32_store), "train", 4).preload_bytes * 2  # train alone would fit
    monkeypatch.setattr(loader_module, "_free_bytes", lambda device: room)
    with pytest.raises(UserError, match=r"the train and val splits take .*, more than 80% of the .* "
                                        r"free on cpu .* Train without preloading"):
        fit(replace(cfg, out=tmp_path / "tight", preload=True))
    assert not (tmp_path / "tight").exists()
    # a finished run is scored again, from the host: nothing to preload for
    again = fit(replace(cfg, out=tmp_path / "plain", preload=True))
    assert again.test_acc == plain.test_acc


def test_a_compiled_step_trains_the_run_an_uncompiled_one_does(fp32_store, tmp_path, monkeypatch, capsys):
    """--compile runs full batches through torch.compile (the last, partial one uncompiled):
    the same run up to float rounding, recorded alike, and the wait said beforehand. A
    compiler that fails is said as such; where it would do nothing, that is said."""
    cfg = FitConfig(cache=fp32_store, rank=2, epochs=2, batch_size=5)  # 24 samples: 5 batches
    plain = fit(replace(cfg, out=tmp_path / "plain"))
    calls = []
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m: calls.append(m) or compile_(m))
    fast = fit(replace(cfg, out=tmp_path / "fast", compile=True))
    assert len(calls) == 1
    assert "each LoSA configuration compiles its step at its first batch (1 here" in \
        " ".join(capsys.readouterr().err.split())
    np.testing.assert_allclose([h["val_loss"] for h in fast.history],
                               [h["val_loss"] for h in plain.history], rtol=1e-5)
    config = json.loads((tmp_path / "fast" / "config.json").read_text())
    assert config == json.loads((tmp_path / "plain" / "config.json").read_text()) | {"out": config["out"]}

    def fails(error):
        def run(x):
            raise error
        return lambda model: run
    monkeypatch.setattr(torch, "compile", fails(torch._dynamo.exc.TorchDynamoException(
        "CppCompileError: no C++ compiler\n(the rest of its log)")))
    with pytest.raises(UserError, match=r"torch.compile failed on this machine \(TorchDynamoException: "
                                        r"CppCompileError: no C\+\+ compiler\)\. Train without --compile"):
        fit(replace(cfg, out=tmp_path / "broken", compile=True))
    monkeypatch.setattr(torch, "compile", fails(torch.OutOfMemoryError("out of memory")))
    with pytest.raises(torch.OutOfMemoryError):  # not said to be the compiler's
        fit(replace(cfg, out=tmp_path / "full", compile=True))
    capsys.readouterr()
    fit(replace(cfg, out=tmp_path / "one-batch", compile=True, batch_size=64))  # (runs: no full batch)
    fit(replace(cfg, out=tmp_path / "probe", compile=True, method="linear"))
    err = " ".join(capsys.readouterr().err.split())
    assert "the train split's 24 samples make no full batch of 64" in err
    assert "--compile applies to LoSA's step: a probe's head has nothing to fuse" in err


def test_batches_made_ahead_come_in_order_and_stop_with_their_consumer():
    """For a GPU the loader makes the next batch in a thread while this one trains."""
    made = []

    def items():
        try:
            for i in range(5):
                made.append(i)
                yield i
        finally:
            made.append("closed")

    ahead = loader_module._ahead(items())
    assert [next(ahead), next(ahead)] == [0, 1]
    ahead.close()  # the batch in the making is finished, then the source closed
    assert made == [0, 1, 2, "closed"]
    assert list(loader_module._ahead(items())) == [0, 1, 2, 3, 4]

    def broken():
        yield 0
        raise UserError("a shard went missing")

    with pytest.raises(UserError, match="went missing"):
        list(loader_module._ahead(broken()))


def test_loader_memory_is_bounded_by_its_buffer(fp32_store, monkeypatch):
    """A store larger than the buffer is read one buffer fill at a time, never whole."""
    store = open_store(fp32_store)
    split = store.split("train")
    buffer = split.tokens.nbytes // split.n * 10  # 10 of 24 samples
    loader = ShardLoader(store, "train", batch_size=4, shuffle=True, buffer_bytes=buffer)
    fills = []
    original = loader._read
    monkeypatch.setattr(loader, "_read", lambda group: fills.append(len(group)) or original(group))
    seen = sum(len(b.index) for b in loader.epoch(0))
    assert seen == 24 and max(fills) == loader.buffer_stripes == 10 and len(fills) == 3
    assert loader._resident is None  # nothing kept across epochs


def test_a_buffer_fill_draws_from_across_the_split(fp32_store):
    """Stores keep their dataset's order (often class by class): a fill of a few whole shards
    would hold a few classes. Stripes spread each fill over more shards than it could hold."""
    store = open_store(fp32_store)
    split = store.split("train")
    loader = ShardLoader(store, "train", batch_size=4, shuffle=True, buffer_bytes=split.tokens.nbytes // split.n * 10)
    _, batches, _ = next(loader.plan(0))
    drawn = np.concatenate(batches)
    assert len(np.unique(drawn // split.shard_size)) > 10 // split.shard_size


def test_a_run_is_not_written_among_other_files(fp32_store, tmp_path):
    """--out naming a folder of other files, or the store itself, is refused untouched."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    before = sorted(p.name for p in fp32_store.iterdir())
    for out, what in ((tmp_path / "notes", "not a run folder"), (fp32_store, "a featcache store")):
        with pytest.raises(UserError, match=f"exists, is not empty and is {what}.*another --out"):
            fit(FitConfig(cache=fp32_store, rank=2, epochs=1, out=out))
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in fp32_store.iterdir()) == before


def test_a_sweep_with_a_bad_configuration_leaves_no_run_folder(fp32_store, tmp_path):
    good, bad = (FitConfig(cache=fp32_store, rank=r, epochs=1, out=tmp_path / f"r{r}") for r in (4, 99))
    with pytest.raises(UserError, match="--rank 99"):
        train_many([good, bad])
    twins = [FitConfig(cache=fp32_store, method="linear", epochs=1, lr=lr) for lr in (1e-3, 1e-2)]
    with pytest.raises(UserError, match="several configurations would write the run folder"):
        train_many(twins)  # the default folder does not name the lr: one would overwrite the other
    with pytest.raises(UserError, match="must share epochs"):
        train_many([good, FitConfig(**{**vars(good), "epochs": 2, "out": tmp_path / "e2"})])
    assert not any(tmp_path.iterdir())


def test_training_reads_values_back_per_epoch_not_per_step(fp32_store, tmp_path, monkeypatch):
    """Reading a tensor's value waits for the GPU: twice the steps, the same number of reads."""
    reads = []
    item = torch.Tensor.item

    def counted(self):
        reads.append(1)
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", counted)
    counts = []
    for batch in (8, 4):  # 3, then 6 steps an epoch
        reads.clear()
        fit(FitConfig(cache=fp32_store, rank=2, epochs=2, batch_size=batch, out=tmp_path / f"b{batch}"))
        counts.append(len(reads))
    assert counts[0] == counts[1] > 0


def test_a_class_without_training_samples_and_options_without_effect_are_pointed_out(fp32_store, tmp_path, capsys):
    import shutil
    import zarr
    store = tmp_path / "store"
    shutil.copytree(fp32_store, store)
    labels = zarr.open_array(str(store / "train" / "labels"), mode="r+")
    labels[:] = np.where(labels[:] == 0, 1, labels[:])  # class 0 only in val and test
    fit(FitConfig(cache=store, rank=2, temporal=False, epochs=1, batch_size=8, precision="bf16", out=tmp_path / "run"))
    note = " ".join(capsys.readouterr().err.split())
    assert f"1 class(es) have no training sample, so the head cannot learn them: {open_store(store).classes[0]}." in note
    assert "--precision bf16 applies on CUDA; on cpu training runs in fp32" in note
    assert "--no-temporal applies to video stores; " in note  # (an image store)


def test_loader_layers_are_positions_among_the_taps(fp32_store):
    store = open_store(fp32_store)
    (batch,) = ShardLoader(store, "val", batch_size=24, shuffle=False, layers=[0, 11]).epoch(0)
    np.testing.assert_array_equal(batch.tokens.numpy(), store.split("val").tokens[:][:, [0, 11]])
    with pytest.raises(UserError, match=r"layers=\[12\]: positions among the store's 12 taps"):
        ShardLoader(store, "val", batch_size=24, shuffle=False, layers=[12])


@pytest.mark.parametrize("bad, why", [
    ({"grad_clip": -1.0}, "--grad-clip must be a number of at least 0"),  # (it turned steps uphill)
    ({"method": "mlp", "mlp_hidden": 0}, "--mlp-hidden must be a whole number of at least 1"),
    ({"warmup": 2.0}, "--warmup must be a share of the steps"),
    ({"dropout": 2.0}, "--dropout must be at least 0 and below 1"),
    ({"label_smoothing": 3}, "--label-smoothing must be at least 0 and below 1"),
    ({"epochs": 1.5}, "--epochs must be a whole number"),
    ({"lr": "1e-3"}, "--lr must be a positive number, not '1e-3'"),
    ({"lr": float("inf")}, "--lr must be a positive number, not inf"),
    ({"rank": "4"}, "--rank must be a whole number of at least 1, not '4'"),
    ({"device": "gpu"}, "--device must be auto, cpu, cuda or cuda:N"),
])
def test_values_no_training_can_use_are_refused_before_any_folder(fp32_store, tmp_path, bad, why):
    with pytest.raises(UserError, match=why):
        fit(FitConfig(**{"cache": fp32_store, "epochs": 1, "batch_size": 8, "out": tmp_path / "run", **bad}))
    assert not (tmp_path / "run").exists()


def test_auto_picks_a_gpu_where_torch_sees_one_and_records_the_device_it_ran_on(fp32_store, tmp_path,
                                                                                monkeypatch):
    from featcache.precision import pick_device

    monkeypatch.delenv("FEATCACHE_DEVICE")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == "cuda" and pick_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == "cpu"
    monkeypatch.setenv("FEATCACHE_DEVICE", "gpu")
    with pytest.raises(UserError, match="not 'gpu' \\(from FEATCACHE_DEVICE\\)"):
        pick_device("auto")
    monkeypatch.setenv("FEATCACHE_DEVICE", "auto")  # (as if unset)
    assert pick_device("auto") == "cpu"
    cfg = FitConfig(cache=fp32_store, rank=2, epochs=1, batch_size=8, out=tmp_path / "run")
    r = fit(cfg)
    saved = tmp_path / "run" / "config.json"
    assert r.config.device == "cpu" == json.loads(saved.read_text())["device"]
    # a run continues only on the device it began on, and is told which
    saved.write_text(saved.read_text().replace('"device": "cpu"', '"device": "cuda"'))
    with pytest.raises(UserError, match=r"differs in device \(cuda there, cpu here\)\); it was trained on cuda: --device cuda continues it\. Use another --out or"):
        fit(cfg)


def test_numpy_numbers_and_a_path_are_taken_as_python_would(fp32_store, tmp_path):
    """Grids made with np.arange, and a store given by its folder to the loader."""
    r = fit(FitConfig(cache=fp32_store, rank=np.int64(2), epochs=1, batch_size=8, out=tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["rank"] == 2
    loader = ShardLoader(str(fp32_store), "train", batch_size=8, shuffle=False, layers=(0, -1))
    assert next(iter(loader.epoch(0))).tokens.shape[1] == 2 and r.config.rank == 2
