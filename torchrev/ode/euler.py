"""Explicit Euler: first order, one evaluation per step."""

from __future__ import annotations

from torch import Tensor

from ._base import AbstractSolver, Time, VectorField, evaluate


class Euler(AbstractSolver):
    r""":math:`y_{n+1} = y_n + \Delta t\, f(t_n, y_n)`. Order 1; the cheapest step."""

    evaluations = 1

    def step(self, f: VectorField, t: Time, dt: Time, y: Tensor, n: int) -> Tensor:
        return y + dt * evaluate(f, t, y, n)
