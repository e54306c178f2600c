"""LoSA: a side network of low-rank mixers that refines a frozen ViT's tapped tokens.

Mercea et al., CVPR 2024, reconstructed (docs/losa.md). With z_i the tapped tokens:

    A:  h_0 = 0;  h_i = h_{i-1} + g_i(z_i + h_{i-1});  refined r_i = z_i + h_i
    B:  r_1 = z_1 + g_1(z_1);  r_i = z_i + g_i(r_{i-1})     (the images' default: measured best)
    C:  h_0 = 0;  h_i = g_i(z_i + h_{i-1});            refined r_i = z_i + h_i

A is the default for video, where only it learned the motion task (docs/losa.md "Video").

g mixes channels and tokens through rank-r bottlenecks. The up-projections start at zero
(unless zero_init is off), so at step 0 every refined r_i equals z_i and the model is
exactly the probe it is built on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from featcache.errors import UserError
from featcache.models import TokenLayout

VARIANTS = ("A", "B", "C")
ORDERS = ("channel-token", "token-channel", "alternate")
PREFIX_MIXING = ("join", "channel")


class _Normalized(torch.autograd.Function):
    """x -> (x - mean) / std over each token's channels: LayerNorm without its affine, which
    keeps only its output (and 1/std) for backward, not its input too.

    The projections that follow fold the affine into their weights (norm_linear), so a mixer
    keeps one token-sized tensor per LayerNorm instead of two (on images, two per layer
    instead of four). Both directions are one fused LayerNorm kernel: backward hands the
    kernel the normalised output as its input (mean 0, 1/std 1) and scales the result by
    the true 1/std."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        # a weight of ones: torch's kernel without one is 2.4x slower on a CPU
        y, _, rstd = torch.native_layer_norm(x, x.shape[-1:], x.new_ones(x.shape[-1]), None, eps)
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    @once_differentiable  # 1/std is taken as a constant here: no second derivative
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        y, rstd = ctx.saved_tensors
        g = torch.ops.aten.native_layer_norm_backward(
            grad, y, y.shape[-1:], torch.zeros_like(rstd), torch.ones_like(rstd), None, None,
            [True, False, False])[0]
        return g.mul_(rstd), None


