"""Backbones: names, local weights files, offline behaviour."""

from __future__ import annotations

import os

import pytest
import timm
import torch
from safetensors.torch import save_file

from featcache import ALIASES, UserError, load_backbone
from featcache import models
from featcache.taps import parse_taps


def test_every_alias_names_a_timm_pretrained_tag():
    known = set(timm.list_pretrained())
    assert [a for a, name in ALIASES.items() if name not in known] == []


def test_weights_file_is_loaded_and_resampled(tmp_path):
    src = timm.create_model("vit_tiny_patch16_224", num_classes=0)  # 224 px: 14x14 pos_embed
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    bb = load_backbone("vit_tiny", weights=path, img_size=32)  # 2x2 grid: resampled
    assert bb.model.pos_embed.shape == (1, 5, 192)
    assert torch.equal(bb.model.blocks[3].mlp.fc1.weight, src.blocks[3].mlp.fc1.weight)
    assert bb.weights["file_sha256"] == models.file_sha256(path)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    assert load_backbone("vit_tiny", weights=tmp_path / "w.pth", img_size=32).weights["sha256"] \
        == bb.weights["sha256"]


def test_weights_of_another_architecture_are_refused(tmp_path):
    small = timm.create_model("vit_small_patch16_224", num_classes=0)
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(path))
    with pytest.raises(UserError, match=r"small.safetensors does not fit VisionTransformer: \d+ of its "
                                        r"tensors have other shapes .*: \(384,\) in the file, \(192,\)") as e:
        load_backbone("vit_tiny", weights=path)
    assert "\n" not in str(e.value)  # (not torch's page per block)


def test_offline_without_cache_says_what_to_do(monkeypatch):
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(models, "_cached_pretrained_file", lambda name: None)
    with pytest.raises(UserError, match="--weights FILE .* --random-init"):
        load_backbone("vit_tiny")


@pytest.mark.parametrize("name, size, message", [
    ("vit_tiny", 30, "not a multiple of .* patch size 16: use 16 or 32"),  # not cropped to 16
    ("resnet18", 32, "not a ViT-family model")])
def test_a_size_off_the_patch_grid_or_a_cnn_is_refused(name, size, message):
    with pytest.raises(UserError, match=message):
        load_backbone(name, random_init=True, img_size=size)


def test_unknown_model_suggests_names():
    with pytest.raises(UserError, match="vit_tiny"):
        load_backbone("vit_tinny")


@pytest.mark.parametrize("spec,taps", [("all", list(range(12))), ("", list(range(12))), ("every:4", [3, 7, 11]),
                                       ("last:2", [10, 11]), ("0,5,-1", [0, 5, 11])])
def test_taps_specs(spec, taps):
    assert parse_taps(spec, 12) == taps


@pytest.mark.parametrize("spec", ["12", "-13", "every:0", "last:x", "last:13", "a,b"])
def test_bad_taps_are_refused(spec):
    with pytest.raises(UserError, match="--taps"):
        parse_taps(spec, 12)


def test_a_crowded_cpu_is_pointed_out_once_unless_the_threads_are_set(monkeypatch, capsys):
    from featcache import precision
    load = [2.5]  # others fill both cores (a fit beside them took 50-75x as long: README "Threads")
    monkeypatch.setattr(os, "getloadavg", lambda: (load[0],) * 3)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS")
    precision.crowded_cpu_note.cache_clear()
    assert precision.pick_device("cpu") == precision.pick_device("cpu") == "cpu"
    assert " ".join(capsys.readouterr().err.split()).count("load average here is 2.5 on 2 cores") == 1
    precision.crowded_cpu_note.cache_clear()
    load[0] = 1.5  # a core left free
    precision.pick_device("cpu")
    assert "load average" not in capsys.readouterr().err
    precision.crowded_cpu_note.cache_clear()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    precision.pick_device("cpu")
    assert "load average" not in capsys.readouterr().err
    precision.crowded_cpu_note.cache_clear()
