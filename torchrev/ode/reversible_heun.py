"""Reversible Heun (Kidger et al. 2021): exact gradients in memory constant in the steps.

State :math:`(y_n, \\hat y_n)` and cached :math:`f_n = f(t_n, \\hat y_n)`,
:math:`g_n = g(t_n, \\hat y_n)`, with :math:`\\hat y_0 = y_0`:

.. math::
    \\hat y_{n+1} = 2 y_n - \\hat y_n + f_n \\Delta t + g_n \\Delta W_n, \\qquad
    y_{n+1} = y_n + (f_n + f_{n+1}) \\tfrac{\\Delta t}{2} + (g_n + g_{n+1}) \\tfrac{\\Delta W_n}{2},

which can be undone algebraically (:mod:`._heun`). One evaluation of ``f`` (and ``g``) per step;
ODE order 2, SDE strong order 0.5 (1 with additive noise), Stratonovich. The trade-off: stable
only for :math:`|\\mathrm{Im}(h\\lambda)| < 1` on the imaginary axis, so stiff or strongly damped
problems want another method. Its default gradient, the reversible adjoint (:mod:`.adjoint`),
rebuilds every state from the last one in the backward pass: gradients equal backpropagation
through the same steps (including those for ``t``) while memory stays constant in the number
of steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._base import AbstractSolver, Time, VectorField
from ._heun import Problem, solve_direct
from ._params import parameters_of
from .adjoint import ReversibleAdjoint
from .grid import Grid


class ReversibleHeun(AbstractSolver):
    """The reversible Heun method; its default gradient is the memory-free reversible adjoint.

    ``adjoint=False`` backpropagates through the steps instead, storing them (the reference the
    tests compare the adjoint against).
    """

    evaluations = 1

    def __init__(self, adjoint: bool = True) -> None:
        self.adjoint = adjoint

    def step(self, f: VectorField, t: Time, dt: Time, y: Tensor, n: int) -> Tensor:
        raise NotImplementedError(
            "reversible Heun carries an auxiliary state between steps; call solve() (or "
            "torchrev.ode.odeint), not step()"
        )

    def solve(self, f: VectorField, y0: Tensor, grid: Grid) -> Tensor:
        return self.solve_problem(Problem(f, None, grid), y0, parameters_of(f))

    def solve_problem(self, problem: Problem, y0: Tensor, params: Sequence[Tensor]) -> Tensor:
        """The solution at the grid's output times; ``params`` are the tensors the adjoint
        returns gradients for (every other trainable tensor the fields use raises)."""
        if problem.g is not None and problem.grid.source is not None:
            raise ValueError(
                "gradients with respect to t are not defined for an SDE: a Brownian path has "
                "no time derivative. Pass t.detach() (torchsde does not differentiate t either)."
            )
        if not (self.adjoint and torch.is_grad_enabled()):
            return solve_direct(problem, y0)
        trainable = [p for p in params if p.requires_grad]
        return ReversibleAdjoint.apply(problem, trainable, y0, problem.grid.source, *trainable)
