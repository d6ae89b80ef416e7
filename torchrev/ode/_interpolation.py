"""What the interpolations of irregularly sampled data share.

A control path for :func:`~torchrev.ode.cdeint` is any object with torchcde's interface:
``evaluate(t)`` and ``derivative(t)`` (shape ``(..., channels)``), ``interval`` (first and last
time) and ``grid_points`` (the observation times). Data come as torchcde takes them: ``x`` of
shape ``(..., length, channels)`` observed at the increasing times ``t`` shared by the batch
(``0, 1, ..., length - 1`` by default), a missing observation being NaN, each channel on its
own. Irregular sampling is a common grid with NaNs where a series was not observed; time is
usually one of the channels. Coefficients are laid out as torchcde lays them out, so its
splines and these take each other's.

Missing values are filled per channel from its own observations (``fill_linear``: linearly
between the neighbouring ones, constant before the first and after the last; a channel never
observed is zero). Cubic pieces come from knot values and slopes (``hermite_pieces``).
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from ._base import describe


class AbstractInterpolation(nn.Module, ABC):
    """A control path: torchcde's interpolation interface."""

    @property
    @abstractmethod
    def grid_points(self) -> Tensor:
        """The observation times."""

    @property
    @abstractmethod
    def interval(self) -> Tensor:
        """``[t_first, t_last]``."""

    @abstractmethod
    def evaluate(self, t: Tensor | float) -> Tensor:
        """The path at ``t``: shape ``(..., channels)``."""

    @abstractmethod
    def derivative(self, t: Tensor | float) -> Tensor:
        """Its time derivative at ``t``."""


class PiecewiseInterpolation(AbstractInterpolation):
    """An interpolation by pieces between the observation times ``t`` (a buffer)."""

    def __init__(self, t: Tensor) -> None:
        super().__init__()
        self.register_buffer("_t", t)
        self._times: tuple[object, int, list[float]] = (None, -1, [])  # _t, its version, floats

    @property
    def grid_points(self) -> Tensor:
        return self._t

    @property
    def interval(self) -> Tensor:
        return torch.stack([self._t[0], self._t[-1]])

    def locate(self, t: Tensor | float, like: Tensor) -> tuple[Tensor | float, Tensor | int]:
        """The piece holding ``t`` and ``t`` minus its start. At an observation time the
        piece ending there is taken (as torchcde does); outside the interval the first or
        last piece is extended.

        A single time on the CPU that needs no gradient, which is what a solver passes at
        every step, takes a fast path: bisection in Python, the piece's coefficients as views
        and the offset as a float, so a cubic's derivative costs two operations, not ten."""
        t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
        grid = self._t
        last = len(grid) - 2
        if t.ndim == 0 and t.device.type == "cpu":
            if self._times[0] is not grid or self._times[1] != grid._version:
                self._times = (grid, grid._version, grid.tolist())
            times = self._times[2]
            time = float(t.detach())
            index = min(max(bisect.bisect_left(times, time) - 1, 0), last)
            if not t.requires_grad and not grid.requires_grad:
                return time - times[index], index
            return t - grid[index], index
        found = torch.bucketize(t.detach(), grid.detach()).sub(1).clamp(0, last)
        return t - grid[found], found


