"""Butcher tableaus of explicit Runge-Kutta methods, with optional embedded error weights.

An explicit method with stages :math:`i = 1..s` takes a step of size :math:`h` from
:math:`(t, z)` as

.. math::
    Z_i = z + \\sum_{j<i} a_{ij} k_j, \\qquad k_i = h\\, f(t + c_i h, Z_i), \\qquad
    \\Psi_h(t, z) = \\sum_i b_i k_i,

so :math:`z + \\Psi_h(t, z)` is the method's step. Embedded weights :math:`\\hat b` of a
lower-order method on the same stages give the local error estimate
:math:`\\sum_i (b_i - \\hat b_i) k_i` at no extra evaluation, of order ``error_order + 1``,
which adaptive step-size control (:mod:`.adaptive`) uses. The trade-off between the tableaus
here: more stages buy order (error :math:`O(h^p)`) for more evaluations per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge-Kutta tableau: ``a`` (row ``i`` has the ``i`` coefficients below the
    diagonal), weights ``b``, nodes ``c`` (``c[i] == sum(a[i])``), the method's ``order`` and,
    for adaptive steps, ``b_error = b - b_hat`` and the embedded method's ``error_order``."""

    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[float, ...]
    order: int
    b_error: tuple[float, ...] | None = None
    error_order: int | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        s = len(self.b)
        if s == 0 or len(self.c) != s or len(self.a) != s:
            raise ValueError(
                f"a tableau of s stages needs s weights b, s nodes c and s rows of a; got "
                f"{len(self.b)} weights, {len(self.c)} nodes and {len(self.a)} rows."
            )
        for i, row in enumerate(self.a):
            if len(row) != i:
                raise ValueError(
                    f"row {i} of a must hold the {i} coefficients left of the diagonal (an "
                    f"explicit method); got {len(row)}. Write a as ((), (a21,), (a31, a32), ...)."
                )
            if not math.isclose(sum(row), self.c[i], abs_tol=1e-12):
                raise ValueError(
                    f"c[{i}] = {self.c[i]} must equal the sum of row {i} of a ({sum(row)}); "
                    f"the stages would otherwise see the wrong times."
                )
        if not math.isclose(sum(self.b), 1.0, abs_tol=1e-12):
            raise ValueError(f"the weights b must sum to 1 (consistency), got {sum(self.b)}.")
        if (self.b_error is None) != (self.error_order is None):
            raise ValueError("give b_error and error_order together (or neither).")
        if self.b_error is not None and (
            len(self.b_error) != s or not math.isclose(sum(self.b_error), 0.0, abs_tol=1e-12)
        ):
            raise ValueError(
                "b_error = b - b_hat must have one entry per stage and sum to 0 (both weight "
                "vectors sum to 1)."
            )

    @property
    def stages(self) -> int:
        return len(self.b)

    @property
    def weighted_stages(self) -> int:
        """The stages up to the last of non-zero weight: all the step itself needs."""
        return max(i for i, b in enumerate(self.b) if b != 0.0) + 1

    @property
    def adaptive(self) -> bool:
        """Whether the tableau carries an embedded error estimate."""
        return self.b_error is not None


def _error(b: tuple[float, ...], b_hat: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(x - y for x, y in zip(b, b_hat))


EULER = ButcherTableau(a=((),), b=(1.0,), c=(0.0,), order=1, name="euler")
#: Explicit midpoint; the embedded estimate is Euler's.
MIDPOINT = ButcherTableau(
    a=((), (0.5,)),
    b=(0.0, 1.0),
    c=(0.0, 0.5),
    order=2,
    b_error=_error((0.0, 1.0), (1.0, 0.0)),
    error_order=1,
    name="midpoint",
)
#: Ralston's third-order method (minimal error bound); embedded: the midpoint rule on its stages.
RALSTON3 = ButcherTableau(
    a=((), (0.5,), (0.0, 0.75)),
    b=(2 / 9, 1 / 3, 4 / 9),
    c=(0.0, 0.5, 0.75),
    order=3,
    b_error=_error((2 / 9, 1 / 3, 4 / 9), (0.0, 1.0, 0.0)),
    error_order=2,
    name="ralston3",
)
#: Bogacki-Shampine 3(2), the embedded pair of MATLAB's ode23.
BOSH3 = ButcherTableau(
    a=((), (0.5,), (0.0, 0.75), (2 / 9, 1 / 3, 4 / 9)),
    b=(2 / 9, 1 / 3, 4 / 9, 0.0),
    c=(0.0, 0.5, 0.75, 1.0),
    order=3,
    b_error=_error((2 / 9, 1 / 3, 4 / 9, 0.0), (7 / 24, 1 / 4, 1 / 3, 1 / 8)),
    error_order=2,
    name="bosh3",
)
#: Classical RK4; its stages admit no distinct third-order method, so the embedded estimate
#: is the second-order one with weights (0, 0, 1, 0).
RK4 = ButcherTableau(
    a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
    c=(0.0, 0.5, 0.5, 1.0),
    order=4,
    b_error=_error((1 / 6, 1 / 3, 1 / 3, 1 / 6), (0.0, 0.0, 1.0, 0.0)),
    error_order=2,
    name="rk4",
)
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
#: Dormand-Prince 5(4), the pair of torchdiffeq's and MATLAB's dopri5 / ode45.
DOPRI5 = ButcherTableau(
    a=(
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        _DP_B[:6],
    ),
    b=_DP_B,
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    order=5,
    b_error=_error(
        _DP_B, (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
    ),
    error_order=4,
    name="dopri5",
)

#: The named tableaus, for ``ReversibleRK("rk4")`` and ``method="reversible_rk4"``.
TABLEAUS: dict[str, ButcherTableau] = {
    t.name: t for t in (EULER, MIDPOINT, RALSTON3, BOSH3, RK4, DOPRI5)
}
