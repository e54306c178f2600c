"""LoSA: a side network of low-rank mixers that refines a frozen ViT's tapped tokens.

Variant A of docs/losa.md (Mercea et al., CVPR 2024, reconstructed):

    h_0 = 0;   h_i = h_{i-1} + g_i(z_i + h_{i-1});   logits = head(readout(z_L + h_L))

g mixes channels then tokens through rank-r bottlenecks. The up-projections start at zero,
so at step 0 the model is exactly the linear probe on the backbone's own feature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featcache.errors import UserError


class LowRankMixer(nn.Module):
    """g(X) = X2 - X, where X1 = X + GELU(LN(X) A_c) B_c (channels) and
    X2 = X1 + (GELU(LN(X1)^T A_t) B_t)^T (tokens): ~2Dr + 2Tr parameters."""

    def __init__(self, width: int, tokens: int, rank: int):
        super().__init__()
        self.channel_norm = nn.LayerNorm(width)
        self.channel_down = nn.Linear(width, rank)
        self.channel_up = nn.Linear(rank, width)
        self.token_norm = nn.LayerNorm(width)
        self.token_down = nn.Linear(tokens, rank)
        # No bias here: it would add a per-token constant across channels, which every
        # LayerNorm downstream removes. Its gradient is exactly zero, and Adam turns the
        # rounding noise in such a gradient into full-size random steps.
        self.token_up = nn.Linear(rank, tokens, bias=False)
        nn.init.zeros_(self.channel_up.weight)
        nn.init.zeros_(self.channel_up.bias)
        nn.init.zeros_(self.token_up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.channel_up(F.gelu(self.channel_down(self.channel_norm(x))))
        x1 = x + c
        t = self.token_up(F.gelu(self.token_down(self.token_norm(x1).transpose(1, 2))))
        return c + t.transpose(1, 2)  # X2 - X, without forming X2


class LoSA(nn.Module):
    """Maps tapped tokens (B, L, T, D) to the refinement h_L (B, T, D) of the last tap."""

    def __init__(self, layers: int, width: int, tokens: int, rank: int):
        super().__init__()
        if not 1 <= rank <= min(width, tokens):
            raise UserError(f"--rank {rank} is out of range: it must be between 1 and "
                            f"min(width {width}, tokens {tokens}) = {min(width, tokens)}.")
        self.mixers = nn.ModuleList(LowRankMixer(width, tokens, rank) for _ in range(layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.zeros_like(z[:, 0])
        for i, g in enumerate(self.mixers):
            h = h + g(z[:, i] + h)
        return h
