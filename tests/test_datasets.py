"""Every dataset source on tiny generated files, subsets, views, overrides, prefix tokens."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from featcache import ExtractConfig, UserError, extract, load_backbone, open_dataset, open_store
from featcache.checks import no_train_note
from featcache.taps import forward_taps

from .conftest import TINY, make_image_folder


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    ds = open_dataset("fashion-mnist", data_root=tmp_path, val_fraction=0.25)
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 30, "val": 10, "test": 20}
    assert ds.classes[9] == "ankle boot" and ds.splits["test"].open(3).size == (28, 28)
    with pytest.raises(UserError, match="--download"):
        open_dataset("mnist", data_root=tmp_path / "empty")


def test_csv_manifest_with_splits_a_missing_file_and_a_bad_label(image_folder, tmp_path):
    files = sorted(p.relative_to(image_folder) for p in image_folder.rglob("*.png"))
    rows = ["path,label,split"] + [f"{p},{p.parent.name},{'val' if i % 3 == 0 else 'train'}"
                                   for i, p in enumerate(files)] + ["class0/gone.png,class0,train"]
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(rows) + "\n")
    r = extract(ExtractConfig(dataset=str(manifest), data_root=image_folder, out=tmp_path / "s", **TINY))
    assert r.skipped["train"].keys() == {"class0/gone.png"}
    assert r.written == {"train": 12, "val": 6}  # what was stored: not the input that was skipped
    store = open_store(tmp_path / "s")
    assert store.splits == ["train", "val"] and store.classes == ["class0", "class1", "class2"]
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nclass0/img00.png,\n")
    with pytest.raises(UserError, match="row 2"):
        open_dataset(str(bad))


def test_jsonl_manifest_without_splits_gets_a_stratified_split(image_folder):
    lines = [json.dumps({"path": str(p), "label": int(p.parent.name[-1])})
             for p in sorted(image_folder.rglob("*.png"))]
    manifest = image_folder / "m.jsonl"
    manifest.write_text("\n".join(lines))
    ds = open_dataset(str(manifest), val_fraction=0.34)
    assert np.bincount(ds.splits["val"].labels).tolist() == [2, 2, 2]
    assert ds.classes == ["0", "1", "2"]


def test_a_manifest_names_splits_on_every_row_or_none(tmp_path, capsys):
    """Splits come out train, val, test, then extra ones (int8 calibrates on the first);
    other tools' names are read as ours; a split column filled on some rows only is
    refused, not dropped."""
    def manifest(splits: list[str], name: str = "m.csv") -> str:
        (tmp_path / name).write_text("path,label,split\n" + "".join(
            f"img{i}.png,{i % 3},{s}\n" for i, s in enumerate(splits)))
        return str(tmp_path / name)

    ds = open_dataset(manifest(["test", "ood", "train", "train", "val", "test", "val", "train"], "M.CSV"))
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 3, "val": 2, "test": 2, "ood": 1}
    assert list(ds.splits) == ["train", "val", "test", "ood"]
    with pytest.raises(UserError, match="row 3: no split, while other rows name one"):
        open_dataset(manifest(["train", "", "test", "train"]))
    renamed = open_dataset(manifest(["Training", "validation", "TEST", "Training", "dev2"]))
    assert {k: len(v) for k, v in renamed.splits.items()} == {"train": 2, "val": 1, "test": 1, "dev2": 1}
    said = " ".join(capsys.readouterr().err.split())
    assert "split 'TEST' as 'test', 'Training' as 'train', 'validation' as 'val'" in said
    merged = open_dataset(manifest(["train", "val", "Validation", "test", "Train"]))
    assert {k: len(v) for k, v in merged.splits.items()} == {"train": 2, "val": 2, "test": 1}
    assert no_train_note(renamed) is None  # said at extraction, not first at fit
    assert list(open_dataset(manifest(["train", "valid", "test"]), split=["Validation"]).splits) == ["val"]
    assert "has no train split (it has val, test)" in no_train_note(open_dataset(manifest(["val", "test"])))
    # --limit draws what it drew before splits were put in this order (stores stay resumable)
    names = ["test", "ood", "train", "val"]
    drawn = open_dataset(manifest([names[i % 4] if i % 5 else "train" for i in range(40)]), limit=4)
    assert {k: s.keys for k, s in drawn.splits.items()} == {  # as version 3339fb5 drew them
        "train": ["img0.png", "img15.png", "img25.png", "img35.png"],
        "val": ["img3.png", "img7.png", "img23.png", "img27.png"],
        "test": ["img8.png", "img12.png", "img16.png", "img24.png"],
        "ood": ["img9.png", "img17.png", "img33.png", "img37.png"]}


def test_vtab1k_layout(tmp_path):
    task = tmp_path / "vtab-1k" / "dtd"
    make_image_folder(task / "images", classes=2, per_class=4)
    files = sorted(p.relative_to(task) for p in (task / "images").rglob("*.png"))
    for name, part in (("train800.txt", files[:4]), ("val200.txt", files[4:6]), ("test.txt", files[6:])):
        (task / name).write_text("".join(f"{p} {int(p.parent.name[-1])}\n" for p in part))
    ds = open_dataset("vtab1k:dtd", data_root=tmp_path / "vtab-1k")
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 4, "val": 2, "test": 2}
    assert ds.splits["train"].open(0).size == (40, 40)
    with pytest.raises(UserError, match="vtab1k:cifar"):
        open_dataset("vtab1k:cifar", data_root=tmp_path / "vtab-1k")


def test_named_torchvision_set_offline_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="--download"):
        open_dataset("cifar10", data_root=tmp_path)


def test_per_class_and_split_selection():
    ds = open_dataset("demo", per_class=3, split=["train", "test"])
    assert list(ds.splits) == ["train", "test"]
    assert np.bincount(ds.splits["train"].labels).tolist() == [3] * 10
    with pytest.raises(UserError, match="--split"):
        open_dataset("demo", split=["holdout"])


def test_views_are_stored_as_samples_sharing_a_key_and_are_reproducible(tmp_path):
    cfg = dict(dataset="demo", limit=6, views=3, split=["train", "val"], **TINY)
    extract(ExtractConfig(out=tmp_path / "a", **cfg))
    extract(ExtractConfig(out=tmp_path / "b", reuse=False, **cfg))  # not the twin of a
    a, b = open_store(tmp_path / "a").split("train"), open_store(tmp_path / "b").split("train")
    assert a.n == 18 and list(a.keys[:3]) == [a.keys[0]] * 3
    np.testing.assert_array_equal(a.tokens[:], b.tokens[:])  # same views on every run
    assert not np.array_equal(a.tokens[0], a.tokens[1])  # the views differ
    assert open_store(tmp_path / "a").split("val").n == 6  # val is not augmented
    assert open_store(tmp_path / "a").meta["transform"]["views"] == 3


def test_an_unreadable_image_costs_all_its_views_and_is_counted_once_per_view(tmp_path, run_cli):
    root = make_image_folder(tmp_path / "images", per_class=4)
    (root / "class0" / "broken.png").write_bytes(b"not a png")
    r = extract(ExtractConfig(dataset=root, out=tmp_path / "s", views=3, split=None,  # a Path
                              val_fraction=0.25, **TINY))
    train = open_store(tmp_path / "s").split("train")
    assert "class0/broken.png" in r.skipped["train"]  # it fell in train (seed 0)
    assert r.written["train"] == int((train.labels >= 0).sum()) == train.n - 3
    told = " ".join(run_cli("featcache", "info", str(tmp_path / "s")).stdout.split())
    assert f"{train.n} samples: {train.n - 3} stored, 3 skipped (the views of 1 unreadable input)" in told


def test_transform_overrides_are_applied_and_recorded():
    bb = load_backbone("vit_tiny", random_init=True, img_size=32,
                       transform={"crop_pct": 1.0, "mean": (0.1, 0.2, 0.3)})
    assert bb.data_config["crop_pct"] == 1.0 and bb.data_config["mean"] == (0.1, 0.2, 0.3)


def test_register_and_class_tokens_of_a_dinov2_reg_model(tmp_path):
    extract(ExtractConfig(model="vit_small_patch14_reg4_dinov2", random_init=True, img_size=28,
                          dataset="demo", limit=2, split=["val"], workers=0, dtype="fp32",
                          taps="last:2", out=tmp_path / "reg"))
    store = open_store(tmp_path / "reg")
    lay = store.layout
    assert (lay.prefix_tokens, lay.register_tokens, lay.class_token, lay.grid) == (5, 4, True, (2, 2))
    assert store.split("val").tokens.shape == (2, 2, 9, 384)
    bb = load_backbone("vit_small_patch14_reg4_dinov2", random_init=True, img_size=28)
    m = bb.model
    x = m.patch_embed(torch.zeros(1, 3, 28, 28))
    seq = m._pos_embed(x)  # [cls, reg x4, patches]: the order the store documents
    assert m.no_embed_class  # DINOv2: no position embedding on the prefix tokens
    torch.testing.assert_close(seq[0, 0], m.cls_token[0, 0])
    torch.testing.assert_close(seq[0, 1:5], m.reg_token[0])


WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights" / \
    "vit_small_patch14_dinov2.imgfocus.safetensors"


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="../shared/weights is not here")
def test_real_dinov2_features_beat_random_ones(tmp_path):
    """A linear probe on the real DINOv2-S features beats the same probe on random-init ones."""
    from sidetrain import FitConfig, fit
    accs = {}
    for name, extra in (("real", {"weights": WEIGHTS}), ("random", {"random_init": True})):
        extract(ExtractConfig(model="dinov2_small", img_size=56, dataset="demo", limit=150,
                              workers=0, taps="last:1", out=tmp_path / name, **extra))
    for name in ("real", "random"):
        accs[name] = fit(FitConfig(cache=tmp_path / name, method="linear", lr=1e-2, epochs=15,
                                   out=tmp_path / f"run-{name}")).test_acc
    assert accs["real"] > accs["random"] + 0.1, accs


@pytest.mark.parametrize("name,size,layout", [
    ("eva02_tiny_patch14_224.mim_in22k", 28, (1, True, "avg")),
    ("vit_base_patch16_siglip_224.webli", 32, (0, False, "avg")),  # attention pool: mean instead
    ("vit_base_patch16_clip_224.openai", 32, (1, True, "token")),
    ("deit_tiny_distilled_patch16_224.fb_in1k", 32, (2, True, "token")),  # class + distillation
])
def test_vit_families_extract_with_their_prefix_tokens(tmp_path, name, size, layout):
    r = extract(ExtractConfig(model=name, random_init=True, img_size=size, dataset="demo", limit=2,
                              split=["val"], workers=0, taps="last:1", out=tmp_path / "s"))
    lay = open_store(r.path).layout
    assert (lay.prefix_tokens, lay.class_token, lay.pool) == layout
    assert open_store(r.path).split("val").tokens.shape == (2, 1, layout[0] + 4, lay.width)
    if "siglip" in name:  # (its attention pool is no function of the tokens alone)
        return
    # the pool head input is the backbone's own pre-logits feature (distilled: cls and dist averaged)
    from sidetrain.readout import Readout
    bb = load_backbone(name, random_init=True, img_size=size)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        own = bb.model.forward_head(bb.model.forward_features(x), pre_logits=True)
        ours = Readout(bb.final_norms(), bb.layout(), "pool")(forward_taps(bb.model, x, [len(bb.blocks) - 1]))
    torch.testing.assert_close(ours, own, atol=1e-5, rtol=1e-5)


def test_a_store_inside_its_dataset_folder_is_no_class_of_it(image_folder):
    """`extract --dataset imgs --out imgs/feat` twice: the second run finds the same classes."""
    out = image_folder / "feat"
    extract(ExtractConfig(dataset=str(image_folder), out=out, **TINY))
    assert open_dataset(str(image_folder)).classes == ["class0", "class1", "class2"]
    again = extract(ExtractConfig(dataset=str(image_folder), out=out, **TINY))  # (not refused)
    assert again.status == "already complete"


def test_a_manifest_read_under_another_root_is_another_source(tmp_path):
    """The same manifest with another --data-root reads other files: no store may be reused."""
    (tmp_path / "labels.csv").write_text("path,label,split\n" + "".join(
        f"img{i}.png,{'ab'[i % 2]},{'train' if i < 4 else 'val'}\n" for i in range(6)))
    plain, one, two = (open_dataset(str(tmp_path / "labels.csv"), data_root=root)
                       for root in (None, tmp_path / "one", tmp_path / "two"))
    assert len({plain.source, one.source, two.source}) == 3 and str(tmp_path / "two") in two.source


def test_a_class_of_one_sample_named_like_another_is_pointed_out(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "images", classes=4, per_class=12, size=8)
    rows = [f"{p.relative_to(folder)},{p.parent.name}" for p in sorted(folder.rglob("*.png"))]

    def note(labels: list[str]) -> str:
        (folder / "labels.csv").write_text("path,label\n" + "\n".join(
            f"{r.split(',')[0]},{label}" for r, label in zip(rows, labels)) + "\n")
        extract(ExtractConfig(dataset=str(folder / "labels.csv"), dry_run=True, **TINY))
        return " ".join(capsys.readouterr().err.split())

    labels = [r.split(",")[1] for r in rows]
    assert "at most 2 samples" not in note(labels)
    typo = labels.copy()
    typo[1] = "clas0"  # a typo: named like a class 11 times its size
    assert "'clas0' (1 sample, e.g. class0/img01.png), close to 'class0'" in note(typo)
    odd = labels.copy()
    odd[1] = "zebra"  # like nothing, but alone among classes of about 12
    assert "'zebra' (1 sample, e.g. class0/img01.png). A mistyped label?" in note(odd)
    tail = [f"{i // 2}" for i in range(len(rows))]  # 24 classes of 2 named alike (a --limit): no note
    assert "at most 2 samples" not in note(tail)
    gap = [str(1 + int(label[-1])) for label in labels]  # integer labels from 1: class 0 is empty
    assert "at most 2 samples" not in note(gap)


def test_classes_without_a_sample_are_pointed_out(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "f", classes=2, per_class=4)
    (folder / "empty").mkdir()
    extract(ExtractConfig(dataset=str(folder), dry_run=True, **TINY))
    assert "1 of 3 classes have no sample: 'empty' (an empty class folder" in " ".join(capsys.readouterr().err.split())
    extract(ExtractConfig(dataset="demo", limit=2, dry_run=True, **TINY))  # a subset: by design
    assert "have no sample" not in capsys.readouterr().err


def test_options_without_effect_are_said_to_change_nothing(capsys, tmp_path):
    extract(ExtractConfig(dataset="demo", limit=2, frames=4, val_fraction=0.5, download=True,
                          dry_run=True, **TINY))
    err = " ".join(capsys.readouterr().err.split())
    assert "--frames is for videos; demo holds images: it changes nothing." in err
    assert "demo has its own val split: it changes nothing." in err
    assert "demo is read as it is: it changes nothing." in err
    folder = make_image_folder(tmp_path / "f", classes=2, per_class=4)  # no val: --val-fraction makes it
    extract(ExtractConfig(dataset=str(folder), val_fraction=0.5, dry_run=True, **TINY))
    assert "changes nothing" not in capsys.readouterr().err
