"""The fixed-step time grid: steps between the requested times, and how they depend on ``t``.

Each interval :math:`[t_k, t_{k+1}]` of the requested times is cut into :math:`c_k` equal steps,
:math:`c_k = \\lceil |t_{k+1} - t_k| / \\Delta t \\rceil`, so every requested time is a step
boundary and needs no interpolation. Step :math:`i` of interval :math:`k` starts at
:math:`T_n = t_k + \\tfrac{i}{c_k}(t_{k+1} - t_k)` and is :math:`h_n = (t_{k+1} - t_k)/c_k`
long (negative when ``t`` decreases: integration backwards in time). Both are linear in ``t``,
so a solver's gradients with respect to its step times and sizes give :math:`dL/dt` through
the fixed weights :meth:`Grid.add_time_gradient` and :meth:`Grid.add_step_gradient` apply.
The step counts :math:`c_k` are piecewise constant in ``t`` and carry no gradient, as in
backpropagation through the same steps.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor


def check_times(t: object) -> Tensor:
    """``t`` if it is a 1-D floating tensor of finite, strictly monotonic times, else an error
    that says what to pass."""
    if not isinstance(t, Tensor):
        raise TypeError(
            f"t must be a 1-D floating-point tensor of times, got {type(t).__name__}; pass "
            f"torch.tensor([...], dtype=y0.dtype) or torch.linspace(t0, t1, n)."
        )
    if not t.is_floating_point():
        raise TypeError(
            f"t must be a floating-point tensor, got dtype {t.dtype}; pass t.to(y0.dtype) "
            f"(integer times cannot carry gradients or fractional steps)."
        )
    if t.ndim != 1 or len(t) < 1:
        raise ValueError(
            f"t must be a 1-D tensor of at least one time (the first is y0's); got shape "
            f"{tuple(t.shape)}. For a batch of time grids, solve each grid separately."
        )
    ts = t.detach().double()
    if not bool(torch.isfinite(ts).all()):
        raise ValueError(f"t must be finite, got {ts.tolist()[:8]}...")
    diffs = ts.diff()
    if len(diffs) and not (bool((diffs > 0).all()) or bool((diffs < 0).all())):
        raise ValueError(
            f"t must be strictly increasing, or strictly decreasing to integrate backwards in "
            f"time; got {ts.tolist()[:8]}... Sort t, drop repeated times, or solve each "
            f"direction separately."
        )
    return t


def _layout(t: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Step start times (with the final time appended) and step sizes, as functions of ``t``."""
    t = t.double()
    interval = torch.repeat_interleave(torch.arange(len(counts), device=t.device), counts)
    first = torch.cumsum(counts, 0) - counts
    c = counts.to(t)[interval]
    i = torch.arange(len(interval), device=t.device) - first[interval]
    lo, hi = t[interval], t[interval + 1]
    times = torch.cat((lo + (i / c) * (hi - lo), t[-1:]))
    return times, (hi - lo) / c


@dataclass(frozen=True, eq=False)
class Grid:
    """Solver steps ``(times[n], steps[n])`` and, for each requested time, the step count
    reaching it (``outputs``). ``source`` is ``t`` when it requires grad; ``tensors`` holds
    the times and steps as differentiable functions of it, for solvers that backpropagate."""

    times: tuple[float, ...]
    steps: tuple[float, ...]
    outputs: tuple[int, ...]
    intervals: tuple[int, ...]
    source: Tensor | None = None
    tensors: tuple[Tensor, Tensor] | None = None

    @classmethod
    def build(cls, t: Tensor, dt: float | None) -> Grid:
        t = check_times(t)
        if len(t) < 2:
            raise ValueError("a solver grid needs at least two times; one time needs no solve.")
        if dt is not None and not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
            raise ValueError(
                f"dt must be a positive step size (a Python float), got {dt!r}; its sign "
                f"comes from t (decreasing t integrates backwards)."
            )
        ts = t.detach().double().cpu().tolist()
        counts = [
            1 if dt is None else max(1, math.ceil(abs(b - a) / dt - 1e-9))
            for a, b in itertools.pairwise(ts)
        ]
        # The same operations in the same order as _layout, in Python floats: the same values,
        # and no tensors whose size grows with the number of steps.
        times, steps, intervals = [], [], []
        for k, (a, b, count) in enumerate(zip(ts, ts[1:], counts)):
            for i in range(count):
                times.append(a + (i / count) * (b - a))
                steps.append((b - a) / count)
                intervals.append(k)
        return cls(
            (*times, ts[-1]),
            tuple(steps),
            (0, *itertools.accumulate(counts)),
            tuple(intervals),
            source=t if t.requires_grad else None,
        )

    def __repr__(self) -> str:
        return (
            f"Grid({len(self.steps)} steps from {self.times[0]} to {self.times[-1]}, "
            f"{len(self.outputs)} output times, differentiable={self.tensors is not None})"
        )

    def differentiable(self) -> Grid:
        """This grid with tensor times and steps that carry gradients to ``t`` (when it
        requires grad and autograd is recording), for solvers that backpropagate."""
        if self.source is None or not torch.is_grad_enabled():
            return self
        counts = torch.tensor(self.outputs, device=self.source.device).diff()
        return dataclasses.replace(self, tensors=_layout(self.source, counts))

    def time(self, n: int) -> float | Tensor:
        return self.times[n] if self.tensors is None else self.tensors[0][n]

    def step(self, n: int) -> float | Tensor:
        return self.steps[n] if self.tensors is None else self.tensors[1][n]

    def _place(self, n: int) -> tuple[int, int]:
        """Step (or time) ``n``'s interval of ``t`` and its number of steps."""
        k = self.intervals[n] if n < len(self.intervals) else len(self.outputs) - 2
        return k, self.outputs[k + 1] - self.outputs[k]

    def add_time_gradient(self, total: Tensor, n: int, grad: Tensor) -> None:
        """Add ``grad`` (a gradient for ``times[n]``) to ``total`` (one for ``t``)."""
        k, count = self._place(n)
        fraction = (n - self.outputs[k]) / count
        total[k].add_(grad, alpha=1 - fraction)
        total[k + 1].add_(grad, alpha=fraction)

    def add_step_gradient(self, total: Tensor, n: int, grad: Tensor) -> None:
        """Add ``grad`` (a gradient for ``steps[n]``) to ``total`` (one for ``t``)."""
        k, count = self._place(n)
        total[k].sub_(grad, alpha=1 / count)
        total[k + 1].add_(grad, alpha=1 / count)
