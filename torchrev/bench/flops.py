"""Deterministic work measurement: floating-point operations counted through the dispatcher."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._core.measure import CountFlops as CountFlops


def step_flops(step: Callable[[], Any]) -> int:
    """Flops of one call of ``step``, forward and backward (autograd's nodes run in it too)."""
    with CountFlops() as counter:
        step()
    return counter.total
