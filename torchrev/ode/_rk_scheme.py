"""The reversible Runge-Kutta scheme of McCallum & Foster (2024): one step each way.

Any explicit one-step method :math:`\\Psi` (:mod:`.tableau`) made reversible on two states
:math:`(y_n, z_n)`, with :math:`y_0 = z_0`:

.. math::
    y_{n+1} = \\lambda y_n + (1 - \\lambda) z_n + \\Psi_h(t_n, z_n), \\qquad
    z_{n+1} = z_n - \\Psi_{-h}(t_{n+1}, y_{n+1}),

undone in closed form:

.. math::
    z_n = z_{n+1} + \\Psi_{-h}(t_{n+1}, y_{n+1}), \\qquad
    y_n = \\big(y_{n+1} - (1 - \\lambda) z_n - \\Psi_h(t_n, z_n)\\big) / \\lambda.

The coupling :math:`\\lambda < 1` pulls the two states together (without it they may drift
apart and the method is unstable); the division by :math:`\\lambda` is what amplifies
rounding in the reverse pass, about :math:`1/\\lambda` per step, which exact reversal removes
(:mod:`.rk_adjoint`). For an SDE (Stratonovich) or a CDE each stage's increment is the
field times the control's increment: :math:`k_i = f(T_i, Z_i) h + g(T_i, Z_i) \\Delta W`.

NOTE [one op order]: the direct solve, the adjoint's forward and the adjoint's rebuilt graphs
all run :func:`forward_step` / :func:`increment` / :func:`rebuild_y`, so the values are the
same bits and the backward graphs have the same shape; the adjoint's bitwise equality with
backpropagation (under exact reversal) rests on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._base import Time, VectorField, evaluate
from .noise import Noise
from .tableau import ButcherTableau


@dataclass(frozen=True, eq=False)
class Terms:
    """A drift ``f`` and an optional diffusion ``g`` with its (resolved) noise type; the
    control increment of a stage is ``f h + g dW``."""

    f: VectorField
    g: VectorField | None = None
    noise: Noise | None = None

    def control(self, t: Time, y: Tensor, h: Time, dw: Tensor | None, n: int) -> Tensor:
        k = evaluate(self.f, t, y, n) * h
        if self.g is None or dw is None:
            return k
        g = evaluate(self.g, t, y, n, name="g", shape=self.noise.g_shape)  # type: ignore[union-attr]
        return k + self.noise.prod(g, dw)  # type: ignore[union-attr]


def increment(
    tableau: ButcherTableau,
    terms: Terms,
    t: Time,
    h: Time,
    dw: Tensor | None,
    z: Tensor,
    n: int,
    error: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """:math:`\\Psi_h(t, z)` and, if ``error``, the embedded error estimate."""
    ks: list[Tensor] = []
    # Without the error estimate, trailing stages of weight 0 (dopri5's and bosh3's last,
    # there for the estimate) are skipped.
    used = tableau.stages if error else tableau.weighted_stages
    for i, row in enumerate(tableau.a[:used]):
        stage = z
        for a, k in zip(row, ks):
            if a != 0.0:
                stage = stage + k * a
        ks.append(terms.control(t + h * tableau.c[i], stage, h, dw, n))
    psi = _combine(tableau.b, ks)
    if not error:
        return psi, None
    with torch.no_grad():
        return psi, _combine(tableau.b_error, ks)  # type: ignore[arg-type]


def _combine(weights: tuple[float, ...], ks: list[Tensor]) -> Tensor:
    terms = [k * w for w, k in zip(weights, ks) if w != 0.0]
    out = terms[0]
    for term in terms[1:]:
        out = out + term
    return out


@dataclass(frozen=True)
class Step:
    """A step's result and the two increments it evaluated (which the reverse step needs)."""

    y: Tensor
    z: Tensor
    p1: Tensor  # Psi_h(t_n, z_n)
    p2: Tensor  # Psi_{-h}(t_{n+1}, y_{n+1})


def combine_y(lam: float, y: Tensor, z: Tensor, p1: Tensor) -> Tensor:
    """:math:`\\lambda y + (1 - \\lambda) z + p_1`."""
    return y * lam + z * (1.0 - lam) + p1


def forward_step(
    tableau: ButcherTableau,
    terms: Terms,
    lam: float,
    times: tuple[Time, Time, Time],
    dw: Tensor | None,
    y: Tensor,
    z: Tensor,
    n: int,
    p1: Tensor | None = None,
) -> Step:
    """Step ``n`` from :math:`(y_n, z_n)`; ``times`` is :math:`(t_n, t_{n+1}, h_n)`. ``p1``,
    when given, is :math:`\\Psi_h(t_n, z_n)` already evaluated (by an adaptive step's error
    estimate)."""
    t0, t1, h = times
    if p1 is None:
        p1 = increment(tableau, terms, t0, h, dw, z, n)[0]
    y1 = combine_y(lam, y, z, p1)
    p2 = increment(tableau, terms, t1, -h, _neg(dw), y1, n)[0]
    return Step(y1, z - p2, p1, p2)


def _neg(dw: Tensor | None) -> Tensor | None:
    return None if dw is None else -dw


def rebuild_z(z1: Tensor, p2: Tensor) -> Tensor:
    """:math:`z_n = z_{n+1} + \\Psi_{-h}(t_{n+1}, y_{n+1})`, without grad."""
    with torch.no_grad():
        return z1 + p2


def rebuild_y(lam: float, y1: Tensor, z0: Tensor, p1: Tensor) -> Tensor:
    """:math:`y_n = (y_{n+1} - (1 - \\lambda) z_n - \\Psi_h(t_n, z_n)) / \\lambda`, without
    grad."""
    with torch.no_grad():
        return (y1 - z0 * (1.0 - lam) - p1) / lam


def reverse_increments(
    tableau: ButcherTableau,
    terms: Terms,
    times: tuple[Time, Time, Time],
    dw: Tensor | None,
    y1: Tensor,
    n: int,
) -> Tensor:
    """:math:`\\Psi_{-h}(t_{n+1}, y_{n+1})`, the first evaluation of a reverse step."""
    _, t1, h = times
    return increment(tableau, terms, t1, -h, _neg(dw), y1, n)[0]
