"""From one tensor to two streams and back, so a reversible stage fits in nn.Sequential."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .sequence import ReversibleSequential


class Split(nn.Module):
    """Two streams from the two halves of ``x`` along ``dim`` (channels by default).

    Keeps the input's size (no extra memory: the streams are views); the size along ``dim``
    must be even. The inverse of :class:`Concat` with the same ``dim``.
    """

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check_dim(self, x, self.dim)
        size = x.shape[self.dim]
        if size % 2:
            raise ValueError(
                f"Split(dim={self.dim}) needs an even size along dim {self.dim}, got shape "
                f"{tuple(x.shape)}. Make the preceding layer output an even number of "
                f"channels, or use Duplicate() to start both streams from the whole input."
            )
        x1, x2 = x.split(size // 2, dim=self.dim)
        return x1, x2

    def inverse(self, x1: Tensor, x2: Tensor) -> Tensor:
        """The tensor whose halves ``x1`` and ``x2`` are."""
        return torch.cat((x1, x2), dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Duplicate(nn.Module):
    """Both streams start as the whole input (RevViT, Re2TAL): width doubles, nothing is lost."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, x


class Concat(nn.Module):
    """One tensor from the two streams, concatenated along ``dim``."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, y1: Tensor, y2: Tensor) -> Tensor:
        _check_dim(self, y1, self.dim)
        return torch.cat((y1, y2), dim=self.dim)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """The two streams that make ``y``: its halves along ``dim``."""
        return Split(self.dim)(y)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Mean(nn.Module):
    """One tensor from the two streams, as their mean ``(y1 + y2) / 2`` (RevViT, Re2TAL)."""

    def forward(self, y1: Tensor, y2: Tensor) -> Tensor:
        return (y1 + y2) / 2


class ReversibleStage(nn.Module):
    """A reversible stack between a one-tensor input and a one-tensor output.

    ``ReversibleStage(stack, Split(1), Concat(1))`` maps ``x -> Concat(stack(*Split(x)))``,
    so it can sit in an ``nn.Sequential`` between ordinary layers (stems, downsampling,
    heads), which keep their activations the usual way.
    """

    def __init__(
        self,
        stack: ReversibleSequential,
        split: nn.Module | None = None,
        merge: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(stack, ReversibleSequential):
            raise TypeError(
                f"ReversibleStage wraps a ReversibleSequential, got {type(stack).__name__}."
            )
        self.split = split if split is not None else Split()
        self.stack = stack
        self.merge = merge if merge is not None else Concat()

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        x1, x2 = self.split(x)
        return self.merge(*self.stack(x1, x2, **kwargs))

    def inverse(self, y: Tensor, **kwargs: Any) -> Tensor:
        """The input whose output is ``y``: the merge undone, the stack inverted, the split
        undone. Trains without activations like the forward (see
        :meth:`ReversibleSequential.inverse`); needs a split and merge that lose nothing
        (:class:`Split` and :class:`Concat`)."""
        for part in (self.merge, self.split):
            if not callable(getattr(part, "inverse", None)):
                raise TypeError(
                    f"ReversibleStage.inverse needs an invertible split and merge; "
                    f"{type(part).__name__} loses information (Duplicate keeps one of two equal "
                    f"streams, Mean their average). Use Split(dim) and Concat(dim)."
                )
        y1, y2 = self.merge.inverse(y)  # type: ignore[operator]
        return self.split.inverse(*self.stack.inverse(y1, y2, **kwargs))  # type: ignore[operator]


def _check_dim(module: nn.Module, x: Tensor, dim: int) -> None:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"{type(module).__name__}(dim={dim}) got a tensor of shape {tuple(x.shape)}, which "
            f"has no dimension {dim}; pass a dim in {-x.dim()}..{x.dim() - 1} (1 for the channels "
            f"of (batch, channels, ...) inputs, -1 for the features of (..., features))."
        )
