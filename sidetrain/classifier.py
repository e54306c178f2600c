"""What `sidetrain fit` trains: an optional side network, the frozen readout, a linear head."""

from __future__ import annotations

import torch
from torch import nn

from featcache.store import Store

from .losa import LoSA
from .readout import Readout

METHODS = ("losa", "linear")


class Classifier(nn.Module):
    """logits = head(readout(z_L + side(z))), or head(readout(z_L)) without a side network."""

    def __init__(self, readout: Readout, width: int, num_classes: int, side: nn.Module | None):
        super().__init__()
        self.readout = readout
        self.head = nn.Linear(width, num_classes)
        self.side = side

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z[:, -1]
        if self.side is not None:
            x = x + self.side(z)
        return self.head(self.readout(x))


def build_classifier(method: str, store: Store, rank: int, seed: int) -> Classifier:
    """Same seed -> same head for every method, so LoSA starts exactly at the linear probe."""
    layout = store.layout
    torch.manual_seed(seed)
    readout = Readout(store.norms(), layout)
    model = Classifier(readout, layout.width, len(store.classes), side=None)
    if method == "losa":
        model.side = LoSA(len(store.taps), layout.width, layout.tokens, rank)
    elif method != "linear":
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
