"""Per-block token activations of a frozen ViT: the tensors the store keeps.

A tap is the output of block i, after its residual add and before the final norm, with
every token (prefix tokens and patches). Forward hooks make this work for any timm model
with a `blocks` sequence, and the forward stops after the last tapped block.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserError
from .precision import autocast


def parse_taps(spec: str | None, depth: int) -> list[int]:
    """Block indices to tap, from `all` (default), `every:K`, `last:M` or a list `0,5,11`.

    `every:K` always includes the last block, since the head reads the last tap.
    """
    spec = (spec or "all").strip()
    try:
        if spec == "all":
            taps = list(range(depth))
        elif spec.startswith("every:"):
            k = int(spec[6:])
            taps = sorted(set(range(depth - 1, -1, -k))) if k > 0 else []
        elif spec.startswith("last:"):
            m = int(spec[5:])
            taps = list(range(depth - m, depth)) if 0 < m <= depth else []
        else:
            given = [int(t) for t in spec.split(",")]
            taps = [] if any(t < -depth for t in given) else sorted({t + depth if t < 0 else t
                                                                     for t in given})
    except ValueError:
        taps = []
    if not taps or taps[-1] >= depth:
        raise UserError(f"bad --taps {spec!r} for a {depth}-block model: use all, every:K, "
                        f"last:M or a list of block indices 0..{depth - 1} such as 3,7,11.")
    return taps


class _StopForward(Exception):
    pass


@torch.no_grad()
def forward_taps(model: nn.Module, images: torch.Tensor, taps: list[int], precision: str | None = None
                 ) -> torch.Tensor:
    """Run `model` on `images` and return the tapped blocks' tokens as (B, L, T, D), in
    `precision` (fp32, bf16, fp16; None: under whatever autocast the caller set).

    Clips (B, F, C, H, W) run frame by frame and come back in the video token order of
    TokenLayout: every frame's prefix tokens, then every frame's patches. No gradient is
    ever taken through the backbone, so this runs under no_grad.
    """
    if images.ndim == 5:
        b, f = images.shape[:2]
        z = _forward(model, images.flatten(0, 1), taps, precision).unflatten(0, (b, f))  # (B, F, L, P+S, D)
        p = int(model.num_prefix_tokens)
        prefix = z[:, :, :, :p].permute(0, 2, 1, 3, 4).flatten(2, 3)
        patches = z[:, :, :, p:].permute(0, 2, 1, 3, 4).flatten(2, 3)
        return torch.cat([prefix, patches], dim=2)
    return _forward(model, images, taps, precision)


def _forward(model: nn.Module, images: torch.Tensor, taps: list[int], precision: str | None
             ) -> torch.Tensor:
    outputs: dict[int, torch.Tensor] = {}
    last = max(taps)

    def hook(index: int):
        def fn(_module, _inputs, output):
            outputs[index] = output
            if index == last:
                raise _StopForward  # nothing after the last tap is needed
        return fn

    handles = [model.blocks[i].register_forward_hook(hook(i)) for i in taps]
    try:
        with autocast(images.device.type, precision):
            model.forward_features(images)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return torch.stack([outputs[i] for i in taps], dim=1)
