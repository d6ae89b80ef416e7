"""Hermite cubic interpolation with backward differences: a smooth path for online use.

The trade-off: unlike the natural cubic spline, each piece depends only on the observations up
to its end, so the path (and a CDE driven by it) can be extended as data arrive; it is only
once continuously differentiable, where the natural spline is twice. On piece
:math:`[t_j, t_{j+1}]` it is the cubic through :math:`x_j` and :math:`x_{j+1}` with slopes
:math:`\\sigma_{j-1}` at :math:`t_j` and :math:`\\sigma_j` at :math:`t_{j+1}`, where
:math:`\\sigma_j = (x_{j+1} - x_j)/(t_{j+1} - t_j)` (the backward difference;
:math:`\\sigma_{-1} = \\sigma_0`). Missing values are first filled linearly from their
neighbours in the same channel, as torchcde's
``hermite_cubic_coefficients_with_backward_differences`` does; its coefficients equal these.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._interpolation import check_data, fill_linear, from_paths, hermite_pieces, to_paths


def hermite_cubic_coeffs(x: Tensor, t: Tensor | None = None) -> Tensor:
    """Coefficients of the Hermite cubic with backward differences through ``x``
    ``(..., length, channels)`` observed at ``t`` (NaN: missing), shape
    ``(..., length - 1, 4 * channels)``, for :class:`~torchrev.ode.CubicSpline`."""
    t = check_data(x, t)
    paths = fill_linear(t, to_paths(x))
    differences = paths.diff(dim=-1) / t.diff()
    slopes = torch.cat((differences[:, :1], differences), dim=-1)  # slope sigma_{j-1} at knot j
    index = torch.arange(paths.size(-1) - 1, device=x.device).expand(paths.size(0), -1)
    return from_paths(hermite_pieces(t, paths, slopes, index, index + 1), x)
