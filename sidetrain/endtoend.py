"""LoSA end-to-end: the frozen backbone runs forward at every step, no cache.

The reference that training from the cache must reproduce (same seed, same batches), and
the path `predict` on raw images takes.
"""

from __future__ import annotations

import torch
from torch import nn

from featcache.taps import forward_taps

from .classifier import Classifier


class EndToEnd(nn.Module):
    def __init__(self, backbone: nn.Module, taps: list[int], classifier: Classifier,
                 precision: str | None = None):
        """`precision`: the backbone's, as the store was extracted (its `precision`); None:
        the caller's autocast, if any."""
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.taps, self.classifier, self.precision = taps, classifier, precision

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(forward_taps(self.backbone, images, self.taps, self.precision))

    def train(self, mode: bool = True) -> "EndToEnd":
        """Only the classifier trains; the backbone stays in eval mode (no dropout)."""
        self.training = mode
        self.classifier.train(mode)
        return self
