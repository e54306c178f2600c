"""From (refined) tokens to the head's input feature, through the backbone's frozen norms.

The norms come from the store's backbone/ group, so a head trained on cached tokens sees
exactly the features the backbone's own classifier would. Their tensors are
non-persistent buffers: they belong to the store, not to the adapter file.

Head inputs (docs/losa.md "Baselines"):
- pool:     fc_norm(pool(norm(x_L))), the backbone's own feature (D; a distilled DeiT's
            averages its class and distillation tokens)
- cls+mean: class token and mean patch token of norm(x_L) (2D)
- last4:    cls+mean of each of the last 4 tapped blocks, DINOv2's strong probe (8D)
- all:      cls+mean of every tapped block, Head2Toe-style (2D x L)

On video the class token and the mean are averaged over frames too: the probes are
frame-averaged, and whatever tells the frames' order apart must come from the side network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featcache.errors import UserError
from featcache.models import TokenLayout

HEAD_INPUTS = ("pool", "cls+mean", "last4", "all")


class FrozenNorm(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        self.kind = spec["type"]
        if self.kind == "layernorm":
            self.eps = float(spec["eps"])
            self.register_buffer("weight", torch.as_tensor(spec["weight"], dtype=torch.float32), persistent=False)
            self.register_buffer("bias", torch.as_tensor(spec["bias"], dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "identity":
            return x
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def head_layers(head_input: str, available: int) -> int:
    """How many of the last tapped blocks a head input reads."""
    return {"pool": 1, "cls+mean": 1, "last4": min(4, available), "all": available}[head_input]


class Readout(nn.Module):
    """(B, k, T, D) tokens of the last k taps -> (B, features)."""

    def __init__(self, norms: dict[str, dict], layout: TokenLayout, head_input: str = "pool"):
        super().__init__()
        if head_input not in HEAD_INPUTS:
            raise UserError(f"--head-input must be one of {', '.join(HEAD_INPUTS)}, not '{head_input}'")
        self.norm, self.fc_norm = FrozenNorm(norms["norm"]), FrozenNorm(norms["fc_norm"])
        self.head_input, self.has_cls, self.layout = head_input, layout.class_token, layout
        # The pooling as a (T, n) matrix of token weights: columns cls (each frame's class
        # token, averaged) and mean (all patches), as far as the head reads them. A batched
        # product with it writes its gradient in one pass, where slicing and averaging filled
        # a zero tensor of all tokens and copied into it.
        cls = torch.zeros(layout.tokens)
        if layout.class_token:
            cls[0:layout.prefix_tokens:layout.frame_prefix] = 1 / layout.frames
        mean = torch.zeros(layout.tokens)
        mean[layout.prefix_tokens:] = 1 / (layout.tokens - layout.prefix_tokens)
        if head_input == "pool":
            columns = [self._token_pool(layout, cls) if layout.pool == "token" else mean]
        else:
            columns = [cls, mean] if layout.class_token else [mean]
        self.register_buffer("pooling", torch.stack(columns, 1), persistent=False)

    @staticmethod
    def _token_pool(layout: TokenLayout, cls: torch.Tensor) -> torch.Tensor:
        """The backbone's token pooling: its class token, or, in a distilled DeiT (a
        distillation token after the class token, no registers), the two averaged, as timm's
        pre-logits feature is."""
        if layout.frame_prefix - layout.class_token - layout.register_tokens != 1:
            return cls
        both = cls / 2
        both[1:layout.prefix_tokens:layout.frame_prefix] = cls[0:layout.prefix_tokens:layout.frame_prefix] / 2
        return both

    def features(self, layers: int, width: int) -> int:
        if self.head_input == "pool":
            return width
        return layers * width * (2 if self.has_cls else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head_input == "pool":
            x = x[:, -1:]
        batch = len(x)
        x = self.norm(x.float()).flatten(0, 1)  # (B k, T, D); float32 from 16-bit batches
        with torch.autocast(x.device.type, enabled=False):  # averages in the norm's fp32
            weights = self.pooling.T.to(x.dtype).expand(len(x), -1, -1)
            pooled = torch.bmm(weights, x).reshape(batch, -1)  # per layer: [cls, mean] x D
        return self.fc_norm(pooled) if self.head_input == "pool" else pooled
