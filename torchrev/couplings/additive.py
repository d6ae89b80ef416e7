"""Additive coupling (RevNet, Gomez et al. 2017)."""

from __future__ import annotations

from torch import Tensor

from .._core.coupling import AbstractCoupling


class AdditiveCoupling(AbstractCoupling):
    r"""RevNet's coupling: :math:`y_1 = x_1 + f(x_2)`, :math:`y_2 = x_2 + g(y_1)`.

    The inverse subtracts what the forward added, :math:`x_2 = y_2 - g(y_1)`,
    :math:`x_1 = y_1 - f(x_2)`, so reconstruction error stays at the rounding of one addition
    per step and does not compound with depth. The trade-off against a plain residual block is
    the split: each branch sees step of the state (or a duplicate of it).
    """

    amplifies_rounding = False  # type: ignore[assignment]
    reverts_by_subtraction = True

    def update(self, x: Tensor, h: Tensor, step: int) -> Tensor:
        return x + h

    def revert(self, y: Tensor, h: Tensor, step: int) -> Tensor:
        return y - h

    def revert_(self, y: Tensor, h: Tensor, step: int) -> Tensor:
        return y.sub_(h)

    def update_(self, x: Tensor, h: Tensor, step: int) -> Tensor:
        return x.add_(h)

    def update_vjp(self, x: Tensor, h: Tensor, d_y: Tensor, step: int) -> tuple[Tensor, Tensor]:
        return d_y, d_y

    def revert_vjp(self, y: Tensor, h: Tensor, d_x: Tensor, step: int) -> tuple[Tensor, Tensor]:
        return d_x, -d_x
