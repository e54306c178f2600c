"""What sidetrain trains: an optional side network, a frozen readout, and a head.

    logits = head(readout(refined tokens of the last k taps))

with refined = LoSA(z) for method "losa" and refined = z for the probes ("linear": a
linear head, "mlp": a one-hidden-layer head). The head is built first from the seed, so
LoSA with zero-initialised mixers starts exactly at the probe on the same head input.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from featcache.errors import UserError
from featcache.models import TokenLayout
from featcache.store import Store
from featcache.taps import parse_taps

from .losa import LoSA
from .readout import Readout, head_layers

METHODS = ("losa", "linear", "mlp")


@dataclass(frozen=True)
class ModelSpec:
    """Everything that shapes the trained network (saved in each run's config.json)."""

    method: str = "losa"
    rank: int = 16
    variant: str = "auto"  # A | B | C (losa.py); auto: B for images, A for video, each measured best
    order: str = "channel-token"  # channel-token | token-channel | alternate
    head_input: str = "last4"  # pool | cls+mean | last4 | all (readout.py); last4 measured best
    dropout: float = 0.0  # on the side network's updates
    zero_init: bool = True  # start the mixers' up-projections at zero
    temporal: bool = True  # video: mix over frames as well as within them
    prefix_mixing: str = "join"  # join (prefix tokens in each frame's token mixer) | channel
    mlp_hidden: int = 512  # hidden width of the "mlp" head


# Options that only some methods have. The others keep the defaults (`common`), so a probe's
# record holds no rank it never had, and probes that differ only there are one and the same.
ONLY_FOR = {**dict.fromkeys(("rank", "variant", "order", "zero_init", "temporal", "prefix_mixing"),
                            ("losa",)),
            "dropout": ("losa", "mlp"), "mlp_hidden": ("mlp",)}


def unused_options(method: str) -> list[str]:
    """The options in ONLY_FOR that `method` has no use for."""
    return [k for k, methods in ONLY_FOR.items() if method not in methods]


def common(spec):
    """`spec` (a ModelSpec, or a FitConfig) with the options its method does not use at
    their defaults."""
    return replace(spec, **{k: getattr(ModelSpec, k) for k in unused_options(spec.method)})


class Classifier(nn.Module):
    """Readout (frozen norms) -> head, with LoSA's side network before the readout for
    "losa". A method without a side network is a probe: fit trains its head alone on the
    readout's output, which a sweep computes once for the probes with the same taps and
    head input."""

    def __init__(self, readout: Readout, layers: int, width: int, num_classes: int,
                 spec: ModelSpec):
        super().__init__()
        self.readout = readout
        self.head_layers = head_layers(readout.head_input, layers)
        features = readout.features(self.head_layers, width)
        if spec.method == "mlp":
            self.head = nn.Sequential(nn.Linear(features, spec.mlp_hidden), nn.GELU(),
                                      nn.Dropout(spec.dropout), nn.Linear(spec.mlp_hidden, num_classes))
        else:
            self.head = nn.Linear(features, num_classes)
        self.side = None
        if spec.method == "losa":
            self.side = LoSA(layers, readout.layout, spec.rank, spec.variant, spec.order,
                             spec.dropout, spec.zero_init, spec.temporal, spec.prefix_mixing)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, L, T, D) tapped tokens (a probe may be given only its last k taps), any float
        type: widened to float32 inside."""
        if not z.is_floating_point():
            raise TypeError(f"tokens must be floating point, not {z.dtype}: a store's raw bf16 "
                            "bits or int8 values need decoding first (ShardLoader does it)")
        refined = self.side(z, keep=self.head_layers) if self.side is not None else z[:, -self.head_layers:]
        return self.head(self.readout(refined))


def select_taps(store: Store, spec: str | None) -> list[int]:
    """Positions in the store's tap list of the taps `spec` picks: all; last:M and every:K
    over the store's taps (every K-th counting back from the last); or block indices."""
    taps = store.taps
    spec = (spec or "all").strip()
    if spec.startswith("last:") and spec[5:].isdigit() and int(spec[5:]) > len(taps):
        raise UserError(f"--taps {spec} asks for more taps than {store.path} holds: {len(taps)} "
                        f"(blocks {taps}); use last:{len(taps)} or fewer, or re-extract with more.")
    if spec.startswith(("last:", "every:")):
        return parse_taps(spec, len(taps))  # positions, with the same syntax and errors
    blocks = parse_taps(spec, store.meta["model"]["depth"]) if spec != "all" else taps
    missing = [b for b in blocks if b not in taps]
    if missing:
        raise UserError(f"--taps asks for blocks {missing} that the store does not hold "
                        f"(it has {taps}); re-extract with them or pick from those.")
    return [taps.index(b) for b in blocks]


def build_classifier(spec: ModelSpec, store: Store, seed: int, layers: int | None = None
                     ) -> Classifier:
    """`layers`: how many taps the model reads (default: all the store's taps)."""
    return make_classifier(spec, store.norms(), store.layout, len(store.classes),
                           layers or len(store.taps), seed)


def auto_variant(layout: TokenLayout) -> str:
    """What --variant auto trains: B on images, A on video (docs/losa.md: B wins on images,
    only A learned the video task)."""
    return "A" if layout.frames > 1 else "B"


def make_classifier(spec: ModelSpec, norms: dict, layout: TokenLayout, num_classes: int,
                    layers: int, seed: int) -> Classifier:
    """The same model from its parts: the store's, or (for predict) a live backbone's."""
    if spec.method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, not '{spec.method}'")
    if spec.variant == "auto":
        spec = replace(spec, variant=auto_variant(layout))
    torch.manual_seed(seed)
    readout = Readout(norms, layout, spec.head_input)
    return Classifier(readout, layers, layout.width, num_classes, spec)


def input_layers(model: Classifier, positions: list[int]) -> list[int]:
    """The tap positions a model reads: all for LoSA, the last k for a probe."""
    return positions if model.side is not None else positions[-model.head_layers:]


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
