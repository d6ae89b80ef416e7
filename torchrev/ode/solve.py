"""odeint and sdeint: the public entry points, torchdiffeq's conventions."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ._base import AbstractSolver, Grid, VectorField
from .brownian import BrownianIncrements
from .euler import Euler
from .midpoint import Midpoint
from .reversible_heun import Brownian, Problem, ReversibleHeun, parameters_of
from .rk4 import RK4

#: Solvers by name, for ``method="..."``; passing a solver object works as well.
SOLVERS: dict[str, type[AbstractSolver]] = {
    "reversible_heun": ReversibleHeun,
    "euler": Euler,
    "midpoint": Midpoint,
    "rk4": RK4,
}
NOISE_TYPES = ("diagonal", "additive")


def _solver(method: str | AbstractSolver) -> AbstractSolver:
    if isinstance(method, AbstractSolver):
        return method
    if method not in SOLVERS:
        raise ValueError(
            f"unknown method {method!r}; choose one of {', '.join(SOLVERS)} or pass a solver "
            f"object such as torchrev.ode.ReversibleHeun(adjoint=False)."
        )
    return SOLVERS[method]()


def odeint(
    f: VectorField,
    y0: Tensor,
    t: Tensor,
    *,
    method: str | AbstractSolver = "reversible_heun",
    dt: float | None = None,
    adjoint_params: Sequence[Tensor] | None = None,
) -> Tensor:
    """Solve :math:`dy/dt = f(t, y)` from ``y0`` at ``t[0]``; the solution at every ``t``.

    Returns a tensor of shape ``(len(t), *y0.shape)``. Steps are fixed, at most ``dt`` long
    (one step per interval of ``t`` if ``dt`` is None), and every time in ``t`` is a step
    boundary. With the default reversible Heun method the gradients with respect to ``y0`` and
    the parameters equal backpropagation through the same steps while memory stays constant in
    the number of steps; the other methods backpropagate through their steps. The parameters
    are those of ``f`` if it is an ``nn.Module``; otherwise pass them as ``adjoint_params``
    (a trainable tensor ``f`` reaches that is not listed raises ``ReversibilityError`` in
    backward rather than getting no gradient).
    """
    solver = _solver(method)
    grid = Grid.build(t, dt)
    if isinstance(solver, ReversibleHeun):
        params = list(adjoint_params) if adjoint_params is not None else parameters_of(f)
        return solver.solve_problem(Problem(f, None, grid, None), y0, params)
    return solver.solve(f, y0, grid)


def sdeint(
    f: VectorField,
    g: VectorField,
    y0: Tensor,
    t: Tensor,
    *,
    dt: float,
    noise: str = "diagonal",
    seed: int = 0,
    brownian: Brownian | None = None,
    method: str | AbstractSolver = "reversible_heun",
    adjoint_params: Sequence[Tensor] | None = None,
) -> Tensor:
    """Solve the Stratonovich SDE :math:`dy = f(t, y)\\,dt + g(t, y) \\circ dW` from ``y0``.

    ``g`` returns a tensor shaped like the state, multiplied elementwise by the Brownian
    increment: diagonal noise, or additive noise when ``g`` does not depend on ``y`` (say so
    with ``noise="additive"``: the method is then strong order 1 instead of 0.5). Increments
    come from ``seed`` and are regenerated, not stored, in the backward pass; ``brownian`` may
    replace them with any ``(t0, t1, n) -> W(t1) - W(t0)``. Only reversible Heun solves SDEs
    here (``ReversibleHeun(adjoint=False)`` to backpropagate through its steps instead).
    """
    if noise not in NOISE_TYPES:
        raise ValueError(f"noise must be one of {NOISE_TYPES}, got {noise!r}.")
    solver = _solver(method)
    if not isinstance(solver, ReversibleHeun):
        raise ValueError(
            f"sdeint solves with reversible Heun only (Stratonovich); got {method!r}. Use "
            f"method='reversible_heun' or ReversibleHeun(adjoint=False)."
        )
    grid = Grid.build(t, dt)
    bm = brownian or BrownianIncrements(seed, y0.shape, y0.dtype, y0.device)
    params = list(adjoint_params) if adjoint_params is not None else parameters_of(f, g)
    return solver.solve_problem(Problem(f, g, grid, bm), y0, params)
