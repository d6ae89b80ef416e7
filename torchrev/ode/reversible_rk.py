"""Reversible Runge-Kutta methods of any order (McCallum & Foster 2024, arXiv 2410.11648).

Any explicit tableau :math:`\\Psi` (:mod:`.tableau`) on two states, :math:`y_0 = z_0`:

.. math::
    y_{n+1} = \\lambda y_n + (1 - \\lambda) z_n + \\Psi_h(t_n, z_n), \\qquad
    z_{n+1} = z_n - \\Psi_{-h}(t_{n+1}, y_{n+1}),

inverted in closed form by dividing by :math:`\\lambda` (:mod:`._rk_scheme`). The method keeps
the order of its tableau (1 to 5 here), needs two passes of the tableau's stages per step
(``2 s`` evaluations, against reversible Heun's one), and is stable on a non-empty linear
region for :math:`\\lambda < 1` (reversible Heun's is the imaginary segment only). The
trade-off against reversible Heun: more evaluations per step, for higher order and damped
stability; against backpropagation through the tableau itself: twice the evaluations, for
memory that does not grow with the steps. Its default gradient is the reversible adjoint
(:mod:`.rk_adjoint`), whose gradients equal backpropagation through the same steps, bit for
bit under exact reversal (``exact``, on by default whenever :math:`\\lambda \\ne 1`, where the
division amplifies rounding; it stores a few bits per state element per step). Steps are
fixed (at most ``dt``) or adaptive (``adaptive=AdaptiveSteps(...)``, :mod:`.adaptive`), the
accepted times being kept for the backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ._base import AbstractSolver, Time, VectorField
from ._params import parameters_of
from ._rk_march import Brownian, RKProblem, march
from ._rk_scheme import Terms
from .adaptive import AdaptiveSteps
from .grid import Grid
from .rk_adjoint import RKAdjoint
from .tableau import TABLEAUS, ButcherTableau


class ReversibleRK(AbstractSolver):
    """A reversible Runge-Kutta method from ``tableau`` (a :class:`ButcherTableau` or one of
    ``"euler"``, ``"midpoint"``, ``"ralston3"``, ``"bosh3"``, ``"rk4"``, ``"dopri5"``).

    ``lam`` in ``(0, 1]`` couples the two states (0.999, the paper's default);
    ``adjoint=False`` backpropagates through the steps instead (the reference the adjoint is
    tested against); ``exact`` ``True``/``False``/``"auto"`` (exact when ``lam != 1``);
    ``adaptive`` chooses the steps from the tableau's embedded error estimate.
    """

    def __init__(
        self,
        tableau: ButcherTableau | str = "rk4",
        lam: float = 0.999,
        adjoint: bool = True,
        exact: bool | Literal["auto"] = "auto",
        adaptive: AdaptiveSteps | None = None,
    ) -> None:
        if isinstance(tableau, str):
            if tableau not in TABLEAUS:
                raise ValueError(
                    f"unknown tableau {tableau!r}; choose one of {', '.join(TABLEAUS)} or pass "
                    f"a torchrev.ode.ButcherTableau."
                )
            tableau = TABLEAUS[tableau]
        if not 0.0 < lam <= 1.0:
            raise ValueError(
                f"lam must lie in (0, 1] (the reverse step divides by it; 0.999 is the usual "
                f"choice, smaller values damp more), got {lam}."
            )
        if exact not in (True, False, "auto"):
            raise ValueError(f"exact must be True, False or 'auto', got {exact!r}.")
        if adaptive is not None and not tableau.adaptive:
            raise ValueError(
                f"adaptive steps need a tableau with an embedded error estimate (b_error); "
                f"{tableau.name!r} has none. Use 'bosh3', 'rk4', 'dopri5', 'midpoint' or "
                f"'ralston3', or pass dt for fixed steps."
            )
        self.tableau, self.lam, self.adjoint = tableau, float(lam), adjoint
        self.exact = (lam != 1.0) if exact == "auto" else bool(exact)
        self.adaptive = adaptive

    @property
    def evaluations(self) -> int:  # type: ignore[override]
        return 2 * self.tableau.weighted_stages

    def __repr__(self) -> str:
        return (
            f"ReversibleRK({self.tableau.name!r}, lam={self.lam}, adjoint={self.adjoint}, "
            f"exact={self.exact}, adaptive={self.adaptive})"
        )

    def step(self, f: VectorField, t: Time, dt: Time, y: Tensor, n: int) -> Tensor:
        raise NotImplementedError(
            "a reversible Runge-Kutta method carries an auxiliary state between steps; call "
            "solve() (or torchrev.ode.odeint), not step()"
        )

    def solve(self, f: VectorField, y0: Tensor, grid: Grid) -> Tensor:
        return self.solve_terms(Terms(f), y0, grid, parameters_of(f))

    def solve_terms(
        self,
        terms: Terms,
        y0: Tensor,
        grid: Grid,
        params: Sequence[Tensor],
        brownian: Brownian | None = None,
    ) -> Tensor:
        """The solution at the grid's output times; ``params`` are the tensors the adjoint
        returns gradients for. With adaptive steps only the grid's output times are used."""
        if self.adaptive is not None and grid.source is not None:
            raise ValueError(
                "gradients with respect to t are not defined for adaptive steps here (the "
                "accepted times depend on t through the controller); pass t.detach(), or fixed "
                "steps (dt=...) to differentiate t."
            )
        if terms.g is not None and grid.source is not None:
            raise ValueError(
                "gradients with respect to t are not defined for an SDE: a Brownian path has "
                "no time derivative. Pass t.detach()."
            )
        targets = tuple(grid.times[n] for n in grid.outputs)
        problem = RKProblem(self.tableau, self.lam, terms, grid, targets, self.adaptive, brownian)
        if not (self.adjoint and torch.is_grad_enabled()):
            return torch.stack(march(problem, y0, detach=False)[0])
        trainable = [p for p in params if p.requires_grad]
        return RKAdjoint.apply(problem, self.exact, trainable, y0, grid.source, *trainable)
