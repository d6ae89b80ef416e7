"""Momentum coupling (MomentumNet, Sander et al. 2021)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .._core.coupling import AbstractCoupling
from .._core.purity import PassThrough


class MomentumCoupling(AbstractCoupling):
    r"""A residual block with momentum, on streams ``(v, x)``: velocity first, then position.

    .. math::
        v' = \gamma v + (1 - \gamma) f(x), \qquad x' = x + v'

    with inverse :math:`x = x' - v'`, :math:`v = (v' - (1 - \gamma) f(x)) / \gamma`. A ResNet is
    the limit :math:`\gamma = 0`, which is not invertible; the inverse divides by
    :math:`\gamma`, so a small ``gamma`` costs precision (about :math:`1/\gamma` per block).
    Start the velocity at zeros and read the position stream at the end.
    """

    def __init__(self, f: nn.Module, gamma: float = 0.9) -> None:
        super().__init__(f, PassThrough())
        if not 0 < gamma < 1:
            raise ValueError(
                f"MomentumCoupling(gamma={gamma}) must lie strictly between 0 and 1: gamma=0 "
                f"is a ResNet, which cannot be inverted, and gamma=1 ignores f."
            )
        self.gamma = float(gamma)

    @classmethod
    def from_factory(cls, make: Callable[[int], nn.Module], **options: Any) -> MomentumCoupling:
        return cls(make(1), **options)

    def update(self, x: Tensor, h: Tensor, step: int) -> Tensor:
        return self.gamma * x + (1 - self.gamma) * h if step == 0 else x + h

    def revert(self, y: Tensor, h: Tensor, step: int) -> Tensor:
        return (y - (1 - self.gamma) * h) / self.gamma if step == 0 else y - h

    def revert_(self, y: Tensor, h: Tensor, step: int) -> Tensor:
        if step == 0:
            return y.sub_(h, alpha=1 - self.gamma).div_(self.gamma)
        return y.sub_(h)

    def update_(self, x: Tensor, h: Tensor, step: int) -> Tensor:
        if step == 0:
            return x.mul_(self.gamma).add_(h, alpha=1 - self.gamma)
        return x.add_(h)

    def update_vjp(
        self, x: Tensor, h: Tensor, d_y: Tensor, step: int
    ) -> tuple[Tensor | Callable[[], Tensor], Tensor]:
        if step == 0:
            return (lambda: self.gamma * d_y), (1 - self.gamma) * d_y
        return d_y, d_y

    def revert_vjp(self, y: Tensor, h: Tensor, d_x: Tensor, step: int) -> tuple[Tensor, Tensor]:
        if step == 0:
            d_y = d_x / self.gamma
            return d_y, -d_y * (1 - self.gamma)
        return d_x, -d_x

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"
