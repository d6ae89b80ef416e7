"""Linear interpolation of irregularly sampled data: the simplest control path.

The trade-off: it is causal and cheap, but its derivative jumps at every observation, so a CDE
solver loses accuracy on steps that straddle one; choose ``dt`` to divide the gaps between
observations (or use a cubic). On piece :math:`[t_j, t_{j+1}]`,
:math:`X(t) = x_j + (t - t_j)\\,\\sigma_j` with :math:`\\sigma_j = (x_{j+1} - x_j)/(t_{j+1} - t_j)`.
Missing values are filled linearly from their neighbours in the same channel (constant before
the first observation and after the last), as torchcde's ``linear_interpolation_coeffs`` does.
"""

from __future__ import annotations

from torch import Tensor

from ._interpolation import PiecewiseInterpolation, check_data, fill_linear, from_paths, to_paths


def linear_interpolation_coeffs(x: Tensor, t: Tensor | None = None) -> Tensor:
    """``x`` ``(..., length, channels)`` with its missing values (NaN) filled: the knots of
    :class:`LinearInterpolation` (or ``torchcde.LinearInterpolation``)."""
    t = check_data(x, t)
    return from_paths([fill_linear(t, to_paths(x))], x)


class LinearInterpolation(PiecewiseInterpolation):
    """The piecewise linear path through knots ``(..., length, channels)``
    (:func:`linear_interpolation_coeffs`) at times ``t`` (``0, 1, ...`` by default)."""

    def __init__(self, coeffs: Tensor, t: Tensor | None = None) -> None:
        length = coeffs.size(-2) if coeffs.ndim >= 2 else 0
        if length < 2:
            raise ValueError(
                f"coeffs must have shape (..., length, channels) with length >= 2, as "
                f"linear_interpolation_coeffs(x, t) returns; got {tuple(coeffs.shape)}."
            )
        t = check_data(coeffs, t)
        super().__init__(t)
        self.register_buffer("_knots", coeffs)
        self.register_buffer("_slopes", coeffs.diff(dim=-2) / t.diff().unsqueeze(-1))

    def evaluate(self, t: Tensor | float) -> Tensor:
        s, j = self.locate(t, self._slopes)
        knot, slope = self._knots[..., j, :], self._slopes[..., j, :]
        return knot.add(slope, alpha=s) if isinstance(s, float) else knot + s.unsqueeze(-1) * slope

    def derivative(self, t: Tensor | float) -> Tensor:
        _, j = self.locate(t, self._slopes)
        return self._slopes[..., j, :]