def check_data(x: Tensor, t: Tensor | None) -> Tensor:
    """The observation times for ``x`` (``0, 1, ...`` when ``t`` is None), with both checked."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2 or x.size(-2) < 2:
        raise ValueError(
            f"x must be a floating-point tensor of shape (..., length, channels) with length >= "
            f"2, missing observations as NaN; got {describe(x, dtype=True)}. One series of one "
            f"channel is x.reshape(-1, 1)."
        )
    length = x.size(-2)
    if t is None:
        return torch.linspace(0, length - 1, length, dtype=x.dtype, device=x.device)
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.shape != (length,):
        raise ValueError(
            f"t must be a 1-D floating-point tensor of the {length} observation times shared by "
            f"the batch (x.size(-2)); got {describe(t, dtype=True)}. Series observed at "
            f"different times share one grid, with NaN where a series was not observed."
        )
    if not bool(torch.isfinite(t).all()) or not bool((t.diff() > 0).all()):
        raise ValueError(f"t must be finite and strictly increasing, got {t.tolist()[:8]}...")
    return t.to(x)


def to_paths(x: Tensor) -> Tensor:
    """``(..., length, channels)`` -> ``(paths, length)``: each channel of each series a row."""
    return x.transpose(-1, -2).reshape(-1, x.size(-2))


def from_paths(pieces: list[Tensor], x: Tensor) -> Tensor:
    """Per-path coefficients ``(paths, n)`` back to ``(..., n, k * channels)``, torchcde's
    layout (the k coefficients one after the other on the last dimension)."""
    batch, channels = x.shape[:-2], x.size(-1)
    out = [p.reshape(*batch, channels, p.size(-1)).transpose(-1, -2) for p in pieces]
    return torch.cat(out, dim=-1)


def neighbours(observed: Tensor) -> tuple[Tensor, Tensor]:
    """For every position of every path: the last observed index at or before it (-1 if none)
    and the first at or after it (length if none)."""
    length = observed.size(-1)
    index = torch.arange(length, device=observed.device).expand_as(observed)
    before = torch.where(observed, index, -1).cummax(-1).values
    after = torch.where(observed, index, length).flip(-1).cummin(-1).values.flip(-1)
    return before, after


def fill_linear(t: Tensor, paths: Tensor) -> Tensor:
    """``paths`` ``(paths, length)`` with NaNs filled linearly between the neighbouring
    observations of the same path, constant before the first and after the last; a path never
    observed becomes zero."""
    observed = ~torch.isnan(paths)
    before, after = neighbours(observed)
    length = paths.size(-1)
    lo, hi = before.clamp(min=0), after.clamp(max=length - 1)
    safe = torch.where(observed, paths, 0.0)
    x_lo, x_hi = safe.gather(-1, lo), safe.gather(-1, hi)
    span = torch.where(hi > lo, t[hi] - t[lo], 1.0)
    filled = x_lo + (t - t[lo]) / span * (x_hi - x_lo)
    filled = torch.where(before < 0, x_hi, torch.where(after >= length, x_lo, filled))
    return torch.where(observed, paths, filled)


def hermite_pieces(
    t: Tensor, values: Tensor, slopes: Tensor, start: Tensor, end: Tensor
) -> list[Tensor]:
    """torchcde's cubic coefficients ``a, b, 2c, 3d`` of every piece ``[t_j, t_{j+1}]``, each
    ``(paths, length - 1)``, for the cubic through knots ``start[:, j] <= j`` and
    ``end[:, j] >= j + 1`` with the given values and slopes there, re-centred at ``t_j``.

    On a knot interval of length :math:`h` the cubic is :math:`x_p + k_p s + c s^2 + d s^3`
    with :math:`c = (3\\sigma - 2k_p - k_q)/h`, :math:`d = (k_p + k_q - 2\\sigma)/h^2`,
    :math:`\\sigma = (x_q - x_p)/h`; its Taylor coefficients at :math:`u = t_j - t_p` give the
    piece."""
    t_p, t_q = t[start], t[end]
    x_p, x_q = values.gather(-1, start), values.gather(-1, end)
    k_p, k_q = slopes.gather(-1, start), slopes.gather(-1, end)
    h = t_q - t_p
    sigma = (x_q - x_p) / h
    c = (3 * sigma - 2 * k_p - k_q) / h
    d = (k_p + k_q - 2 * sigma) / (h * h)
    u = t[:-1] - t_p
    a = x_p + u * (k_p + u * (c + u * d))
    b = k_p + u * (2 * c + 3 * d * u)
    return [a, b, 2 * c + 6 * d * u, 3 * d]
