"""The contract between couplings and the engine: two invertible half-steps."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ReversibilityError, inplace_branch_message

BRANCH_NAMES = ("f", "g")


class AbstractCoupling(nn.Module, ABC):
    r"""A reversible block on two streams, made of two invertible half-steps.

    .. math::
        y_1 = u_0\big(x_1, f(x_2)\big), \qquad y_2 = u_1\big(x_2, g(y_1)\big)

    and, running the halves in the opposite order,

    .. math::
        x_2 = u_1^{-1}\big(y_2, g(y_1)\big), \qquad x_1 = u_0^{-1}\big(y_1, f(x_2)\big).

    The trade-off: ``f`` and ``g`` are arbitrary modules that need not be invertible, and
    nothing inside them is stored during training, but every update :math:`u_k(x, h)` must be
    invertible in ``x`` for fixed ``h``, and the inverse is only as exact as floating point
    lets :math:`u_k^{-1}(u_k(x, h), h)` be. Subclasses define :meth:`update` and :meth:`revert`
    (and :meth:`branch_shape` when a branch's output is not shaped like its stream); the
    engine in :mod:`torchrev._core.function` relies on nothing else.

    ``half`` is 0 for the step that updates the first stream with ``f`` and 1 for the step
    that updates the second stream with ``g``. Keyword arguments given to the coupling (an
    attention mask, a conditioning vector) are passed to both ``f`` and ``g``.
    """

    def __init__(self, f: nn.Module, g: nn.Module) -> None:
        super().__init__()
        for name, module in (("f", f), ("g", g)):
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"{type(self).__name__}: {name} must be an nn.Module, got "
                    f"{type(module).__name__}; wrap a plain function in a small nn.Module."
                )
        self.f = f
        self.g = g

    @classmethod
    def from_factory(cls, make: Callable[[int], nn.Module], **options: Any) -> AbstractCoupling:
        """Build with fresh branches; ``make(k)`` maps a stream to ``k`` times its channels.

        Lets generic code (tests, benchmarks) build every registered coupling the same way.
        """
        return cls(make(1), make(1), **options)  # type: ignore[call-arg]

    @abstractmethod
    def update(self, x: Tensor, h: Tensor, half: int) -> Tensor:
        """Return :math:`u_{half}(x, h)`, the new value of the stream ``x``."""

    @abstractmethod
    def revert(self, y: Tensor, h: Tensor, half: int) -> Tensor:
        """Return :math:`u_{half}^{-1}(y, h)`, so that ``revert(update(x, h), h) == x``."""

    def revert_(self, y: Tensor, h: Tensor, half: int) -> Tensor:
        """:meth:`revert`, allowed to overwrite ``y`` with the result (the engine owns ``y``).

        The default allocates; couplings whose inverse is elementwise override it, which saves
        one stream-sized allocation per half-step in backward.
        """
        return self.revert(y, h, half)

    def update_vjp(
        self, x: Tensor, h: Tensor, d_y: Tensor, half: int
    ) -> tuple[Tensor, Tensor] | None:
        """``(dL/dx, dL/dh)`` of ``y = update(x, h)`` given ``dL/dy``, or None to let autograd
        differentiate :meth:`update` (the default, needed when it uses parameters).

        Couplings with a simple update override this so that the backward need not rebuild
        ``y`` to differentiate it: one stream-sized tensor less at the memory peak.
        """
        return None

    def branch(self, half: int) -> nn.Module:
        """The module whose output drives step ``half``: ``f`` for 0, ``g`` for 1."""
        return self.f if half == 0 else self.g

    def branch_shape(self, stream: Tensor, half: int) -> torch.Size:
        """The shape a branch must return for updating ``stream``; its own shape by default."""
        return stream.shape

    def run_branch(self, half: int, cond: Tensor, target: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """Evaluate ``f`` or ``g`` on ``cond`` and check its output can update ``target``."""
        name = BRANCH_NAMES[half]
        version = cond._version
        h = self.branch(half)(cond, **kwargs)
        if cond._version != version:
            raise ReversibilityError(inplace_branch_message(f"{type(self).__name__}.{name}"))
        if not isinstance(h, Tensor):
            raise TypeError(
                f"{type(self).__name__}.{name} returned {type(h).__name__}; it must return one "
                f"Tensor. If it returns a tuple (as some attention modules do), wrap it to pick "
                f"the tensor."
            )
        expected = self.branch_shape(target, half)
        if h.shape != expected:
            raise ValueError(
                f"{type(self).__name__}.{name} returned shape {tuple(h.shape)} but must return "
                f"{tuple(expected)} to update a stream of shape {tuple(target.shape)} (its input "
                f"had shape {tuple(cond.shape)}). Make {name} preserve the stream shape; "
                f"broadcasting is not applied."
            )
        return h

    def forward(self, x1: Tensor, x2: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        y1 = self.update(x1, self.run_branch(0, x2, x1, kwargs), 0)
        y2 = self.update(x2, self.run_branch(1, y1, x2, kwargs), 1)
        return y1, y2

    def inverse(self, y1: Tensor, y2: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Recover ``(x1, x2)`` from ``(y1, y2)``; the same keyword arguments as the forward."""
        x2 = self.revert(y2, self.run_branch(1, y1, y2, kwargs), 1)
        x1 = self.revert(y1, self.run_branch(0, x2, y1, kwargs), 0)
        return x1, x2
