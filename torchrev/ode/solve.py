"""odeint and sdeint: the public entry points, with torchdiffeq's and torchsde's conventions."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from ._base import AbstractSolver, VectorField
from ._heun import Brownian, Problem
from ._params import parameters_of
from ._rk_scheme import Terms
from ._tree import Flattened, TreeField
from .adaptive import AdaptiveSteps
from .brownian_interval import BrownianInterval
from .euler import Euler
from .grid import Grid, check_times
from .midpoint import Midpoint
from .noise import Noise
from .reversible_heun import ReversibleHeun
from .reversible_rk import ReversibleRK
from .rk4 import RK4
from .tableau import TABLEAUS

#: Solvers by name, for ``method="..."``; passing a solver object works as well.
SOLVERS: dict[str, Callable[[], AbstractSolver]] = {
    "reversible_heun": ReversibleHeun,
    "euler": Euler,
    "midpoint": Midpoint,
    "rk4": RK4,
    **{f"reversible_{name}": functools.partial(ReversibleRK, name) for name in TABLEAUS},
}


def solver_for(method: str | AbstractSolver) -> AbstractSolver:
    if isinstance(method, AbstractSolver):
        return method
    if method not in SOLVERS:
        raise ValueError(
            f"unknown method {method!r}; choose one of {', '.join(SOLVERS)} or pass a solver "
            f"object such as torchrev.ode.ReversibleRK('rk4', adjoint=False). (Adaptive steps: "
            f"a reversible method with rtol/atol, e.g. method='reversible_dopri5'.)"
        )
    return SOLVERS[method]()


def step_size(
    dt: float | None, options: dict[str, Any] | None, extra: dict[str, Any]
) -> float | None:
    """``dt``, or torchdiffeq's ``options={"step_size": ...}``; any other option of the peers
    raises with what to pass instead."""
    options = dict(options or {})
    if "step_size" in options:
        if dt is not None:
            raise TypeError(
                "pass the step either as dt= or as options={'step_size': ...}, not both."
            )
        dt = options.pop("step_size")
    unknown = sorted([*extra, *(f"options[{k!r}]" for k in options)])
    if unknown:
        raise TypeError(
            f"unsupported argument(s) {', '.join(unknown)}: pass dt= (the largest step; each "
            f"interval of t is cut into equal steps no longer than dt), or rtol=/atol= (and "
            f"options={{'max_steps': ...}}) with a reversible Runge-Kutta method for adaptive "
            f"steps."
        )
    return dt


def solve(
    solver: AbstractSolver,
    f: VectorField,
    g: VectorField | None,
    y0: Any,
    t: Tensor,
    dt: float | None,
    adjoint_params: Sequence[Tensor] | None,
    noise: Noise | None = None,
    seed: int = 0,
    brownian: Brownian | None = None,
) -> Any:
    """The shared body of odeint, sdeint and cdeint: checks, pytree states, a single time,
    the grid, and the parameters for the reversible adjoint (``noise``, ``seed`` and
    ``brownian``: the SDE's)."""
    for name, field in (("f", f), ("g", g)):
        if field is not None and not callable(field):
            raise TypeError(f"{name} must be a callable {name}(t, y), got {type(field).__name__}.")
    t = check_times(t)
    tree = Flattened.of(y0)
    if len(t) == 1:  # torchdiffeq's convention: the solution at t[0] alone is y0
        return tree_map(lambda leaf: torch.stack([leaf]), y0)
    grid = Grid.build(t, dt)
    params = parameters_of(f, g) if adjoint_params is None else _listed(adjoint_params)
    if tree is not None:
        if noise is not None and noise.kind in ("scalar", "general"):
            raise ValueError(
                "scalar and general noise need a tensor state (g returns (*state, m)); "
                "concatenate the state's tensors on the last dimension, or use diagonal noise."
            )
        y0 = tree.flatten(y0, "y0")
        f = TreeField(tree, f, "f")
        g = None if g is None else TreeField(tree, g, "g")
    if isinstance(solver, ReversibleHeun):
        ys = solver.solve_problem(Problem(f, g, grid, noise, brownian, seed), y0, params)
    elif isinstance(solver, ReversibleRK):
        terms, brownian = _terms(f, g, y0, grid, noise, seed, brownian)
        ys = solver.solve_terms(terms, y0, grid, params, brownian)
    else:
        ys = solver.solve(f, y0, grid)
    return ys if tree is None else tree.unflatten(ys)


def _terms(
    f: VectorField,
    g: VectorField | None,
    y0: Tensor,
    grid: Grid,
    noise: Noise | None,
    seed: int,
    brownian: Brownian | None,
) -> tuple[Terms, Brownian | None]:
    """The terms of a reversible Runge-Kutta solve: for an SDE, the noise shape read off
    ``g(t0, y0)`` and a :class:`BrownianInterval` unless ``brownian`` is given."""
    if g is None:
        return Terms(f), None
    with torch.no_grad():
        g0 = g(torch.as_tensor(grid.times[0], dtype=y0.dtype, device=y0.device), y0)
    resolved = (noise or Noise("diagonal")).resolve(g0, y0)
    if brownian is None:
        lo, hi = sorted((grid.times[0], grid.times[-1]))
        path = BrownianInterval(lo, hi, resolved.increment_shape, seed, y0.dtype, y0.device)
        brownian = path.increment
    return Terms(f, g, resolved), brownian


def adaptive_method(
    method: str | AbstractSolver,
    dt: float | None,
    rtol: float | None,
    atol: float | None,
    options: dict[str, Any],
) -> AbstractSolver:
    """The solver for ``method``, made adaptive when ``rtol`` or ``atol`` is given (``dt``
    is then the first step, ``options['max_steps']`` the budget)."""
    solver = solver_for(method)
    if rtol is None and atol is None:
        return solver
    if not isinstance(solver, ReversibleRK):
        raise TypeError(
            f"rtol/atol choose adaptive steps, which the reversible Runge-Kutta methods take; "
            f"got method {method!r}. Pass method='reversible_dopri5' (or 'reversible_bosh3', "
            f"'reversible_rk4'), or drop rtol/atol and pass dt for fixed steps."
        )
    settings = AdaptiveSteps(
        rtol=1e-6 if rtol is None else rtol,
        atol=1e-8 if atol is None else atol,
        max_steps=int(options.pop("max_steps", 100_000)),
        first_step=dt,
    )
    return ReversibleRK(solver.tableau, solver.lam, solver.adjoint, solver.exact, settings)


def _listed(params: Sequence[Tensor]) -> list[Tensor]:
    params = list(params)
    bad = [type(p).__name__ for p in params if not isinstance(p, Tensor)]
    if bad:
        raise TypeError(
            f"adjoint_params must be tensors (parameters of the fields, or tensors they use); "
            f"got {', '.join(bad)}. Pass list(module.parameters())."
        )
    return params


def odeint(
    f: VectorField,
    y0: Any,
    t: Tensor,
    *,
    method: str | AbstractSolver = "reversible_heun",
    dt: float | None = None,
    adjoint_params: Sequence[Tensor] | None = None,
    options: dict[str, Any] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    **unsupported: Any,
) -> Any:
    """Solve :math:`dy/dt = f(t, y)` from ``y0`` at ``t[0]``; the solution at every ``t``.

    Returns a tensor of shape ``(len(t), *y0.shape)`` (for a tuple, list or dict of tensors,
    the same structure of such tensors). Steps are fixed, at most ``dt`` long (one step per
    interval of ``t`` if ``dt`` is None; torchdiffeq's ``options={"step_size": dt}`` works too),
    and every time in ``t`` is a step boundary; ``t`` may decrease, to integrate backwards in
    time, and a single time returns ``y0[None]``. With the default reversible Heun method the
    gradients with respect to ``y0``, ``t`` and the parameters equal backpropagation through
    the same steps while memory stays constant in the number of steps; the other methods
    backpropagate through their steps. The parameters are found from ``f``: its own if it is an
    ``nn.Module``, and those of the modules and tensors requiring grad it closes over or names
    (:mod:`._params`); ``adjoint_params`` replaces them. A trainable tensor ``f`` uses that is
    neither found nor listed raises ``ReversibilityError`` at the call rather than getting no
    gradient. The reversible Runge-Kutta methods (``method="reversible_rk4"`` and the others
    of :data:`SOLVERS`, or :class:`ReversibleRK`) take adaptive steps when ``rtol`` or
    ``atol`` is given (``dt`` is then the first step, ``options={"max_steps": ...}`` the
    budget); their adjoint's gradients equal backpropagation through the same steps.
    """
    options = dict(options or {})
    if rtol is not None or atol is not None:
        solver = adaptive_method(method, options.pop("step_size", dt), rtol, atol, options)
        return solve(solver, f, None, y0, t, None, adjoint_params)
    dt = step_size(dt, options, unsupported)
    return solve(solver_for(method), f, None, y0, t, dt, adjoint_params)


def sdeint(
    f: VectorField,
    g: VectorField,
    y0: Any,
    t: Tensor,
    *,
    dt: float,
    noise: str = "diagonal",
    seed: int = 0,
    brownian: Brownian | None = None,
    method: str | AbstractSolver = "reversible_heun",
    adjoint_params: Sequence[Tensor] | None = None,
) -> Any:
    """Solve the Stratonovich SDE :math:`dy = f(t, y)\\,dt + g(t, y) \\circ dW` from ``y0``.

    ``noise`` says what ``g`` returns, as torchsde's ``noise_type`` (:mod:`.noise`):
    ``"diagonal"`` a tensor shaped like the state, multiplied elementwise by the increment;
    ``"additive"`` either shape, not depending on ``y`` (the method is then strong order 1
    instead of 0.5); ``"general"`` a ``(*y.shape, m)`` matrix driven by an ``m``-dimensional
    Brownian motion, ``"scalar"`` the same with ``m = 1``. Increments come from ``seed`` and are
    regenerated, not stored, in the backward pass; ``brownian`` may replace them with any
    ``(t0, t1, n) -> W(t1) - W(t0)``. ``t`` may decrease; gradients with respect to ``t`` are
    refused (a Brownian path has no time derivative). Only reversible Heun solves SDEs here
    (``ReversibleHeun(adjoint=False)`` to backpropagate through its steps instead). The
    reversible Runge-Kutta methods solve it too (each stage's increment
    :math:`f h + g \\Delta W`), with Brownian increments from a
    :class:`~torchrev.ode.BrownianInterval` (``seed``), consistent on any grid, adaptive
    (``ReversibleRK(..., adaptive=AdaptiveSteps(...))``) included.
    """
    kind = Noise(noise)  # checks the name
    solver = solver_for(method)
    if not isinstance(solver, (ReversibleHeun, ReversibleRK)):
        raise ValueError(
            f"sdeint solves with the reversible methods only (Stratonovich); got {method!r}. "
            f"Use method='reversible_heun', 'reversible_midpoint', ... or a ReversibleRK."
        )
    return solve(solver, f, g, y0, t, dt, adjoint_params, kind, seed, brownian)
