"""Step-time ratios measured fairly: interleaved repeats in one process, compared per round."""

from __future__ import annotations

import ctypes
import ctypes.util
import random
import statistics
import time
from collections.abc import Callable

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def retain_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse, as CUDA's caching allocator does.

    By default glibc returns large freed blocks to the system and page-faults them back on the
    next allocation, which charges a method for how much memory it cycles rather than for its
    compute: on two cores it made plain autograd's step up to 40% slower. Call this once before
    timing on a CPU so that ratios measure compute. Returns False where it does not apply.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    )


def interleaved_times(
    steps: dict[str, Callable[[], object]],
    repeats: int = 5,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds of each call of each step, every step called once per round, ``repeats`` rounds.

    Entry ``r`` of every list comes from round ``r``. Interleaving spreads slow drifts of the
    machine (thermal, other load) over every method instead of charging them to whichever ran
    last. Each round calls the steps in a fresh order drawn from ``seed``, so that a method
    follows a different one from round to round: the leftovers of the step before (caches,
    the allocator's free lists) would otherwise help or hurt it the same way every time, as
    they do with a fixed cycle, even a rotated one. ``sync`` waits for asynchronous devices
    (``torch.cuda.synchronize``). ``clock`` reads the time: wall-clock by default;
    ``time.process_time`` (this process's CPU seconds, on one thread) where other processes
    share the cores and wall-clock times would measure their load.
    """
    names = list(steps)
    for _ in range(warmup):
        for step in steps.values():
            step()
    sync()
    order = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name in order.sample(names, len(names)):
            start = clock()
            steps[name]()
            sync()
            times[name].append(clock() - start)
    return times


def median_ratio(times: list[float], base: list[float]) -> float:
    """Median over rounds of ``times[r] / base[r]``: the paired estimate of a time ratio.

    On a shared machine the speed drifts by tens of percent within a minute; a ratio taken
    within each round (a fraction of a second) cancels the drift, so its median moves far less
    between runs than the ratio of two separate medians does.
    """
    return statistics.median(t / b for t, b in zip(times, base, strict=True))
