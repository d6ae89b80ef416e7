"""Neural controlled differential equations (Kidger et al. 2020), torchcde's ``cdeint``.

A CDE :math:`z(t) = z(t_0) + \\int_{t_0}^t f(s, z(s))\\,dX(s)` is driven by a control path
:math:`X` interpolating the data (:mod:`.cubic`, :mod:`.hermite`, :mod:`.linear`, or any
object with torchcde's interface), and :math:`f(t, z)` is a ``(hidden, input)`` matrix. For
a differentiable path it is the ODE :math:`dz/dt = f(t, z)\\, dX/dt`, which is what is solved,
as torchcde solves it: with reversible Heun by default, the vector field's value on each step
is :math:`f(T_n, \\hat z_n)\\,X'(T_n)`, the same discretisation as torchcde's
``method="reversible_heun"``. The trade-off against a continuous adjoint or backpropagation:
gradients (for ``z0``, ``f``'s parameters, the path's coefficients and ``t``) equal
backpropagation through the same steps and memory stays constant in the number of steps, for
one more evaluation of ``f`` and ``X'`` per step in the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._base import AbstractSolver, describe
from .reversible_heun import ReversibleHeun
from .reversible_rk import ReversibleRK
from .solve import SOLVERS, adaptive_method, solve, solver_for, step_size


class ControlledField(nn.Module):
    """:math:`f(t, z)\\,dX/dt(t)`: the CDE's vector field as an ODE's (a module, holding the
    path and ``func`` as submodules when they are modules, so that their parameters and
    trainable buffers are found and aliased like any field's)."""

    #: Other kernels with and without grad (NOTE [grad mode of the forward], rk_adjoint.py).
    values_depend_on_grad_mode = True

    def __init__(self, X: Any, func: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.X, self.func = X, func
        self._prod = getattr(func, "prod", None)  # torchcde's f(t, z) dX/dt without the matrix

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        dx = self.X.derivative(t)
        if not isinstance(dx, Tensor) or dx.shape[:-1] != z.shape[:-1]:
            raise ValueError(
                f"X.derivative(t) returned {describe(dx)}: the control's batch dimensions must "
                f"equal z0's, {tuple(z.shape[:-1])} (all of z0's dimensions but the last, the "
                f"hidden channels). Build X from data of shape (*z0.shape[:-1], length, channels)."
            )
        if self._prod is not None:
            return self._prod(t, z, dx)
        matrix = self.func(t, z)
        want = (*z.shape, dx.size(-1))
        if not isinstance(matrix, Tensor) or matrix.shape != want:
            raise ValueError(
                f"func(t, z) must return a (..., hidden_channels, input_channels) matrix, here "
                f"{want} (z has {z.size(-1)} hidden channels, X has {dx.size(-1)} input "
                f"channels); it returned {describe(matrix)}."
            )
        if torch.is_grad_enabled() and (matrix.requires_grad or dx.requires_grad):
            # A product and a sum: with its backward, faster than a batch of tiny matmuls.
            return (matrix * dx.unsqueeze(-2)).sum(-1)
        return (matrix @ dx.unsqueeze(-1)).squeeze(-1)  # without a backward, the reverse


def cdeint(
    X: Any,
    func: Callable[[Tensor, Tensor], Tensor],
    z0: Tensor,
    t: Tensor,
    adjoint: bool = True,
    *,
    method: str | AbstractSolver = "reversible_heun",
    dt: float | None = None,
    adjoint_params: Sequence[Tensor] | None = None,
    options: dict[str, Any] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    **unsupported: Any,
) -> Tensor:
    """Solve the CDE :math:`dz = f(t, z)\\,dX(t)` from ``z0`` at ``t[0]``: torchcde's
    ``cdeint(X, func, z0, t)``.

    ``X`` is the control path: :class:`~torchrev.ode.CubicSpline`,
    :class:`~torchrev.ode.LinearInterpolation`, torchcde's, or any object with a
    ``derivative(t)`` of shape ``(*z0.shape[:-1], input_channels)``. ``func(t, z)`` returns a
    ``(*z.shape, input_channels)`` matrix (or has torchcde's ``prod(t, z, dXdt)``). Returns
    torchcde's layout, ``(*z0.shape[:-1], len(t), hidden_channels)``: the time dimension is the
    second-to-last, unlike :func:`~torchrev.ode.odeint`'s. Steps are fixed, at most ``dt``
    long; by default the smallest gap between ``X.grid_points`` (one step or more per
    observation). ``adjoint=True`` (the default) gives the reversible adjoint: exact gradients
    in memory constant in the steps; ``adjoint=False`` backpropagates through them; ``method``
    picks another solver. Parameters are found in ``func`` and ``X`` (trainable buffers of
    the path included), as :func:`~torchrev.ode.odeint` finds them; ``adjoint_params``
    replaces them. A reversible Runge-Kutta method (``method="reversible_rk4"``, ...) takes
    adaptive steps when ``rtol`` or ``atol`` is given, as in :func:`~torchrev.ode.odeint`.
    """
    if not callable(getattr(X, "derivative", None)):
        raise TypeError(
            f"X must be a control path with a derivative(t) method, such as "
            f"torchrev.ode.CubicSpline(torchrev.ode.natural_cubic_coeffs(x, t), t) or any "
            f"torchcde interpolation; got {type(X).__name__}."
        )
    if not isinstance(z0, Tensor) or z0.ndim < 1:
        raise TypeError(f"z0 must be a tensor of shape (..., hidden_channels), got {describe(z0)}.")
    if method == "reversible_heun":
        method = ReversibleHeun(adjoint=adjoint)
    elif isinstance(method, str) and method.startswith("reversible_") and method in SOLVERS:
        method = ReversibleRK(method.removeprefix("reversible_"), adjoint=adjoint)
    field = ControlledField(X, func)
    if rtol is not None or atol is not None:
        options = dict(options or {})
        solver = adaptive_method(method, options.pop("step_size", dt), rtol, atol, options)
        return solve(solver, field, None, z0, t, None, adjoint_params).movedim(0, -2)
    dt = step_size(dt, options, unsupported)
    if dt is None and isinstance(getattr(X, "grid_points", None), Tensor):
        gaps = X.grid_points.detach().diff().abs()
        dt = float(gaps.min()) if len(gaps) else None
    ys = solve(solver_for(method), field, None, z0, t, dt, adjoint_params)
    return ys.movedim(0, -2)
