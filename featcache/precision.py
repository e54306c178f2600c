"""Compute precision of a forward pass by name: fp32, or autocast to bf16 or fp16.

Extraction runs the backbone in the precision it records in the store (`--precision`),
training and evaluation run the side network in theirs; one helper turns a name into the
same autocast everywhere. Under autocast, matrix products read 16-bit inputs and accumulate
in fp32; on CUDA norms and softmax run in fp32 (torch's autocast op lists; on the CPU they
keep their input's 16 bits).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from .console import note
from .errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16")


def autocast(device_type: str, precision: str | None) -> contextlib.AbstractContextManager:
    """torch.autocast for `precision` on `device_type` ("cpu", "cuda"): fp32 turns it off,
    None leaves the caller's setting as it is."""
    if precision is None:
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)


def pick_device(device: str) -> str:
    """The device to run on: `auto` is $FEATCACHE_DEVICE where set, else cuda where torch sees
    a GPU, else cpu (a GPU user need not say so; a GPU box's CI can keep to the CPU). Refuses
    a name torch cannot use, or CUDA where there is none, before any work."""
    where = ""
    if device == "auto" and os.environ.get("FEATCACHE_DEVICE") not in (None, "", "auto"):
        device, where = os.environ["FEATCACHE_DEVICE"], " (from FEATCACHE_DEVICE)"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}{where}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} was asked for{where}, but torch sees no CUDA device here.")
    if kind == "cpu":
        crowded_cpu_note()
    return device


@functools.cache  # (once per process: a sweep picks a device per configuration)
def crowded_cpu_note() -> None:
    """Say so when other jobs already keep the cores busy: torch's threads then wait on one
    another, and a CPU run took up to 75 times as long here as with OMP_NUM_THREADS=1
    (README "Threads"). Silent where the user has set the threads, or on one thread."""
    cores, threads = os.cpu_count() or 1, torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > cores and threads > 1 and "OMP_NUM_THREADS" not in os.environ:
        note(f"the load average here is {load:.1f} on {cores} cores: other jobs hold them, and "
             f"torch's {threads} threads would wait on them. Set OMP_NUM_THREADS to the cores "
             "that are free (1 if none): several times faster on a crowded machine.")
