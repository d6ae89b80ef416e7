"""Two-stream couplings: the reversible block of RevNet, RevViT and MEFT."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from .block import AbstractReversibleBlock


class AbstractCoupling(AbstractReversibleBlock):
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
    (step 0 is the ``f`` half, step 1 the ``g`` half), and :meth:`branch_shape` when a branch's
    output is not shaped like its stream. Keyword arguments reach both ``f`` and ``g``.
    """

    steps = ((0, (1,)), (1, (0,)))

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

    def branch(self, step: int) -> nn.Module:
        """``f`` for step 0, ``g`` for step 1."""
        return self.f if step == 0 else self.g

    def branch_name(self, step: int) -> str:
        return f"{type(self).__name__}.{'fg'[step]}"

    def check_streams(self, streams: Sequence[Tensor], where: str) -> None:
        super().check_streams(streams, where)
        a, b = streams
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            raise ValueError(
                f"{where}: the two streams must match, got shapes {tuple(a.shape)} and "
                f"{tuple(b.shape)}, dtypes {a.dtype} and {b.dtype}, devices {a.device} and "
                f"{b.device}. Split the input into equal halves (torchrev.Split) or duplicate "
                f"it (torchrev.Duplicate)."
            )
