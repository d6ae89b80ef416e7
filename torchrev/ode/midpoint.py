"""Explicit midpoint: second order, two evaluations per step."""

from __future__ import annotations

from torch import Tensor

from ._base import AbstractSolver, Time, VectorField, evaluate


class Midpoint(AbstractSolver):
    r"""Order 2: :math:`y_{n+1} = y_n + \Delta t\, f(t_n + \tfrac{\Delta t}{2},\, y_{n+1/2})`
    with :math:`y_{n+1/2} = y_n + \tfrac{\Delta t}{2} f(t_n, y_n)`."""

    evaluations = 2

    def step(self, f: VectorField, t: Time, dt: Time, y: Tensor, n: int) -> Tensor:
        half = y + 0.5 * dt * evaluate(f, t, y, n)
        return y + dt * evaluate(f, t + 0.5 * dt, half, n)
