"""Wall-clock timing that is right on CUDA: the demo and the benchmarks share it.

A CUDA call returns at launch, so timing it with ``perf_counter`` alone measures launch speed. These
helpers synchronise (or use CUDA events) so that the time covers the work itself.
"""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, *, reps: int, warmup: int = 1, budget_s: float = 10.0) -> list[float]:
    """Wall times of ``fn()`` in ms: ``warmup`` untimed calls, then up to ``reps`` timed ones
    (at least 3, stopping early once ``budget_s`` is spent). CUDA is timed with events."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    started = time.perf_counter()
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 3 and time.perf_counter() - started > budget_s:
            break
    return times
