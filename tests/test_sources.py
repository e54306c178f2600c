"""Dataset readers: ImageFolder with and without split folders, the demo set, --limit."""

from __future__ import annotations

import numpy as np
import pytest

from featcache import UserError, open_dataset

from .conftest import make_image_folder


def test_flat_folder_gets_a_seeded_stratified_split(image_folder):
    a = open_dataset(str(image_folder), seed=0, val_fraction=0.34)
    b = open_dataset(str(image_folder), seed=0, val_fraction=0.34)
    c = open_dataset(str(image_folder), seed=5, val_fraction=0.34)
    assert list(a.splits) == ["train", "val"] and a.classes == ["class0", "class1", "class2"]
    assert np.bincount(a.splits["val"].labels).tolist() == [2, 2, 2]
    assert a.splits["val"].keys == b.splits["val"].keys != c.splits["val"].keys
    assert not set(a.splits["val"].keys) & set(a.splits["train"].keys)
    assert a.splits["train"].open(0).size == (40, 40)


def test_train_val_test_folders_are_used_as_given(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        make_image_folder(tmp_path / "d" / split, per_class=n)
    ds = open_dataset(str(tmp_path / "d"))
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 12, "val": 6, "test": 9}
    assert ds.splits["test"].keys[0] == "test/class0/img00.png"


def test_split_folders_by_other_names_are_splits_not_classes(tmp_path, capsys):
    for split, n in (("Train", 4), ("valid", 2), ("testing", 3), ("extra", 1)):
        make_image_folder(tmp_path / "d" / split, per_class=n)
    ds = open_dataset(str(tmp_path / "d"))
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 12, "val": 6, "test": 9}
    assert ds.classes == ["class0", "class1", "class2"] and ds.splits["val"].keys[0] == "valid/class0/img00.png"
    err = " ".join(capsys.readouterr().err.split())
    assert "split folder(s) Train/ as train, testing/ as test, valid/ as val." in err
    assert "extra/ beside the split folders is not a split" in err and "left out" in err
    make_image_folder(tmp_path / "d" / "val", per_class=1)
    with pytest.raises(UserError, match=r"2 folders for the val split \(val, valid\)"):
        open_dataset(str(tmp_path / "d"))
    make_image_folder(tmp_path / "t" / "test", per_class=2)  # an evaluation set: test alone
    assert list(open_dataset(str(tmp_path / "t")).splits) == ["test"]
    for name in ("dev", "test"):  # without a train folder, a class named like a split stays a class
        make_image_folder(tmp_path / name / name, classes=1, per_class=3)
        make_image_folder(tmp_path / name / "prod", classes=1, per_class=3)
        assert open_dataset(str(tmp_path / name)).classes == sorted([name, "prod"])


def test_limit_is_class_balanced_and_demo_is_real():
    ds = open_dataset("demo", limit=20)
    assert np.bincount(ds.splits["train"].labels).tolist() == [2] * 10
    img = np.asarray(ds.splits["train"].open(0))
    assert img.shape == (28, 28) and img.std() > 20  # a real photo of clothing, not a constant


@pytest.mark.parametrize("spec,why", [("/definitely/not/here", "is not 'demo', a folder"),
                                      ("demo2", "is not 'demo', a folder"),
                                      ("/no/meta/labels.CSV", "no manifest file /no/meta/labels.CSV "
                                                              r"\(no folder /no/meta either\)")])
def test_missing_dataset_is_a_clear_error(spec, why):
    with pytest.raises(UserError, match=f"dataset not found: .*{why}"):
        open_dataset(spec)


def test_folder_without_classes_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no class folders"):
        open_dataset(str(tmp_path))


def test_a_split_that_would_be_empty_is_refused(tmp_path):
    make_image_folder(tmp_path / "tiny", classes=2, per_class=1)  # nothing to hold out
    with pytest.raises(UserError, match="would be empty"):
        open_dataset(str(tmp_path / "tiny"))
