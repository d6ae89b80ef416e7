"""Deterministic memory measurement: live tensor bytes seen through the dispatcher."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .._core.measure import LiveTensorBytes as LiveTensorBytes

MiB = 2**20


def peak_live_bytes(step: Callable[[], Any]) -> int:
    """Peak bytes of tensors alive during ``step()`` beyond those alive before it.

    Call it with parameters and their ``.grad`` already allocated (run one step first and
    zero the gradients without setting them to None) to measure activations and temporaries
    only, "beyond parameters and gradients".
    """
    with LiveTensorBytes() as tracker:
        step()
    return tracker.peak


def training_step_peak(step: Callable[[], Any], params: Iterable[torch.Tensor]) -> int:
    """Peak bytes of one training step beyond parameters and gradients, the usual way.

    The step starts with ``.grad`` set to None (what ``optimizer.zero_grad()`` does) and the
    storages that end up as the parameters' ``.grad`` are left out of the count from the moment
    they appear: what remains is activations and temporaries. This is the measure benchmarks
    report; :func:`peak_live_bytes` with pre-allocated gradients also counts gradient
    temporaries, which is the stricter measure for gradient accumulation.
    """
    params = list(params)
    for p in params:
        p.grad = None
    with LiveTensorBytes() as tracker:
        step()
    return tracker.peak_excluding(p.grad for p in params if p.grad is not None)


def step_memory(step: Callable[[], Any], model: torch.nn.Module) -> dict[str, float]:
    """MiB of one training step of ``model`` beyond parameters and gradients.

    ``live_mib``: :func:`training_step_peak`, deterministic on any device. On CUDA also
    ``cuda_mib``: ``torch.cuda.max_memory_allocated`` above the allocated baseline, with the
    gradients allocated beforehand (so gradient temporaries count there). One warm-up step
    runs first, so lazy initialisation stays out of both.
    """
    step()
    row = {"live_mib": training_step_peak(step, model.parameters()) / MiB}
    if next(model.parameters()).device.type == "cuda":
        step()
        model.zero_grad(set_to_none=False)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        row["cuda_mib"] = (torch.cuda.max_memory_allocated() - base) / MiB
    return row
