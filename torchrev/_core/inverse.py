"""A reversible block run backwards, so that a stack trains through its inverse without storing
activations, as normalising flows do."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .block import AbstractReversibleBlock


class Inverted(AbstractReversibleBlock):
    r"""The inverse of ``block`` as a block of its own: its steps in reverse order, each one's
    update and revert exchanged.

    .. math:: s_{t_k} \leftarrow u_k^{-1}\big(s_{t_k}, b_k(\dots)\big), \quad k = K-1, \dots, 0

    The branches are ``block``'s own modules, so the engine's guarantees (rebuilt inputs,
    exact reversal, gradients in plain autograd's order) hold for the inverse direction as for
    the forward one, and with the block's in-place ``update_`` and ``revert_vjp`` (the
    couplings here have both) so does the memory of the forward direction.
    """

    def __init__(self, block: AbstractReversibleBlock) -> None:
        super().__init__()
        self.block = block
        self.steps = tuple(reversed(block.steps))

    def _original(self, step: int) -> int:
        return len(self.steps) - 1 - step

    @property
    def amplifies_rounding(self) -> bool:
        return self.block.amplifies_rounding

    @property
    def calls_branches_plainly(self) -> bool:
        return self.block.calls_branches_plainly

    def branch(self, step: int) -> nn.Module:
        return self.block.branch(self._original(step))

    def branch_name(self, step: int) -> str:
        return f"inverse of {self.block.branch_name(self._original(step))}"

    def branch_shape(self, target: Tensor, step: int) -> torch.Size:
        return self.block.branch_shape(target, self._original(step))

    def run_branch(
        self, step: int, sources: Sequence[Tensor], target: Tensor, kwargs: dict[str, Any]
    ) -> Tensor:
        return self.block.run_branch(self._original(step), sources, target, kwargs)

    def update(self, x: Tensor, h: Tensor, step: int) -> Tensor:
        return self.block.revert(x, h, self._original(step))

    def revert(self, y: Tensor, h: Tensor, step: int) -> Tensor:
        return self.block.update(y, h, self._original(step))

    def revert_(self, y: Tensor, h: Tensor, step: int) -> Tensor:
        return self.block.update_(y, h, self._original(step))

    def update_vjp(
        self, x: Tensor, h: Tensor, d_y: Tensor, step: int
    ) -> tuple[Tensor, Tensor] | None:
        return self.block.revert_vjp(x, h, d_y, self._original(step))

    def check_streams(self, streams: Sequence[Tensor], where: str) -> None:
        self.block.check_streams(streams, where)
