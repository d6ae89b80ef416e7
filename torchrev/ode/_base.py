"""What every fixed-step solver shares: the vector-field call and its checks, the base class."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .grid import Grid

VectorField = Callable[[Tensor, Tensor], Tensor]
#: A step time or size: a float, or a tensor that carries gradients to ``t``.
Time = float | Tensor


def describe(value: object, dtype: bool = False) -> str:
    """What an error says a call returned or was given: a tensor's shape (and dtype), or the
    type of anything else."""
    if not isinstance(value, Tensor):
        return type(value).__name__
    return f"{tuple(value.shape)}, dtype {value.dtype}" if dtype else str(tuple(value.shape))


def as_time(t: Time, y: Tensor) -> Tensor:
    """A time as the 0-dim tensor a field receives: the state's dtype and device."""
    if isinstance(t, Tensor):
        return t.to(dtype=y.dtype, device=y.device)
    return torch.as_tensor(t, dtype=y.dtype, device=y.device)


def evaluate(
    field: VectorField,
    t: Time,
    y: Tensor,
    step: int,
    name: str = "f",
    shape: Sequence[int] | None = None,
) -> Tensor:
    """``field(t, y)`` with its output checked: a tensor shaped like the state, or ``shape``."""
    out = field(as_time(t, y), y)
    want = y.shape if shape is None else torch.Size(shape)
    if not isinstance(out, Tensor) or out.shape != want:
        whose = " (the state's)" if shape is None else ""
        raise ValueError(
            f"the vector field {name} must return a tensor of shape {tuple(want)}{whose}; at "
            f"step {step} it returned {describe(out)}. States may not change shape."
        )
    return out


def check_brownian(dw: object, want: torch.Size, n: int) -> Tensor:
    """``dw`` if it is a Brownian increment of the shape ``want``, else an error."""
    if not isinstance(dw, Tensor) or dw.shape != want:
        raise ValueError(
            f"brownian(t0, t1, n) must return the increment W(t1) - W(t0), a tensor of shape "
            f"{tuple(want)} for this state and noise type; at step {n} it returned "
            f"{describe(dw)}."
        )
    return dw


class FiniteWatch:
    """Remembers the first step whose outputs were not finite, without a sync per step (one
    check at the end), and raises an error naming it. Steps are seen in order, from 0; each
    costs four operations: whether all steps so far were finite, and how many."""

    def __init__(self, like: Tensor) -> None:
        self.finite = torch.ones((), dtype=torch.bool, device=like.device)
        self.count = torch.zeros((), dtype=torch.long, device=like.device)

    def see(self, *values: Tensor) -> None:
        for value in values:
            self.finite.logical_and_(torch.isfinite(value).all())
        self.count.add_(self.finite)

    def check(self, name: str = "vector field") -> None:
        if not bool(self.finite):
            raise FloatingPointError(
                f"the {name} returned non-finite values at step {int(self.count)}; reduce dt, "
                f"or check the field's inputs and parameters (the solution diverged there)."
            )


class AbstractSolver(ABC):
    """A fixed-step ODE solver whose steps autograd differentiates directly."""

    #: Vector-field evaluations per step.
    evaluations: int

    @abstractmethod
    def step(self, f: VectorField, t: Time, dt: Time, y: Tensor, n: int) -> Tensor:
        """``y`` advanced from ``t`` to ``t + dt``."""

    def solve(self, f: VectorField, y0: Tensor, grid: Grid) -> Tensor:
        """The solution at the grid's output times, shape ``(len(outputs), *y0.shape)``; its
        gradients reach ``t`` when the grid carries them (:meth:`Grid.differentiable`)."""
        grid = grid.differentiable()
        y, ys = y0, [y0]
        watch = FiniteWatch(y0)
        outputs = set(grid.outputs)
        for n in range(len(grid.steps)):
            y = self.step(f, grid.time(n), grid.step(n), y, n)
            watch.see(y)
            if n + 1 in outputs:
                ys.append(y)
        watch.check()
        return torch.stack(ys)
