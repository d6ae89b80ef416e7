"""ReversibleSequential: a stack of reversible blocks whose training stores no activations."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

from . import opaque
from .block import AbstractReversibleBlock, check_steps
from .budget import plan_stack
from .exact import Exact, check_setting, resolve
from .function import reversible_forward
from .inverse import Inverted
from .plan import Choice, Plan
from .planned import run_plan


class ReversibleSequential(nn.ModuleList):
    r"""Reversible blocks applied in order to a tuple of streams, trained without activations.

    The trade-off: in training, memory for activations stays that of one block whatever the
    depth, and each block is computed once more in backward (about 4/3 the time of a plain
    step). Gradients are those of plain autograd.

    ``exact`` decides how the backward rebuilds each block's input. Floating-point inverses
    round, and a block that scales a stream down (a scaled, momentum or affine coupling,
    RevCol's columns) divides in its inverse and amplifies the rounding at every block, as
    does any block on 16-bit streams. ``exact=True`` makes every inverse bit-exact: each step
    stores a small integer correction (3 to 9 bits per stream element, against 16 to 64 for
    storing the input; see :mod:`torchrev._core.exact`), so the rebuilt inputs equal the
    forward's and the gradients equal plain autograd's on the same forward. ``"compact"`` is
    as exact and stores about a third less (2 to 6 bits), for a few more passes over each
    stream per step: the choice where branches are heavy next to their streams (transformer
    layers). ``exact=False`` stores nothing and trusts the float inverse. ``"auto"`` (the
    default) is ``True`` where float reversal would amplify rounding
    (:attr:`AbstractReversibleBlock.amplifies_rounding` or 16-bit streams) and float
    elsewhere (additive couplings on float32 or float64 streams, whose inverse is good to a
    few ulps at any depth).

    With couplings (two streams) it is called as ``stack(x1, x2, **kwargs)`` and returns
    ``(y1, y2)``; ``stack.inverse(y1, y2, **kwargs)`` returns ``(x1, x2)``. Blocks on more
    streams (RevCol's columns) take and return as many. Keyword arguments reach every branch,
    and tensors among them that require grad receive gradients.

    The memory-free path runs when the module is training, grad mode is on, something
    requires grad and ``reversible`` is true. Otherwise (``torch.no_grad()``, ``eval()``,
    ``reversible=False``) the blocks run as ordinary modules under plain autograd, with no
    overhead: ``reversible=False`` is the reference the tests compare against.

    ``verify=tol`` keeps the stack's input (one more set of streams) and warns with a
    :class:`torchrev.ReversibilityWarning` whenever the backward rebuilds it with a relative
    error above ``tol``: a guard for badly conditioned stacks (small scales, low precision).

    ``overlap=True`` (PaReprop, Zhu and Mangalam 2023) rebuilds each block's input one step
    ahead of its gradients, on a second CUDA stream, at the cost of one more evaluation of
    every branch in backward (under no grad); without CUDA the same work runs in sequence. It
    pays where one block's backward leaves the GPU idle (small batches, narrow layers).

    ``check_recompute=True`` (the default) keeps a checksum of every branch output (two
    reductions per step, two numbers) and raises :class:`torchrev.ReversibilityError` in backward
    if a branch recomputes a different output: a nondeterministic kernel, a random generator
    the engine does not replay, state the branch does not own. Exact reversal always checks
    (its corrections rely on it); ``False`` skips the check for float reversal only.

    ``checkpoint_blocks=True`` (with ``reversible=False``) runs each block under
    ``torch.utils.checkpoint`` instead, the usual alternative, for comparison.

    ``memory_budget`` trades memory back for time: bytes of activations and temporaries the
    training step may keep beyond parameters and gradients (an int), or a fraction of the way
    from the all-reversed floor to plain autograd's peak (a float in [0, 1]). On the first
    training call of each input shape the stack measures its blocks and chooses, per block, to
    keep its activations (plain autograd), keep only its input (checkpointing) or reverse it,
    most time saved per byte first, and checks the plan's measured peak against the budget
    (:mod:`torchrev._core.budget`). ``stack.plan`` shows the choice; gradients are those of the
    all-reversed stack. :func:`torchrev.fit_memory` shares one budget across a model's stacks.

    Contract for branches (``f`` and ``g``): they depend only on their inputs, the keyword
    arguments, and their own parameters and buffers, and give the same output when rerun under
    the same RNG and autocast state. :func:`torchrev.check_reversibility` tests a stack on it.
    """

    def __init__(
        self,
        *blocks: AbstractReversibleBlock,
        reversible: bool = True,
        checkpoint_blocks: bool = False,
        verify: float | None = None,
        exact: Exact = "auto",
        overlap: bool = False,
        check_recompute: bool = True,
        memory_budget: int | float | None = None,
    ) -> None:
        super().__init__(blocks)
        _check_blocks(blocks)
        self.reversible = reversible
        self.overlap = overlap
        self.check_recompute = check_recompute
        self.checkpoint_blocks = checkpoint_blocks
        self.verify = verify
        self.exact = exact
        self.memory_budget = memory_budget
        self._forced: tuple[Choice, ...] | None = None  # while a plan is measured
        self._runs: dict[tuple[int, int, Any], ReversibleSequential] = {}

    @property
    def memory_budget(self) -> int | float | None:
        """Bytes (int) or a fraction (float) of activation memory, or None: see the class
        docstring. Setting it drops the current plan."""
        return self._memory_budget

    @memory_budget.setter
    def memory_budget(self, value: int | float | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(
                f"memory_budget must be bytes (int), a fraction (float) or None, got {value!r}"
            )
        self._memory_budget = value
        self._plans: dict[tuple[Any, ...], Plan] = {}  # by shape_key
        self._plan: Plan | None = None

    @property
    def plan(self) -> Plan | None:
        """The plan of the last planned training call (``print(stack.plan)`` shows the table),
        or None before the first one. Plans are kept per input shape."""
        return self._plan

    @property
    def exact(self) -> Exact:
        """``True``, ``False``, ``"auto"`` or ``"compact"``: see the class docstring."""
        return self._exact

    @exact.setter
    def exact(self, value: Exact) -> None:
        self._exact = check_setting(value)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return ReversibleSequential(
                *list(self)[index],
                reversible=self.reversible,
                checkpoint_blocks=self.checkpoint_blocks,
                verify=self.verify,
                exact=self.exact,
                overlap=self.overlap,
                check_recompute=self.check_recompute,
                memory_budget=self.memory_budget,
            )
        return super().__getitem__(index)

    def forward(self, *streams: Tensor, **kwargs: Any) -> tuple[Tensor, ...]:
        blocks = list(self)
        _check_blocks(blocks)
        if blocks:
            blocks[0].check_streams(streams, "ReversibleSequential.forward")
        training = self.training and self._needs_grad(streams, kwargs)
        if self.reversible and training:
            choices = self._choices(streams, kwargs)
            if choices is not None and any(c != "reverse" for c in choices):
                return run_plan(self, choices, streams, kwargs)
            return self._reversible(streams, kwargs, inverse=False)
        for block in blocks:
            if self.checkpoint_blocks and training:
                streams = checkpoint(block, *streams, use_reentrant=False, **kwargs)
            else:
                streams = block(*streams, **kwargs)
        return tuple(streams)

    def inverse(self, *streams: Tensor, **kwargs: Any) -> tuple[Tensor, ...]:
        """Recover the inputs from the outputs, running the blocks' inverses top down.

        Trains like the forward direction: when the forward would run the memory-free path,
        so does this, on the blocks run backwards (:class:`Inverted`), storing no activations
        and with the same exactness; otherwise each block's ``inverse`` runs as a plain module.
        """
        blocks = list(self)
        _check_blocks(blocks)
        if blocks:
            blocks[-1].check_streams(streams, "ReversibleSequential.inverse")
        if self.reversible and self.training and self._needs_grad(streams, kwargs):
            return self._reversible(streams, kwargs, inverse=True)
        for block in reversed(blocks):
            streams = block.inverse(*streams, **kwargs)
        return tuple(streams)

    def _reversible(
        self, streams: tuple[Tensor, ...], kwargs: dict[str, Any], inverse: bool
    ) -> tuple[Tensor, ...]:
        """The memory-free path, as one operator under torch.compile (NOTE [compile])."""
        if opaque.AVAILABLE and torch.compiler.is_compiling():
            return opaque.opaque_call(self, streams, kwargs, inverse)
        return self._engine(streams, kwargs, inverse)

    def _engine(
        self, streams: Sequence[Tensor], kwargs: dict[str, Any], inverse: bool
    ) -> tuple[Tensor, ...]:
        blocks: list[AbstractReversibleBlock] = list(self)
        if inverse:
            blocks = [Inverted(block) for block in reversed(blocks)]
        exact = resolve(self.exact, blocks, streams)
        return reversible_forward(
            blocks,
            streams,
            kwargs,
            verify=self.verify,
            exact=exact,
            overlap=self.overlap,
            check=self.check_recompute,
        )

    def _resolved_exact(self, streams: Sequence[Tensor]) -> Any:
        return resolve(self.exact, list(self), streams)

    def _run(self, start: int, stop: int, streams: Sequence[Tensor]) -> ReversibleSequential:
        """Blocks ``start:stop`` as a stack of their own (not a submodule), with this stack's
        resolved exactness: what a plan runs through the engine in one call."""
        exact = self._resolved_exact(streams)
        run = self._runs.get((start, stop, exact))
        if run is None or run.verify != self.verify or run.overlap != self.overlap:
            blocks = list(self)[start:stop]
            run = ReversibleSequential(
                *blocks, verify=self.verify, exact=exact, overlap=self.overlap
            )
            self._runs[(start, stop, exact)] = run
        run.check_recompute = self.check_recompute
        return run

    def _set_plan(self, plan: Plan, key: tuple[Any, ...]) -> None:
        """Use ``plan`` for calls whose tensors have ``key``'s shapes (NOTE in fit.py)."""
        self._plans[key] = self._plan = plan

    @contextmanager
    def _forced_choices(self, choices: tuple[Choice, ...] | None) -> Iterator[None]:
        """Run under ``choices`` (None: every block reversed) while a plan is measured."""
        previous, self._forced = self._forced, choices or ("reverse",) * len(self)
        try:
            yield
        finally:
            self._forced = previous

    def _choices(
        self, streams: tuple[Tensor, ...], kwargs: dict[str, Any]
    ) -> tuple[Choice, ...] | None:
        """The plan's choices for this call's shapes, planning first where needed."""
        if self._forced is not None:
            return self._forced
        if not self._plans and self.memory_budget is None:
            return None
        key = shape_key(streams, kwargs)
        plan = self._plans.get(key)
        if plan is not None:
            self._plan = plan
            return plan.choices
        if self.memory_budget is None:  # planned by fit_memory, for other shapes
            warnings.warn(
                "torchrev: this stack's memory plans were made for other input shapes; calls "
                "of these shapes run fully reversed (the floor) until torchrev.fit_memory is "
                "called with example inputs of these shapes too.",
                stacklevel=3,
            )
            return None
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "torchrev: a stack with a memory budget plans on its first training call of each "
                "input shape, which cannot run while torch.compile traces. Run one eager "
                "training step on these shapes (or torchrev.fit_memory) before compiling."
            )
        self._set_plan(plan_stack(self, streams, kwargs, self.memory_budget), key)
        return self._plans[key].choices

    def _needs_grad(self, streams: tuple[Tensor, ...], kwargs: dict[str, Any]) -> bool:
        if not torch.is_grad_enabled():
            return False
        tensors = [*streams, *(v for v in tree_leaves(kwargs) if isinstance(v, Tensor))]
        return any(t.requires_grad for t in tensors) or any(
            p.requires_grad for p in self.parameters()
        )

    def extra_repr(self) -> str:
        return (
            f"reversible={self.reversible}, exact={self.exact!r}, overlap={self.overlap}, "
            f"checkpoint_blocks={self.checkpoint_blocks}, memory_budget={self.memory_budget}"
        )


def shape_key(streams: Sequence[Tensor], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """What a plan depends on: the shapes, dtypes and devices of the call's tensors."""
    tensors = [*streams, *(v for v in tree_leaves(kwargs) if isinstance(v, Tensor))]
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)


def _check_blocks(blocks: Any) -> None:
    for index, block in enumerate(blocks):
        if not isinstance(block, AbstractReversibleBlock):
            raise TypeError(
                f"ReversibleSequential item {index} is a {type(block).__name__}, not a "
                f"reversible block. Wrap each block, e.g. AdditiveCoupling(f, g); non-reversible "
                f"layers (downsampling, heads) go outside the stack, in an ordinary nn.Sequential."
            )
        check_steps(block)
