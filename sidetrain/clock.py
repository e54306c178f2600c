"""Each configuration's own training time, so that a sweep reports what each one costs
rather than the sweep's average.

On a GPU a step returns once its kernels are queued, so time is read from CUDA events,
in stream order, without waiting for them step by step (which would stall the queue).
"""

from __future__ import annotations

import time

import torch


def mark(device: torch.device) -> float | torch.cuda.Event:
    """A point in time: the wall clock's on the CPU, the GPU stream's on a GPU."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


class Clock:
    """A trainer's own seconds: the sum of the spans between pairs of `mark`s it is given."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.spans: list[tuple[torch.cuda.Event, torch.cuda.Event, float]] = []

    def add(self, start: float | torch.cuda.Event, end: float | torch.cuda.Event, share: float = 1.0
            ) -> None:
        if isinstance(start, float):
            self.seconds += share * (end - start)
            return
        self.spans.append((start, end, share))
        if len(self.spans) >= 256:  # read the finished ones: events are not free to hold
            self._read(wait=False)

    def _read(self, wait: bool) -> None:
        """Fold the spans whose end has passed into `seconds` (all of them if `wait`);
        one stream's events pass in the order they were recorded."""
        done = 0
        for a, b, share in self.spans:
            if not (wait or b.query()):
                break
            b.synchronize()
            self.seconds += share * a.elapsed_time(b) / 1000
            done += 1
        del self.spans[:done]

    def take(self) -> float:
        """The seconds added since the last take."""
        self._read(wait=True)
        seconds, self.seconds = self.seconds, 0.0
        return seconds
