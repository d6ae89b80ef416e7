"""Deterministic work measurement: floating-point operations counted through the dispatcher."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


class CountFlops(TorchDispatchMode):
    """Sum the flops of every operator called inside, with torch's own per-operator formulas.

    The formulas are those of :class:`torch.utils.flop_counter.FlopCounterMode` (matrix
    products and convolutions; elementwise operators count zero). Unlike that class this one
    tracks no modules, so it also runs through the custom autograd functions of peer
    libraries, whose no-grad forwards trip torch's module tracker.
    """

    def __init__(self) -> None:
        super().__init__()
        self.registry = FlopCounterMode(display=False).flop_registry
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def step_flops(step: Callable[[], Any]) -> int:
    """Flops of one call of ``step``, forward and backward (autograd's nodes run in it too)."""
    with CountFlops() as counter:
        step()
    return counter.total
