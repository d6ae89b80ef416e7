"""Affine coupling with a bounded scale (RealNVP/Glow style, on both halves)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .._core.coupling import AbstractCoupling


class AffineCoupling(AbstractCoupling):
    r"""Scale and shift: :math:`y_1 = x_1 \odot s_f + t_f`, :math:`y_2 = x_2 \odot s_g + t_g`.

    ``f`` returns ``(log_scale, shift)`` concatenated along ``dim``, twice the size of a stream
    there, and :math:`s = \exp(b \tanh(\text{log\_scale} / b))` keeps every scale within
    :math:`[e^{-b}, e^{b}]` (``b = bound``). The multiplicative update is more expressive than
    the additive one, but the inverse divides by :math:`s`, so error can grow with depth by up
    to :math:`e^{b}` per step: a smaller ``bound`` trades expressiveness for exactness.
    """

    def __init__(self, f: nn.Module, g: nn.Module, bound: float = 2.0, dim: int = 1) -> None:
        super().__init__(f, g)
        if not bound > 0:
            raise ValueError(f"AffineCoupling(bound={bound}) must be positive, e.g. 2.0.")
        self.bound = float(bound)
        self.dim = dim

    @classmethod
    def from_factory(cls, make: Callable[[int], nn.Module], **options: Any) -> AffineCoupling:
        return cls(make(2), make(2), **options)

    def branch_shape(self, stream: Tensor, step: int) -> torch.Size:
        shape = list(stream.shape)
        shape[self.dim] *= 2
        return torch.Size(shape)

    def _scale_shift(self, h: Tensor) -> tuple[Tensor, Tensor]:
        log_scale, shift = h.chunk(2, dim=self.dim)
        return torch.exp(self.bound * torch.tanh(log_scale / self.bound)), shift

    def update(self, x: Tensor, h: Tensor, step: int) -> Tensor:
        scale, shift = self._scale_shift(h)
        return x * scale + shift

    def revert(self, y: Tensor, h: Tensor, step: int) -> Tensor:
        scale, shift = self._scale_shift(h)
        return (y - shift) / scale

    def extra_repr(self) -> str:
        return f"bound={self.bound}, dim={self.dim}"