def normalized(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """norm(x) before its affine (see _Normalized)."""
    return _Normalized.apply(x, norm.eps)


def norm_linear(x: torch.Tensor, norm: nn.LayerNorm, linear: nn.Linear) -> torch.Tensor:
    """linear(norm(x)) = normalized(x) (W diag(gamma))^T + (W beta + b): norm(x) never written."""
    w = linear.weight * norm.weight
    return normalized(x, norm) @ w.t() + (linear.weight @ norm.bias + linear.bias)


def mixed_tokens(layout: TokenLayout, prefix: str) -> int:
    """Tokens the (spatial) token mixer mixes: one frame's patches, and its prefix if joined."""
    return layout.patches + (layout.frame_prefix if prefix == "join" else 0)


class TokenMixer(nn.Module):
    """Low-rank mixing along the token axis: X + (GELU(LN(X)^T A_t) B_t)^T.

    For video (docs/losa.md "Video") the mixing is factorised and summed: a spatial mixer
    over the tokens of each frame (weights shared across frames) and a temporal one over the
    frames (weights shared across positions; rank at most F). `prefix` says whether each
    frame's prefix tokens join its spatial mixer ("join") or are left to channel mixing
    ("channel"). An image is a one-frame clip: one spatial mixer over all T tokens.
    """

    def __init__(self, layout: TokenLayout, rank: int, temporal: bool, prefix: str):
        super().__init__()
        self.frames, self.frame_prefix = layout.frames, layout.frame_prefix
        self.join = prefix == "join"
        space = mixed_tokens(layout, prefix)
        self.token_norm = nn.LayerNorm(layout.width)
        self.token_down = nn.Linear(space, rank)
        # No bias: it would add a per-token constant across channels, which every
        # LayerNorm downstream removes. Its gradient is exactly zero, and Adam turns the
        # rounding noise in such a gradient into full-size random steps.
        self.token_up = nn.Linear(rank, space, bias=False)
        self.temporal = temporal and self.frames > 1
        if self.temporal:
            self.time_down = nn.Linear(self.frames, min(rank, self.frames))
            self.time_up = nn.Linear(min(rank, self.frames), self.frames, bias=False)

    def _frames(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, F, Q, D): each frame's tokens (its prefix first when joined)."""
        if self.frames == 1 and self.join:  # an image: the token axis is the frame
            return x.unsqueeze(1)
        f, p = self.frames, self.frames * self.frame_prefix
        patches = x[:, p:].unflatten(1, (f, -1))
        return torch.cat([x[:, :p].unflatten(1, (f, -1)), patches], 2) if self.join else patches

    def _tokens(self, u: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The inverse of _frames; prefix tokens left out of the mixing get no update."""
        if self.frames == 1 and self.join:
            return u.squeeze(1)
        if self.join:
            return torch.cat([u[:, :, :self.frame_prefix].flatten(1, 2),
                              u[:, :, self.frame_prefix:].flatten(1, 2)], 1)
        return torch.cat([torch.zeros_like(like[:, :self.frames * self.frame_prefix]), u.flatten(1, 2)], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The update (B, T, D) for tokens x (B, T, D)."""
        # W LN(X) over each frame's tokens, with LN(X) = X^ diag(gamma) + 1 beta^T (X^ the
        # normalised tokens: see _Normalized) and so W LN(X) = (W X^) diag(gamma) + (W 1) beta^T,
        # batched over the B*F frames with W expanded (a view): a broadcast matmul or a Linear
        # on X's transpose writes a transposed copy of the tokens, costlier than the products
        norm, w = self.token_norm, self.token_down.weight
        y = self._frames(normalized(x, norm))  # (B, F, Q, D)
        frames = y.flatten(0, 1)
        down = torch.bmm(w.expand(len(frames), -1, -1), frames).float()  # small: (B*F, r, D)
        # the affine in float32, so that gamma's gradient is not summed in fp16 under autocast
        down = down * norm.weight + (w.sum(1, keepdim=True) * norm.bias + self.token_down.bias[:, None])
        u = torch.bmm(self.token_up.weight.expand(len(frames), -1, -1), F.gelu(down)).unflatten(0, y.shape[:2])
        if self.temporal:
            t = (y * norm.weight + norm.bias).permute(0, 2, 3, 1)  # LN(X): (B, Q, D, F)
            u = u + self.time_up(F.gelu(self.time_down(t))).permute(0, 3, 1, 2)
        return self._tokens(u, x)


class LowRankMixer(nn.Module):
    """g(X) = X2 - X with, in channel-token order,

        X1 = X  + GELU(LN(X) A_c) B_c            (channels; A_c: D x r, B_c: r x D)
        X2 = X1 + TokenMixer(X1)                 (tokens; for video, space + time)

    `steps` is the order of the two mixings, or just one of them.
    """

    def __init__(self, layout: TokenLayout, rank: int, steps: tuple[str, ...],
                 zero_init: bool, temporal: bool = True, prefix: str = "join"):
        super().__init__()
        self.steps = steps
        width = layout.width
        if "channel" in steps:
            self.channel_norm = nn.LayerNorm(width)
            self.channel_down = nn.Linear(width, rank)
            self.channel_up = nn.Linear(rank, width)
        if "token" in steps:
            self.token = TokenMixer(layout, rank, temporal, prefix)
        if zero_init:
            for name, m in self.named_modules():
                if name.endswith(("channel_up", "token_up", "time_up")):
                    for p in m.parameters():
                        nn.init.zeros_(p)

    def _load_from_state_dict(self, state, prefix, *args, **kwargs):
        """Adapters saved before video support kept the token mixer's weights one level up
        (`token_down` rather than `token.token_down`): read them under their new names."""
        for name in ("token_norm", "token_down", "token_up"):
            for key in [k for k in state if k.startswith(f"{prefix}{name}.")]:
                state[f"{prefix}token.{key[len(prefix):]}"] = state.pop(key)
        super()._load_from_state_dict(state, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = None  # not a zero tensor: each full-size add or fill costs as much as a mixing
        for step in self.steps:
            y = x if update is None else x + update
            if step == "channel":
                d = self.channel_up(F.gelu(norm_linear(y, self.channel_norm, self.channel_down)))
            else:
                d = self.token(y)
            # the running sum in x's precision, as Linear outputs are bf16/fp16 under autocast
            update = d.to(torch.promote_types(x.dtype, d.dtype)) if update is None else update + d
        return update


def _steps(order: str, layer: int) -> tuple[str, ...]:
    if order == "channel-token":
        return ("channel", "token")
    if order == "token-channel":
        return ("token", "channel")
    return ("channel",) if layer % 2 == 0 else ("token",)  # alternate: 1st, 3rd ... channel


class LoSA(nn.Module):
    """Maps tapped tokens (B, L, T, D) to refined tokens (B, keep, T, D) (see module doc)."""

    def __init__(self, layers: int, layout: TokenLayout, rank: int, variant: str = "B",
                 order: str = "channel-token", dropout: float = 0.0, zero_init: bool = True,
                 temporal: bool = True, prefix: str = "join"):
        super().__init__()
        for option, value, allowed in (("--variant", variant, VARIANTS), ("--order", order, ORDERS),
                                       ("--prefix-mixing", prefix, PREFIX_MIXING)):
            if value not in allowed:
                raise UserError(f"{option} {value!r} is not one of {', '.join(allowed)}.")
        width, tokens = layout.width, mixed_tokens(layout, prefix)
        if not 1 <= rank <= min(width, tokens):
            raise UserError(f"--rank {rank} is out of range: it must be between 1 and "
                            f"min(width {width}, tokens per frame {tokens}) = {min(width, tokens)}"
                            + (f"; pass --rank {min(width, tokens)} or less, or extract larger "
                               "images (more tokens)." if rank > tokens else "."))
        self.variant = variant
        self.mixers = nn.ModuleList(
            LowRankMixer(layout, rank, _steps(order, i), zero_init, temporal, prefix)
            for i in range(layers))
        self.drop = nn.Dropout(dropout)

    def forward(self, z: torch.Tensor, keep: int | None = None) -> torch.Tensor:
        """`keep` (1 to L, default L): return only the last `keep` refined layers, all that a
        head reads. Stacking all of them (and the full-size zero gradient of the slice a head
        takes) cost a fifth of a CPU training step at 224 px."""
        layers = len(self.mixers)
        keep = layers if keep is None else keep
        refined, h, prev = [], None, None
        for i, g in enumerate(self.mixers):
            zi = z[:, i].float()  # 16-bit batches (loader.py): float32 one layer at a time
            if self.variant == "A":
                step = self.drop(g(zi if h is None else zi + h))
                h = step if h is None else h + step
                prev = zi + h
            elif self.variant == "B":
                prev = zi + self.drop(g(zi if prev is None else prev))
            else:
                h = self.drop(g(zi if h is None else zi + h))
                prev = zi + h
            if i >= layers - keep:
                refined.append(prev)
        return torch.stack(refined, dim=1)
