"""The backbone's own frozen readout: final norm -> pool -> fc_norm.

Loaded from the store's backbone/ group, so a head trained on cached tokens sees exactly
the features the backbone's classifier would. Its tensors are non-persistent buffers: they
belong to the store, not to the adapter file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featcache.models import TokenLayout


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


class Readout(nn.Module):
    """(B, T, D) tokens -> (B, D) feature, as the backbone computes it for its head."""

    def __init__(self, norms: dict[str, dict], layout: TokenLayout):
        super().__init__()
        self.norm, self.fc_norm = FrozenNorm(norms["norm"]), FrozenNorm(norms["fc_norm"])
        self.pool, self.prefix = layout.pool, layout.prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        x = x[:, 0] if self.pool == "token" else x[:, self.prefix:].mean(dim=1)
        return self.fc_norm(x)
