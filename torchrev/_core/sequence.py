"""ReversibleSequential: a stack of couplings whose training step stores no activations."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .coupling import AbstractCoupling
from .function import reversible_forward


class ReversibleSequential(nn.ModuleList):
    r"""Couplings applied in order to a pair of streams, trained without stored activations.

    The trade-off: in training, memory for activations stays that of one block whatever the
    depth, and each block is computed once more in backward (about 4/3 the time of a plain
    step). Gradients are those of plain autograd, up to floating-point rounding of the inverse.

    Called as ``stack(x1, x2, **kwargs)`` it returns ``(y1, y2)``; keyword arguments reach
    every ``f`` and ``g``, and tensors among them that require grad receive gradients.
    ``stack.inverse(y1, y2, **kwargs)`` returns ``(x1, x2)``.

    The memory-free path runs when the module is training, grad mode is on, something
    requires grad and ``reversible`` is true. Otherwise (``torch.no_grad()``, ``eval()``,
    ``reversible=False``) the couplings run as ordinary modules under plain autograd, with no
    overhead: ``reversible=False`` is the reference the tests compare against.

    Contract for ``f`` and ``g``: they depend only on their input, the keyword arguments, and
    their own parameters and buffers, and give the same output when rerun under the same RNG
    and autocast state. :func:`torchrev.check_reversibility` tests a stack against it.
    """

    def __init__(self, *couplings: AbstractCoupling, reversible: bool = True) -> None:
        super().__init__(couplings)
        for index, coupling in enumerate(couplings):
            _check_coupling(coupling, index)
        self.reversible = reversible

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return ReversibleSequential(*list(self)[index], reversible=self.reversible)
        return super().__getitem__(index)

    def forward(self, x1: Tensor, x2: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        _check_streams("forward", x1, x2)
        couplings = list(self)
        for index, coupling in enumerate(couplings):
            _check_coupling(coupling, index)
        if self.reversible and self.training and self._needs_grad(x1, x2, kwargs):
            return reversible_forward(couplings, x1, x2, kwargs)
        for coupling in couplings:
            x1, x2 = coupling(x1, x2, **kwargs)
        return x1, x2

    def inverse(self, y1: Tensor, y2: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Recover the inputs from the outputs, running the couplings' inverses top down."""
        _check_streams("inverse", y1, y2)
        for coupling in reversed(list(self)):
            y1, y2 = coupling.inverse(y1, y2, **kwargs)
        return y1, y2

    def _needs_grad(self, x1: Tensor, x2: Tensor, kwargs: dict[str, Any]) -> bool:
        if not torch.is_grad_enabled():
            return False
        tensors = [x1, x2, *(v for v in kwargs.values() if isinstance(v, Tensor))]
        return any(t.requires_grad for t in tensors) or any(
            p.requires_grad for p in self.parameters()
        )

    def extra_repr(self) -> str:
        return f"reversible={self.reversible}"


def _check_coupling(coupling: object, index: int) -> None:
    if not isinstance(coupling, AbstractCoupling):
        raise TypeError(
            f"ReversibleSequential item {index} is a {type(coupling).__name__}, not a coupling. "
            f"Wrap each block, e.g. AdditiveCoupling(f, g); non-reversible layers "
            f"(downsampling, heads) go outside the stack, in an ordinary nn.Sequential."
        )


def _check_streams(where: str, a: Tensor, b: Tensor) -> None:
    for name, t in (("first", a), ("second", b)):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"ReversibleSequential.{where} takes two tensor streams; the {name} is a "
                f"{type(t).__name__}. Use torchrev.Split or torchrev.Duplicate to make two "
                f"streams from one tensor."
            )
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ValueError(
            f"ReversibleSequential.{where}: the two streams must match, got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}, dtypes {a.dtype} and {b.dtype}, devices "
            f"{a.device} and {b.device}. Split the input into equal halves (torchrev.Split) or "
            f"duplicate it (torchrev.Duplicate)."
        )
