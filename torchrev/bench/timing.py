"""Step-time ratios measured fairly: interleaved repeats in one process, medians compared."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_medians(
    steps: dict[str, Callable[[], object]],
    repeats: int = 5,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Median seconds per call of each step, calling them round-robin ``repeats`` times.

    Interleaving spreads slow drifts of the machine (thermal, other load) over every method
    instead of charging them to whichever ran last. ``sync`` waits for asynchronous devices
    (pass ``torch.cuda.synchronize`` on a GPU).
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    sync()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}
