"""What every fixed-step solver shares: the time grid, the vector-field call and its checks."""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

VectorField = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Grid:
    """Solver steps ``(t_n, dt_n)`` and, for each requested time, the step count reaching it.

    Each interval between requested times is cut into equal steps no longer than ``dt``, so
    every requested time is a step boundary and needs no interpolation.
    """

    times: tuple[float, ...]
    steps: tuple[float, ...]
    outputs: tuple[int, ...]

    @classmethod
    def build(cls, t: Tensor, dt: float | None) -> Grid:
        if t.ndim != 1 or len(t) < 2:
            raise ValueError(
                f"t must be a 1-D tensor of at least two increasing times (the first is y0's); "
                f"got shape {tuple(t.shape)}."
            )
        ts = [float(v) for v in t.detach().cpu()]
        if any(not math.isfinite(v) for v in ts) or any(b <= a for a, b in itertools.pairwise(ts)):
            raise ValueError(f"t must be finite and strictly increasing, got {ts[:8]}...")
        if dt is not None and not (math.isfinite(dt) and dt > 0):
            raise ValueError(f"dt must be a positive step size, got {dt}.")
        times, steps, outputs = [ts[0]], [], [0]
        for a, b in itertools.pairwise(ts):
            n = 1 if dt is None else max(1, math.ceil((b - a) / dt - 1e-9))
            h = (b - a) / n
            for i in range(n):
                steps.append(h)
                times.append(b if i == n - 1 else a + (i + 1) * h)
            outputs.append(len(steps))
        return cls(tuple(times), tuple(steps), tuple(outputs))


def evaluate(field: VectorField, t: float, y: Tensor, step: int, name: str = "f") -> Tensor:
    """``field(t, y)`` with its output checked: a tensor shaped like the state."""
    out = field(torch.as_tensor(t, dtype=y.dtype, device=y.device), y)
    if not isinstance(out, Tensor) or out.shape != y.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"the vector field {name} must return a tensor shaped like the state "
            f"{tuple(y.shape)}; at step {step} it returned {got}. States may not change shape."
        )
    return out


class FiniteWatch:
    """Remembers the first step whose vector-field output was not finite, without a sync
    per step (one check at the end), and raises an error naming it."""

    def __init__(self, like: Tensor) -> None:
        self.first = torch.full((), -1, dtype=torch.long, device=like.device)

    def see(self, value: Tensor, step: int) -> None:
        bad = ~torch.isfinite(value).all()
        self.first = torch.where(bad & (self.first < 0), step, self.first)

    def check(self, name: str = "vector field") -> None:
        step = int(self.first)
        if step >= 0:
            raise FloatingPointError(
                f"the {name} returned non-finite values at step {step}; reduce dt, or check "
                f"the field's inputs and parameters (the solution diverged there)."
            )


class AbstractSolver(ABC):
    """A fixed-step ODE solver whose steps autograd differentiates directly."""

    #: Vector-field evaluations per step.
    evaluations: int

    @abstractmethod
    def step(self, f: VectorField, t: float, dt: float, y: Tensor, n: int) -> Tensor:
        """``y`` advanced from ``t`` to ``t + dt``."""

    def solve(self, f: VectorField, y0: Tensor, grid: Grid) -> Tensor:
        """The solution at the grid's output times, shape ``(len(outputs), *y0.shape)``."""
        y, ys = y0, [y0]
        watch = FiniteWatch(y0)
        outputs = set(grid.outputs)
        for n, dt in enumerate(grid.steps):
            y = self.step(f, grid.times[n], dt, y, n)
            watch.see(y, n)
            if n + 1 in outputs:
                ys.append(y)
        watch.check()
        return torch.stack(ys)
