"""Encoded batches brought back from the device while the next batch computes.

On CUDA a copy into ordinary (pageable) memory blocks the CPU until it ends, and the GPU
then idles while the CPU files the batch into its shard. Here each batch is copied without
blocking into one of two pinned buffers, and the caller collects batch n only after it
has queued batch n+1, so the GPU always has work. A buffer is reused two batches later,
once the batch it held has been collected. On the CPU there is nothing to copy: the
tensors come back as they are, through the same calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class InFlight:
    tensors: list[torch.Tensor | None]
    done: torch.cuda.Event | None  # recorded after the copies (CUDA only)

    def collect(self) -> list[np.ndarray | None]:
        """The batch as host arrays, waiting for its copies if they are still running."""
        if self.done is not None:
            self.done.synchronize()
        return [None if t is None else t.numpy() for t in self.tensors]


class Readback:
    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        self.rings: dict[int, list[torch.Tensor]] = {}  # per tensor slot: two pinned buffers
        self.turn = 0

    def start(self, tensors: list[torch.Tensor | None]) -> InFlight:
        """Queue the copies of `tensors` (a batch's arrays, None for an absent one)."""
        if not self.cuda:
            return InFlight(tensors, None)
        self.turn ^= 1
        copies: list[torch.Tensor | None] = []
        for slot, t in enumerate(tensors):
            if t is None:
                copies.append(None)
                continue
            ring = self.rings.get(slot)
            if ring is None or ring[0].shape[1:] != t.shape[1:] or len(ring[0]) < len(t) \
                    or ring[0].dtype != t.dtype:  # (re)made for a larger batch
                ring = self.rings[slot] = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                                           for _ in range(2)]
            copies.append(ring[self.turn][:len(t)].copy_(t, non_blocking=True))
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return InFlight(copies, done)
