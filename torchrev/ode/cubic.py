"""Natural cubic splines of irregularly sampled data, and the cubic-spline control path.

The trade-off: the natural cubic spline is the smoothest interpolation (twice continuously
differentiable, so the CDE's vector field :math:`f(z)\\,dX/dt` is smooth and the solver keeps
its order), but every piece depends on every observation, so the whole series must be known
before solving: for online use take :func:`~torchrev.ode.hermite_cubic_coeffs`.

Through the observed knots :math:`t_0 < \\dots < t_{M-1}` of a channel the spline's knot slopes
:math:`k_i` solve the tridiagonal system

.. math::
    \\frac{k_{i-1}}{h_{i-1}} + 2\\Big(\\frac{1}{h_{i-1}} + \\frac{1}{h_i}\\Big) k_i
    + \\frac{k_{i+1}}{h_i} = 3\\Big(\\frac{\\sigma_{i-1}}{h_{i-1}} + \\frac{\\sigma_i}{h_i}\\Big),
    \\qquad \\sigma_i = \\frac{x_{i+1} - x_i}{h_i},

with the natural ends (no :math:`i - 1` terms in the first row, no :math:`i + 1` terms in the
last: zero second derivative there). Missing values are not knots: the piece between two
observations spans them. Before its first observation and after its last a channel is constant,
as torchcde's ``natural_cubic_coeffs`` does. The system is solved for every channel of every
series at once by one sweep forwards and one back over the times.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._interpolation import (
    PiecewiseInterpolation,
    check_data,
    from_paths,
    hermite_pieces,
    neighbours,
    to_paths,
)


def natural_cubic_coeffs(x: Tensor, t: Tensor | None = None) -> Tensor:
    """Coefficients of the natural cubic spline through ``x`` ``(..., length, channels)``
    observed at ``t`` (NaN: missing), shape ``(..., length - 1, 4 * channels)``, for
    :class:`CubicSpline` (or ``torchcde.CubicSpline``). Compute them once, with the data."""
    t = check_data(x, t)
    paths = to_paths(x)
    observed = ~torch.isnan(paths)
    before, after = neighbours(observed)
    length = paths.size(-1)
    # Constant before the first and after the last observation; a channel never observed is 0.
    first = paths.gather(-1, after.clamp(max=length - 1))
    last = paths.gather(-1, before.clamp(min=0))
    paths = torch.where(before < 0, first, torch.where(after >= length, last, paths))
    paths = torch.where(observed.any(-1, keepdim=True), paths, 0.0)
    observed = ~torch.isnan(paths)
    before, after = neighbours(observed)
    slopes = _knot_slopes(t, torch.where(observed, paths, 0.0), observed)
    pieces = hermite_pieces(t, paths, slopes, before[:, :-1], after[:, 1:])
    return from_paths(pieces, x)


def _knot_slopes(t: Tensor, x: Tensor, observed: Tensor) -> Tensor:
    """The natural spline's slopes at the observed knots of every path (``(paths, length)``;
    other entries are meaningless), by the Thomas algorithm run over the times for all paths
    at once. Row ``i``'s terms in its previous gap are known when its knot is reached and those
    in its next gap when the next knot is, so each knot reached completes the row before it."""
    paths, length = x.shape
    zero = x.new_zeros(paths)
    left_diag, left_rhs = zero, zero  # row of the last knot, reduced, without its next gap
    last_t, last_x = t[0].expand(paths), x[:, 0]
    rows: list[tuple[Tensor, Tensor, Tensor]] = [(zero, zero, zero)]  # (diag, rhs, upper)
    for j in range(1, length):
        seen = observed[:, j]
        h = t[j] - last_t
        sigma = (x[:, j] - last_x) / h
        diag, rhs = left_diag + 2 / h, left_rhs + 3 * sigma / h  # the last knot's full row
        rows.append((diag, rhs, 1 / h))
        left_diag = torch.where(seen, 2 / h - 1 / (h * h * diag), left_diag)
        left_rhs = torch.where(seen, 3 * sigma / h - rhs / (h * diag), left_rhs)
        last_t = torch.where(seen, t[j], last_t)
        last_x = torch.where(seen, x[:, j], last_x)
    slope = left_rhs / left_diag  # the last time is always a knot, with no next gap
    slopes = [zero] * length
    for j in range(length - 1, 0, -1):
        slopes[j] = slope
        diag, rhs, upper = rows[j]
        slope = torch.where(observed[:, j], (rhs - upper * slope) / diag, slope)
    slopes[0] = slope
    return torch.stack(slopes, dim=-1)


class CubicSpline(PiecewiseInterpolation):
    """A piecewise cubic path from coefficients ``(..., length - 1, 4 * channels)``
    (:func:`natural_cubic_coeffs`, :func:`~torchrev.ode.hermite_cubic_coeffs`, or torchcde's):
    on piece :math:`j`, :math:`X(t) = a + b s + c s^2 + d s^3` with :math:`s = t - t_j`
    (stored as ``a, b, 2c, 3d``, torchcde's layout). ``t`` defaults to ``0, 1, ...``."""

    def __init__(self, coeffs: Tensor, t: Tensor | None = None) -> None:
        channels, rest = divmod(coeffs.size(-1), 4)
        if coeffs.ndim < 2 or rest:
            raise ValueError(
                f"coeffs must have shape (..., length - 1, 4 * channels), as "
                f"natural_cubic_coeffs(x, t) returns; got {tuple(coeffs.shape)}."
            )
        length = coeffs.size(-2) + 1
        if t is None:
            t = torch.linspace(0, length - 1, length, dtype=coeffs.dtype, device=coeffs.device)
        if t.shape != (length,):
            raise ValueError(
                f"t must hold the {length} observation times the coefficients were computed "
                f"for (one more than coeffs.size(-2)); got shape {tuple(t.shape)}."
            )
        super().__init__(t)
        # (..., pieces, 4, channels), a view: one piece's a, b, 2c, 3d in one indexing.
        self.register_buffer("_pieces", coeffs.unflatten(-1, (4, channels)))

    def _piece(self, t: Tensor | float) -> tuple[Tensor | float, tuple[Tensor, ...]]:
        s, j = self.locate(t, self._pieces)
        return s, self._pieces[..., j, :, :].unbind(-2)

    def evaluate(self, t: Tensor | float) -> Tensor:
        s, (a, b, two_c, three_d) = self._piece(t)
        if isinstance(s, float):  # a + s (b + s/2 (2c + 2s/3 3d))
            return a.add(b.add(two_c.add(three_d, alpha=2 * s / 3), alpha=s / 2), alpha=s)
        s = s.unsqueeze(-1)
        return a + (b + (0.5 * two_c + three_d * s / 3) * s) * s

    def derivative(self, t: Tensor | float) -> Tensor:
        s, (_, b, two_c, three_d) = self._piece(t)
        if isinstance(s, float):  # b + s (2c + s 3d)
            return b.add(two_c.add(three_d, alpha=s), alpha=s)
        s = s.unsqueeze(-1)
        return b + (two_c + three_d * s) * s
