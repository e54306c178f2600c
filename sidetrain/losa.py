"""LoSA: a side network of low-rank mixers that refines a frozen ViT's tapped tokens.

Mercea et al., CVPR 2024, reconstructed (docs/losa.md). With z_i the tapped tokens:

    A:  h_0 = 0;  h_i = h_{i-1} + g_i(z_i + h_{i-1});  refined r_i = z_i + h_i
    B:  r_1 = z_1 + g_1(z_1);  r_i = z_i + g_i(r_{i-1})     (the default: measured best)
    C:  h_0 = 0;  h_i = g_i(z_i + h_{i-1});            refined r_i = z_i + h_i

g mixes channels and tokens through rank-r bottlenecks. The up-projections start at zero
(unless zero_init is off), so at step 0 every refined r_i equals z_i and the model is
exactly the probe it is built on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featcache.errors import UserError

VARIANTS = ("A", "B", "C")
ORDERS = ("channel-token", "token-channel", "alternate")


class LowRankMixer(nn.Module):
    """g(X) = X2 - X with, in channel-token order,

        X1 = X  + GELU(LN(X) A_c) B_c            (channels; A_c: D x r, B_c: r x D)
        X2 = X1 + (GELU(LN(X1)^T A_t) B_t)^T     (tokens;   A_t: T x r, B_t: r x T)

    `steps` is the order of the two mixings, or just one of them.
    """

    def __init__(self, width: int, tokens: int, rank: int, steps: tuple[str, ...], zero_init: bool):
        super().__init__()
        self.steps = steps
        if "channel" in steps:
            self.channel_norm = nn.LayerNorm(width)
            self.channel_down = nn.Linear(width, rank)
            self.channel_up = nn.Linear(rank, width)
        if "token" in steps:
            self.token_norm = nn.LayerNorm(width)
            self.token_down = nn.Linear(tokens, rank)
            # No bias: it would add a per-token constant across channels, which every
            # LayerNorm downstream removes. Its gradient is exactly zero, and Adam turns the
            # rounding noise in such a gradient into full-size random steps.
            self.token_up = nn.Linear(rank, tokens, bias=False)
        if zero_init:
            for name in ("channel_up", "token_up"):
                if hasattr(self, name):
                    for p in getattr(self, name).parameters():
                        nn.init.zeros_(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = torch.zeros_like(x)
        for step in self.steps:
            y = x + update
            if step == "channel":
                update = update + self.channel_up(F.gelu(self.channel_down(self.channel_norm(y))))
            else:
                t = self.token_down(self.token_norm(y).transpose(1, 2))
                update = update + self.token_up(F.gelu(t)).transpose(1, 2)
        return update


def _steps(order: str, layer: int) -> tuple[str, ...]:
    if order == "channel-token":
        return ("channel", "token")
    if order == "token-channel":
        return ("token", "channel")
    return ("channel",) if layer % 2 == 0 else ("token",)  # alternate: 1st, 3rd ... channel


class LoSA(nn.Module):
    """Maps tapped tokens (B, L, T, D) to refined tokens (B, L, T, D) (see module doc)."""

    def __init__(self, layers: int, width: int, tokens: int, rank: int, variant: str = "B",
                 order: str = "channel-token", dropout: float = 0.0, zero_init: bool = True):
        super().__init__()
        if not 1 <= rank <= min(width, tokens):
            raise UserError(f"--rank {rank} is out of range: it must be between 1 and "
                            f"min(width {width}, tokens {tokens}) = {min(width, tokens)}.")
        if variant not in VARIANTS or order not in ORDERS:
            raise UserError(f"--variant must be one of {VARIANTS} and --order one of {ORDERS}")
        self.variant = variant
        self.mixers = nn.ModuleList(LowRankMixer(width, tokens, rank, _steps(order, i), zero_init)
                                    for i in range(layers))
        self.drop = nn.Dropout(dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        refined = []
        h = torch.zeros_like(z[:, 0])
        for i, g in enumerate(self.mixers):
            zi = z[:, i]
            if self.variant == "A":
                h = h + self.drop(g(zi + h))
                refined.append(zi + h)
            elif self.variant == "B":
                prev = refined[-1] if refined else zi
                refined.append(zi + self.drop(g(prev)))
            else:
                h = self.drop(g(zi + h))
                refined.append(zi + h)
        return torch.stack(refined, dim=1)
