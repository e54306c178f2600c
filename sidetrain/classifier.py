"""What `sidetrain fit` trains: an optional side network, the frozen readout, a linear head."""

from __future__ import annotations

import torch
from torch import nn

from featcache.errors import UserError
from featcache.store import Store
from featcache.taps import parse_taps

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


def select_taps(store: Store, spec: str | None) -> list[int]:
    """Positions (in the store's tap list) of the blocks `spec` picks, with featcache's
    --taps syntax over block indices: all, every:K, last:M or a list such as 3,7,11."""
    taps = store.taps
    blocks = parse_taps(spec, store.meta["model"]["depth"]) if spec not in (None, "", "all") else taps
    missing = [b for b in blocks if b not in taps]
    if missing:
        raise UserError(f"--taps asks for blocks {missing} that the store does not hold "
                        f"(it has {taps}); re-extract with them or pick from those.")
    return [taps.index(b) for b in blocks]


def build_classifier(method: str, store: Store, rank: int, seed: int, layers: int | None = None
                     ) -> Classifier:
    """Same seed -> same head for every method, so LoSA starts exactly at the linear probe.

    `layers`: how many taps the side network reads (default: all the store's taps).
    """
    layout = store.layout
    torch.manual_seed(seed)
    readout = Readout(store.norms(), layout)
    model = Classifier(readout, layout.width, len(store.classes), side=None)
    if method == "losa":
        model.side = LoSA(layers or len(store.taps), layout.width, layout.tokens, rank)
    elif method != "linear":
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
