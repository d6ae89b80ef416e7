"""One step of a stack call: ``s[t] = update(s[t], branch(s[S]))``, and its backward.

A step's forward runs its branch once (no grad) and records what the backward needs to redo it
exactly: the RNG state where the branch drew, the buffers it wrote (NOTE [buffer replay]), a
checksum of its output (NOTE [recomputation checksum]) and, under exact reversal, its
correction (NOTE [exact reversal]). Its backward reads the streams from the call's tape,
recomputes and differentiates the branch (:mod:`.recompute`), rebuilds the target stream and
moves the running gradients back past the step (NOTE [gradient order]).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import exact
from .block import AbstractReversibleBlock
from .call import Call, verify_input
from .contents import StepContents
from .exact import ExactStep
from .fingerprint import fingerprint
from .grad import Grads
from .purity import unobserved
from .recompute import recompute_and_differentiate
from .sharding import accumulate, gathered
from .state import BufferWatch, RngState, Written


class Step:
    """Step ``index`` of block number ``block_index`` in one call, and what its forward recorded."""

    def __init__(
        self,
        block: AbstractReversibleBlock,
        block_index: int,
        index: int,
        call: Call,
        contents: StepContents,
    ) -> None:
        self.block, self.block_index, self.index, self.call = block, block_index, index, call
        self.target, self.sources = block.steps[index]
        self.n_params = len(contents.params)
        self.sharded = contents.sharded  # NOTE [sharded units]
        self.below: Step | None = None  # the step before this one (NOTE [overlapped rebuilds])
        self.owners = contents.owners
        self.pure = contents.pure  # see NOTE [pure branches]; the forward may revoke it
        self.sequenced = False  # whether the previous step's output is an extra last input
        self.trailing = 0  # inputs after the leaves: that output, the call's anchor
        self.lowest = False  # whether no earlier step will run backward
        self.rng: RngState | None = None
        self.written: tuple[Written, ...] = ()
        self.frozen = contents.frozen
        self.watched: tuple[Tensor, ...] = ()  # see NOTE [version checks]
        self.exact: ExactStep | None = None
        self.checksum: Tensor | None = None  # NOTE [recomputation checksum]
        self.dtype = torch.float32  # the input's, which an update may promote
        # NOTE [gradient order]: which of (inp, *sources) and of the leaves entered the stack
        # and are read here first, so that this step returns their gradient sums.
        self.returns: tuple[bool, ...] = ()
        self.leaf_keys: tuple[int, ...] = ()
        self.returns_leaf: tuple[bool, ...] = ()

    def forward(self, inp: Tensor, sources: Sequence[Tensor], leaves: Sequence[Tensor]) -> Tensor:
        block, call = self.block, self.call
        kwargs = call.kwargs(leaves[self.n_params :])
        self.pure = self.pure and unobserved([*sources, *leaves])
        watch = BufferWatch.start(self.owners)
        h = block.run_branch(self.index, sources, inp, kwargs)
        if not self.pure:  # a pure branch drew nothing: call.rng is still the current state
            after = RngState.capture(call.device)
            # Keep the state only if the branch drew random numbers (dropout); most do not.
            self.rng = None if after.same_as(call.rng) else call.rng
            call.rng = after
        self.written = watch.written()
        written = {id(w.tensor) for w in self.written}
        buffers = (b for m in self.owners for b in m._buffers.values() if b is not None)
        self.watched = (*self.frozen, *(b for b in buffers if id(b) not in written))
        self.dtype = inp.dtype
        out = block.update(inp, h, self.index)
        if call.check:
            self.checksum = fingerprint(h, bool(call.exact))
        exact.record(self, inp, h, out)
        if call.trace is not None:
            call.trace.record_step(self.block_index, block, self.index, inp, h, out, self.exact)
        return out

    def backward(
        self, leaves: Sequence[Tensor], needs: Sequence[bool]
    ) -> tuple[Tensor | None, Grads, Grads]:
        """Rebuild the target stream and move the running gradients on the tape back past this
        step (NOTE [gradient order]); return those of ``(inp, *sources, *leaves)`` that leave
        the stack here."""
        call, n_sources = self.call, len(self.sources)
        tape = call.tape
        if self.sharded:  # NOTE [sharded units]
            call.sharding.before_backward(self.block_index, self.index)  # type: ignore[union-attr]
        # No gradient reached this step's output (the loss ignores it): the stream is still
        # rebuilt for the steps below, but nothing is differentiated, as in plain autograd.
        d_out = tape.grads[self.target]
        live = d_out is not None
        want_inp = live and needs[0]
        want_sources = [live and need for need in needs[1 : 1 + n_sources]]
        n_leaves = len(leaves)
        want_leaves = [live and need for need in needs[1 + n_sources : 1 + n_sources + n_leaves]]
        tape.get(self.target)  # raises on a second backward of a graph that was not kept
        sources = [tape.get(j) for j in self.sources]
        # Differentiable kwargs enter the recomputation as fresh leaves, so that hooks on the
        # caller's tensors run once, in the outer backward, and nowhere else.
        params = list(leaves[: self.n_params])
        extras = [t.detach().requires_grad_(t.requires_grad) for t in leaves[self.n_params :]]
        own = gathered(self.sharded)
        want_leaves += [live and p.requires_grad for p in own]
        targets = [leaf for leaf, w in zip(params + extras + own, want_leaves) if w]
        seeds = [tape.grads[j] for j, w in zip(self.sources, want_sources) if w]
        seeds += [tape.shared.pop(k, None) for k, w in zip(self.leaf_keys, want_leaves) if w]
        kwargs = call.kwargs(extras)
        rebuilt = None
        if call.overlap is not None:
            rebuilt = call.overlap.rebuilt(self, tape.get(self.target), sources)
        inp, d_inp, d_sources, d_targets = recompute_and_differentiate(
            self, sources, d_out, want_inp, want_sources, targets, seeds, kwargs, rebuilt
        )
        tape.values[self.target] = inp
        tape.grads[self.target] = d_inp
        for j, w, d in zip(self.sources, want_sources, d_sources):
            if w:
                tape.grads[j] = d
        returned = [
            tape.grads[j] if first else None
            for j, first in zip((self.target, *self.sources), self.returns)
        ]
        leaf_grads = self._leaf_totals(want_leaves, d_targets)
        if self.sharded:
            for param, grad in zip(self.sharded, leaf_grads[n_leaves:]):
                accumulate(param, grad)
            call.sharding.after_backward(self.block_index, self.index)  # type: ignore[union-attr]
        self._finish()
        return returned[0], returned[1:], leaf_grads[:n_leaves]

    def _finish(self) -> None:
        """Clear the tape after the lowest step, and this step's records unless the graph is
        kept for another backward."""
        call, tape = self.call, self.call.tape
        if call.trace is not None and self.index == 0:
            call.trace.rebuilt[self.block_index] = tuple(v.clone() for v in tape.values)
        if self.lowest:
            if call.verify is not None and self.block_index == 0 and self.index == 0:
                verify_input(tape.values, *call.verify)
            tape.values = [None] * len(tape.values)
            tape.grads = [None] * len(tape.grads)
            if not tape.keep:
                call.verify = None
        if not tape.keep:
            # As autograd frees a node's saved tensors after its backward: the graph may stay
            # referenced (a loss kept until the next step), this step's records need not.
            self.exact = self.rng = self.checksum = None
            self.written = self.watched = ()
        if self.lowest:
            tape.settle()  # the one read of the device per stack backward

    def _leaf_totals(self, want: list[bool], computed: Grads) -> Grads:
        """Per leaf: its gradient sum if this step is its earliest reader, else None (and the
        sum stays on the tape for the readers below)."""
        shared, totals, sums = self.call.tape.shared, [], iter(computed)
        for key, wanted, first in zip(self.leaf_keys, want, self.returns_leaf):
            total = next(sums) if wanted else (shared.pop(key, None) if first else None)
            if not first and total is not None:
                shared[key] = total
            totals.append(total if first else None)
        return totals
