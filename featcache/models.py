"""Frozen ViT backbones: name resolution, weights, transforms and the token layout.

Everything stage one needs to know about a timm model lives here, so that sources, the
store and the extractor stay model-agnostic.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import socket
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from .errors import UserError
from .layout import TokenLayout

# Short names researchers type, mapped to a timm name with its pretrained tag.
ALIASES: dict[str, str] = {
    "vit_tiny": "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
    "vit_small": "vit_small_patch16_224.augreg_in21k_ft_in1k",
    "vit_base": "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "vit_large": "vit_large_patch16_224.augreg_in21k_ft_in1k",
    "deit_tiny": "deit_tiny_patch16_224.fb_in1k",
    "deit_small": "deit_small_patch16_224.fb_in1k",
    "deit_base": "deit_base_patch16_224.fb_in1k",
    "dinov2_small": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_base": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_large": "vit_large_patch14_dinov2.lvd142m",
    "dinov2_giant": "vit_giant_patch14_dinov2.lvd142m",
    "dinov2_small_reg": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov2_base_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov2_large_reg": "vit_large_patch14_reg4_dinov2.lvd142m",
    "dinov2_giant_reg": "vit_giant_patch14_reg4_dinov2.lvd142m",
    "clip_base": "vit_base_patch16_clip_224.openai",
    "siglip_base": "vit_base_patch16_siglip_224.webli",
}

HF_HOST = "huggingface.co"


@dataclass
class Backbone:
    """A frozen timm ViT plus the provenance a store must record about it."""

    model: nn.Module
    name: str  # timm name with pretrained tag
    weights: dict  # {"source": ..., "sha256": ..., ["file_sha256": ...]}
    data_config: dict  # timm's resolve_data_config output (input size, mean, std, ...)

    @property
    def blocks(self) -> nn.Sequential:
        return self.model.blocks

    def layout(self) -> TokenLayout:
        m = self.model
        pool = m.global_pool if m.global_pool in ("token", "avg") else "avg"
        if pool == "token" and getattr(m, "cls_token", None) is None:
            pool = "avg"
        return TokenLayout(
            prefix_tokens=int(m.num_prefix_tokens),
            class_token=getattr(m, "cls_token", None) is not None,
            register_tokens=int(getattr(m, "num_reg_tokens", 0)),
            grid=tuple(int(g) for g in m.patch_embed.grid_size),
            frames=1,
            width=int(m.embed_dim),
            pool=pool,
        )

    def final_norms(self) -> dict[str, dict]:
        """The backbone's final norm (before pooling) and fc_norm (after), as plain tensors.

        timm ViTs apply `norm` to all tokens and `fc_norm` to the pooled vector (one of the
        two is Identity depending on the pooling); the side network's head needs both.
        """
        out = {}
        for attr in ("norm", "fc_norm"):
            mod = getattr(self.model, attr, None)
            if mod is None or isinstance(mod, nn.Identity):
                out[attr] = {"type": "identity"}
            elif isinstance(mod, nn.LayerNorm):
                out[attr] = {"type": "layernorm", "eps": float(mod.eps),
                             "weight": mod.weight.detach().float().cpu().clone(),
                             "bias": mod.bias.detach().float().cpu().clone()}
            else:
                raise UserError(f"{self.name}: final norm of type {type(mod).__name__} is not "
                                "supported yet (LayerNorm or Identity only).")
        return out


def resolve_name(name: str) -> str:
    """Map an alias or a timm name (with or without a pretrained tag) to a known timm name."""
    full = ALIASES.get(name, name)
    arch = full.split(".", 1)[0]
    if not timm.is_model(arch):
        # ViT families only (those with patch_embed and blocks): "*vit*" offered gcvit, davit
        known = list(ALIASES) + timm.list_models(["vit_*", "deit*", "eva*", "beit*", "flexivit*"])
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UserError(f"unknown model '{name}'.{hint} Use a timm ViT name or one of: "
                        f"{', '.join(ALIASES)}.")
    if "." not in full:  # no tag: take timm's default pretrained tag, for its config
        tags = timm.list_pretrained(f"{arch}.*")
        full = tags[0] if tags else arch
    return full


def state_sha256(model: nn.Module) -> str:
    """A hash of the weights that actually ran, identical whatever file format they came from."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors or .pth/.pt/.bin state dict (nested under 'model' or 'state_dict')."""
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign files surface as many exception types
        raise UserError(f"cannot read weights file {path}: {e}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise UserError(f"{path} does not hold a state dict")
    return sd


def load_weights_file(model: nn.Module, path: Path) -> None:
    """Load a local state dict the way timm loads pretrained ones (its checkpoint filter
    resamples position embeddings to the model's image size). .npz files are big_vision
    checkpoints, read by the model's own timm loader."""
    if path.suffix == ".npz":
        if not hasattr(model, "load_pretrained"):
            raise UserError(f"{type(model).__name__} cannot read .npz checkpoints; convert to .safetensors.")
        if not path.is_file():
            raise UserError(f"weights file not found: {path}")
        try:
            model.load_pretrained(str(path))
        except Exception as e:
            raise UserError(f"cannot load {path} into {type(model).__name__}: {e}") from None
        return
    sd = read_state_dict(path)
    filter_fn = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        sd = filter_fn(sd, model)
    ask = ("Are these the weights of this architecture (--model; for predict, the run's "
           "store's model)?")
    own = model.state_dict()
    # (torch's own refusal lists every tensor that differs: a page per block)
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        key, theirs, ours = wrong[0]
        raise UserError(f"{path} does not fit {type(model).__name__}: {len(wrong)} of its tensors "
                        f"have other shapes than the model's, e.g. {key}: {theirs} in the file, "
                        f"{ours} in the model. {ask}")
    result = model.load_state_dict(sd, strict=False)
    unexpected = [k for k in result.unexpected_keys if not k.startswith("head")]
    if result.missing_keys or unexpected:
        raise UserError(f"{path} does not fit {type(model).__name__}: missing "
                        f"{result.missing_keys[:5]}, unexpected {unexpected[:5]}. {ask}")


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((HF_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached_pretrained_file(model_name: str) -> str | None:
    """The weights file of a timm pretrained tag in the local Hugging Face cache, if any."""
    from huggingface_hub import try_to_load_from_cache
    cfg = timm.models.get_pretrained_cfg(model_name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    for fname in ("model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, fname)
        if isinstance(hit, str):
            return hit
    return None


def load_backbone(name: str, weights: Path | None = None, random_init: bool = False,
                  img_size: int | None = None, seed: int = 0,
                  transform: dict | None = None) -> Backbone:
    """Build a frozen, eval-mode timm ViT with weights from a file, the hub, or a seeded init.

    Without `weights` or `random_init`, timm's pretrained weights are used: from the local
    Hugging Face cache when present, else downloaded. An offline machine gets a UserError
    naming the alternatives immediately, instead of timm's minute of retries. `transform`
    overrides entries of the pretrained data config (crop_pct, interpolation, mean, std).
    """
    full = resolve_name(name)
    kwargs: dict = {"num_classes": 0}
    if img_size:
        kwargs["img_size"] = img_size
    if weights is not None and random_init:
        raise UserError("--weights and --random-init exclude each other; pick one.")
    try:
        if weights is not None:
            model = timm.create_model(full, pretrained=False, **kwargs)
            load_weights_file(model, Path(weights))
            info = {"source": f"file:{Path(weights).name}", "file_sha256": file_sha256(Path(weights))}
        elif random_init:
            torch.manual_seed(seed)
            model = timm.create_model(full, pretrained=False, **kwargs)
            info = {"source": f"random-init:seed={seed}"}
        else:
            cached = _cached_pretrained_file(full)
            if cached is None and not _hub_reachable():
                raise UserError(
                    f"cannot fetch pretrained weights for {full}: {HF_HOST} is unreachable and "
                    "they are not in the local Hugging Face cache. Pass --weights FILE "
                    "(.safetensors, .pth or big_vision .npz) or --random-init.")
            overlay = {"file": cached, "source": ""} if cached else None
            model = timm.create_model(full, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
            info = {"source": f"timm:{full}"}
    except (TypeError, RuntimeError) as e:
        if "img_size" in str(e):  # a CNN, say, takes no image size
            raise UserError(f"{full} is not a ViT-family model (a CNN, say): featcache reads the "
                            "tokens of ViT blocks.") from None
        raise UserError(f"cannot build {full}: {e}") from None
    if not (hasattr(model, "blocks") and hasattr(model, "patch_embed")):
        raise UserError(f"{full} is not a ViT-family model (no patch_embed/blocks).")
    patch, size = model.patch_embed.patch_size, model.patch_embed.img_size
    default = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (0,))[-1]  # SigLIP: 384, patch 14
    if img_size and img_size != default and any(s % p for s, p in zip(size, patch)):
        # off the patch grid, timm crops the remainder away: the user asked for another size
        p = patch[0]
        near = sorted({max(p, img_size // p * p), -(-img_size // p) * p})
        raise UserError(f"--img-size {img_size} is not a multiple of {full}'s patch size {p}: "
                        f"use {' or '.join(map(str, near))}.")
    model.eval().requires_grad_(False)
    info["sha256"] = state_sha256(model)
    overrides = {"input_size": (3, *model.patch_embed.img_size)} if img_size else {}
    data_config = timm.data.resolve_data_config({**overrides, **(transform or {})}, model=model)
    return Backbone(model=model, name=full, weights=info, data_config=data_config)
