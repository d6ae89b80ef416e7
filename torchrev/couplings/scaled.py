"""Scaled additive coupling (MEFT, Liao et al. 2023)."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor, nn

from .._core.coupling import AbstractCoupling


class ScaledCoupling(AbstractCoupling):
    r"""MEFT's coupling: :math:`y_1 = \lambda x_1 + f(x_2)`, :math:`y_2 = \beta x_2 + g(y_1)`.

    Scaling a stream down lets a pretrained layer dominate it, which is how MEFT turns a
    pretrained residual network reversible without retraining it. The price is numerical: the
    inverse divides by :math:`\lambda` and :math:`\beta`, so reconstruction error grows by
    about :math:`|J|/\lambda` per block (with :math:`\lambda = 0.1` in float32 a 12-block stack
    can lose every digit). Measure with :func:`torchrev.check_reversibility` before training.
    """

    def __init__(self, f: nn.Module, g: nn.Module, lam: float = 1.0, beta: float = 1.0) -> None:
        super().__init__(f, g)
        for name, value in (("lam", lam), ("beta", beta)):
            if not math.isfinite(value) or value == 0:
                raise ValueError(
                    f"ScaledCoupling({name}={value}) is not invertible: the inverse divides by "
                    f"{name}. Use a finite non-zero value (MEFT uses 0.1 or 1)."
                )
        self.lam = float(lam)
        self.beta = float(beta)

    @property
    def amplifies_rounding(self) -> bool:
        return abs(self.lam) < 1 or abs(self.beta) < 1

    def _scale(self, step: int) -> float:
        return self.lam if step == 0 else self.beta

    def update(self, x: Tensor, h: Tensor, step: int) -> Tensor:
        return self._scale(step) * x + h

    def revert(self, y: Tensor, h: Tensor, step: int) -> Tensor:
        return (y - h) / self._scale(step)

    def revert_(self, y: Tensor, h: Tensor, step: int) -> Tensor:
        return y.sub_(h).div_(self._scale(step))

    def update_(self, x: Tensor, h: Tensor, step: int) -> Tensor:
        return x.mul_(self._scale(step)).add_(h)

    def update_vjp(
        self, x: Tensor, h: Tensor, d_y: Tensor, step: int
    ) -> tuple[Tensor | Callable[[], Tensor], Tensor]:
        scale = self._scale(step)
        return (d_y if scale == 1 else lambda: scale * d_y), d_y  # 1 * d_y is d_y, bit for bit

    def revert_vjp(self, y: Tensor, h: Tensor, d_x: Tensor, step: int) -> tuple[Tensor, Tensor]:
        d_y = d_x / self._scale(step)
        return d_y, -d_y

    def extra_repr(self) -> str:
        return f"lam={self.lam}, beta={self.beta}"
