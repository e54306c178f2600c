"""How tokens are stored: fp16, bf16 (as uint16 bits), int8 (+ scales) or fp32.

int8 must survive ViTs' outlier channels (a few channels 10-100x larger than the rest).
Measured on real DINOv2 ViT-S/14 tokens (benchmarks/int8_error.py, docs/store-format.md):
a scale per token alone gives 1.1-2.1 % relative error per layer, because one outlier
channel sets every token's step. Dividing each channel by its absolute maximum over the
first 32 inputs first (a per-layer, per-channel scale stored once in the store) and then
taking the per-token absmax brings it to 0.5-0.8 %. That is the scheme used here:

    y = z / c[layer, channel]          c: calibration absmax, (L, D), float32
    s = max|y| over channels / 127     one scale per token per layer, (N, L, T), float32
    q = round(y / s)                   int8 in [-127, 127]
    z ~ q * s * c
"""

from __future__ import annotations

import numpy as np
import torch

DTYPES = ("fp16", "bf16", "int8", "fp32")
_TINY = 1e-12


FP16_MAX = 65504.0


def span(z: torch.Tensor) -> torch.Tensor:
    """(min, max) of a batch's float tokens, on its device (one pass; NaN propagates), for
    `out_of_range` to look at once the batch is back on the host."""
    return torch.stack(torch.aminmax(z)).float()


def out_of_range(lo: float, hi: float, dtype: str) -> str | None:
    """Why tokens spanning lo..hi cannot be stored as `dtype`, or None."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return ("the backbone's tokens hold NaN or Inf (with --precision fp16 its forward "
                "overflows: use bf16 or fp32; else check the weights file)")
    if dtype == "fp16" and max(-lo, hi) > FP16_MAX:
        return (f"the backbone's tokens reach {max(-lo, hi):.4g}, beyond fp16's largest "
                f"{FP16_MAX:.0f}: extract with --dtype bf16 (as small, with fp32's range)")
    return None


def calibrate(z: torch.Tensor) -> np.ndarray:
    """Per-layer, per-channel absmax of a batch (B, L, T, D) -> (L, D) channel scale."""
    return z.abs().amax(dim=(0, 2)).clamp_min(1e-6).float().cpu().numpy()


def encode(z: torch.Tensor, dtype: str, channel_scale: np.ndarray | torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float tokens (B, L, T, D) -> (stored tokens, per-token scales or None), on z's device
    and in the store's array dtypes (bf16 as its uint16 bits): the extractor copies them to
    the host while the next batch computes. Pass `channel_scale` on z's device when encoding
    many batches: a copy to a GPU from ordinary memory waits for the GPU's queue to drain."""
    z = z.float()
    if dtype == "fp32":
        return z, None
    if dtype == "fp16":
        return z.half(), None
    if dtype == "bf16":
        return z.bfloat16().view(torch.uint16), None
    if dtype == "int8":
        y = z / torch.as_tensor(channel_scale, device=z.device)[None, :, None, :]
        s = (y.abs().amax(dim=-1) / 127).clamp_min(_TINY)
        return torch.round(y / s[..., None]).clamp_(-127, 127).to(torch.int8), s
    raise ValueError(f"unknown dtype {dtype!r}")


def decode(tokens: torch.Tensor, dtype: str, scales: torch.Tensor | None = None,
           channel_scale: torch.Tensor | None = None, out: torch.Tensor | None = None
           ) -> torch.Tensor:
    """Stored tokens (B, L, T, D) -> float32, on whatever device `tokens` is on.

    `channel_scale` is (L, D) for the same layers as `tokens`. `out`, a float32 tensor of
    the same shape, receives the result (reusing memory is several times faster on a CPU
    than faulting in a fresh tensor's pages); fp32 tokens are returned as they are.
    """
    if dtype == "fp32":
        return tokens.float()
    if out is None:
        out = torch.empty(tokens.shape, dtype=torch.float32, device=tokens.device)
    out.copy_(tokens.view(torch.bfloat16) if dtype == "bf16" else tokens)
    if dtype == "int8":
        out.mul_(scales.float()[..., None]).mul_(channel_scale[None, :, None, :])
    return out
