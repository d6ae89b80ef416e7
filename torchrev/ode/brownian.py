"""Brownian increments that are regenerated from a seed, never stored."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class BrownianIncrements:
    """Independent increments :math:`\\Delta W_n \\sim N(0, |\\Delta t_n|)` drawn per step.

    Increment ``n`` comes from its own generator seeded by ``(seed, n)``, so the backward pass
    draws exactly the forward's increments again, in any order, at no memory cost. Any callable
    ``(t0, t1, n) -> Tensor`` giving :math:`W(t_1) - W(t_0)` can stand in for it (for example
    one built from a finer path, to measure strong convergence). Normals are drawn in float32
    (four times faster than float64 on a CPU) and cast: the path is as good a sample of
    Brownian motion, and it is reproduced exactly. Backwards in time (``t1 < t0``) the increment
    has the same law, :math:`N(0, t_0 - t_1)`.
    """

    def __init__(self, seed: int, shape: torch.Size, dtype: torch.dtype, device: torch.device):
        self.seed, self.shape, self.dtype, self.device = seed, torch.Size(shape), dtype, device

    def __call__(self, t0: float, t1: float, n: int) -> Tensor:
        generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + n)
        draw = torch.float32 if self.dtype == torch.float64 else self.dtype
        noise = torch.randn(self.shape, generator=generator, dtype=draw, device=self.device)
        return noise.to(self.dtype).mul_(math.sqrt(abs(t1 - t0)))
