"""Classical Runge-Kutta: fourth order, four evaluations per step."""

from __future__ import annotations

from torch import Tensor

from ._base import AbstractSolver, Time, VectorField, evaluate


class RK4(AbstractSolver):
    """The classical fourth-order Runge-Kutta step (the 1/6, 1/3, 1/3, 1/6 weights)."""

    evaluations = 4

    def step(self, f: VectorField, t: Time, dt: Time, y: Tensor, n: int) -> Tensor:
        k1 = evaluate(f, t, y, n)
        k2 = evaluate(f, t + dt / 2, y + dt / 2 * k1, n)
        k3 = evaluate(f, t + dt / 2, y + dt / 2 * k2, n)
        k4 = evaluate(f, t + dt, y + dt * k3, n)
        return y + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
