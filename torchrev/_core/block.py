"""The contract between reversible blocks and the engine: a fixed order of invertible steps."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ReversibilityError, inplace_branch_message

StepSpec = tuple[int, tuple[int, ...]]


class AbstractReversibleBlock(nn.Module, ABC):
    r"""A block that updates a tuple of streams one at a time, each step invertible.

    Step ``k`` of the block replaces the stream :math:`s_{t_k}` by

    .. math::
        s_{t_k} \leftarrow u_k\big(s_{t_k},\; b_k(s_{j} : j \in S_k)\big)

    where :math:`b_k` is an arbitrary module (the step's *branch*) reading other streams
    :math:`S_k` (``t_k`` not among them) and :math:`u_k(x, h)` is invertible in ``x`` for fixed
    ``h``. Running the steps backwards, :math:`s_{t_k} = u_k^{-1}(s_{t_k}, b_k(\dots))` recovers
    the block's input from its output, which is all the engine needs to train without storing
    activations: branches are recomputed once each, in backward, and never inverted.

    The trade-off is the structure: each step sees only the other streams, and the inverse is
    exact only up to the floating-point rounding of :math:`u_k^{-1}(u_k(x, h), h)`.

    Subclasses give :attr:`steps` (``(t_k, S_k)`` in order), :meth:`branch`, :meth:`update` and
    :meth:`revert`; :meth:`branch_shape`, :meth:`revert_` and :meth:`update_vjp` are optional.
    Keyword arguments of a call reach every branch.
    """

    #: ``(target, sources)`` of each step, in the order the forward runs them.
    steps: tuple[StepSpec, ...]

    @property
    def amplifies_rounding(self) -> bool:
        """Whether :meth:`revert` can lose more than the rounding of one operation per step,
        as an inverse that divides by a scale below one does. Stacks with ``exact="auto"``
        reverse exactly when any block says so; blocks that only add (the additive coupling)
        override this with False. True unless a block knows better."""
        return True

    #: Whether every step's :meth:`revert` is ``y - h`` and :meth:`revert_` ``y.sub_(h)``: one
    #: operation, rounded once either way, so exact reversal may rebuild in place (a
    #: stream-sized allocation and pass less per step in backward) and, on the CPU, code its
    #: correction while it subtracts (the forward never writes the rebuilt input out). False
    #: unless a block knows: ``(y - h) / s`` rounds twice in place on 16-bit streams.
    reverts_by_subtraction: bool = False

    @property
    def num_streams(self) -> int:
        return 1 + max(max(t, *s) for t, s in self.steps)

    @property
    def calls_branches_plainly(self) -> bool:
        """Whether :meth:`run_branch` is the base class's, which computes nothing around the
        branch (a block that overrides it may compute anything; see NOTE [pure branches])."""
        return type(self).run_branch is AbstractReversibleBlock.run_branch

    @abstractmethod
    def branch(self, step: int) -> nn.Module:
        """The module whose output drives step ``step``."""

    @abstractmethod
    def update(self, x: Tensor, h: Tensor, step: int) -> Tensor:
        """Return :math:`u_k(x, h)`, the new value of the target stream ``x``."""

    @abstractmethod
    def revert(self, y: Tensor, h: Tensor, step: int) -> Tensor:
        """Return :math:`u_k^{-1}(y, h)`, so that ``revert(update(x, h), h) == x``."""

    def revert_(self, y: Tensor, h: Tensor, step: int) -> Tensor:
        """:meth:`revert`, allowed to overwrite ``y`` with the result (the engine owns ``y``).

        The default allocates; blocks whose inverse is elementwise override it, which saves
        one stream-sized allocation per step in backward.
        """
        return self.revert(y, h, step)

    def update_vjp(
        self, x: Tensor, h: Tensor, d_y: Tensor, step: int
    ) -> tuple[Tensor | Callable[[], Tensor], Tensor] | None:
        """``(dL/dx, dL/dh)`` of ``y = update(x, h)`` given ``dL/dy``, or None to let autograd
        differentiate :meth:`update` (the default, needed when it uses parameters).

        Simple updates override this so that the backward need not rebuild ``y`` to
        differentiate it: one stream-sized tensor less at the memory peak. ``dL/dx`` may come
        as a function that computes it (``lambda: lam * d_y``): the engine calls it once the
        branch is differentiated, so that it is not alive during the branch's backward, one
        stream-sized tensor less again.
        """
        return None

    def update_(self, x: Tensor, h: Tensor, step: int) -> Tensor:
        """:meth:`update`, allowed to overwrite ``x`` with the result; used, as :meth:`revert_`
        is, when the block runs backwards (``stack.inverse`` in training)."""
        return self.update(x, h, step)

    def revert_vjp(
        self, y: Tensor, h: Tensor, d_x: Tensor, step: int
    ) -> tuple[Tensor, Tensor] | None:
        """``(dL/dy, dL/dh)`` of ``x = revert(y, h)`` given ``dL/dx``, or None: what
        :meth:`update_vjp` is to the forward direction, for the inverse one."""
        return None

    def branch_shape(self, target: Tensor, step: int) -> torch.Size:
        """The shape a branch must return to update ``target``; ``target``'s own by default."""
        return target.shape

    def branch_name(self, step: int) -> str:
        return f"{type(self).__name__}.branch({step})"

    def check_streams(self, streams: Sequence[Tensor], where: str) -> None:
        """Raise a clear error if ``streams`` cannot be this block's input."""
        if len(streams) != self.num_streams or not all(isinstance(s, Tensor) for s in streams):
            got = ", ".join(type(s).__name__ for s in streams)
            raise TypeError(
                f"{where}: {type(self).__name__} takes {self.num_streams} tensor streams, got "
                f"({got})."
            )

    def run_branch(
        self, step: int, sources: Sequence[Tensor], target: Tensor, kwargs: dict[str, Any]
    ) -> Tensor:
        """Evaluate step ``step``'s branch and check its output can update ``target``."""
        # Under torch.compile (the plain path: eval, no_grad, reversible=False) version counters
        # cannot be read without breaking the graph; autograd's own checks still apply there.
        compiling = torch.compiler.is_compiling()
        versions = [] if compiling else [s._version for s in sources]
        h = self.branch(step)(*sources, **kwargs)
        if any(s._version != v for s, v in zip(sources, versions)):
            raise ReversibilityError(inplace_branch_message(self.branch_name(step)))
        if not isinstance(h, Tensor):
            raise TypeError(
                f"{self.branch_name(step)} returned {type(h).__name__}; it must return one "
                f"Tensor. If it returns a tuple (as some attention modules do), wrap it to pick "
                f"the tensor."
            )
        expected = self.branch_shape(target, step)
        if h.shape != expected:
            shapes = ", ".join(str(tuple(s.shape)) for s in sources)
            raise ValueError(
                f"{self.branch_name(step)} returned shape {tuple(h.shape)} but must return "
                f"{tuple(expected)} to update a stream of shape {tuple(target.shape)} (its input "
                f"had shape {shapes}). Make it preserve the stream shape; broadcasting is not "
                f"applied."
            )
        return h

    def forward(self, *streams: Tensor, **kwargs: Any) -> tuple[Tensor, ...]:
        values = list(streams)
        for step, (target, sources) in enumerate(self.steps):
            h = self.run_branch(step, [values[j] for j in sources], values[target], kwargs)
            values[target] = self.update(values[target], h, step)
        return tuple(values)

    def inverse(self, *streams: Tensor, **kwargs: Any) -> tuple[Tensor, ...]:
        """Recover the block's input from its output; the same keyword arguments."""
        values = list(streams)
        for step in reversed(range(len(self.steps))):
            target, sources = self.steps[step]
            h = self.run_branch(step, [values[j] for j in sources], values[target], kwargs)
            values[target] = self.revert(values[target], h, step)
        return tuple(values)


def check_steps(block: AbstractReversibleBlock) -> None:
    """Raise if a step reads the stream it updates: that update could not be inverted."""
    for step, (target, sources) in enumerate(block.steps):
        if target in sources:
            raise ValueError(
                f"{type(block).__name__}.steps[{step}] updates stream {target} from itself "
                f"(sources {sources}); a step may only read the other streams."
            )
