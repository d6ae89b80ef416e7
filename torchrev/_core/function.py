"""The reversible engine: no-grad forward, one recomputation per step in backward.

A stack of reversible blocks is one chain of steps over a tuple of streams; step ``k`` replaces
stream ``t`` by ``update(s[t], branch(s[S]))`` (see :class:`AbstractReversibleBlock`; a coupling
is two steps). Each step is one autograd node (:class:`_StepFunction`) that stores none of its
inputs; a last node (:class:`_Outputs`) keeps the final streams. In backward, step ``k`` reads
the current value of every stream from a per-call :class:`Tape`, recomputes its branch with
grad (the only recomputation), rebuilds ``s[t] = revert(s[t], branch(s[S]))`` in place, and
differentiates the branch. Autograd itself sums the gradients that reach a stream value from
its consumers, and accumulates each step's parameter gradients before the next step is
recomputed, so at any moment one branch's activations and gradients are alive. A training step
costs about four forwards against plain autograd's three.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, Literal

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.func import functional_call
from torch.overrides import has_torch_function

try:  # torch's own inner call of autograd.grad; see NOTE [engine call]
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # pragma: no cover - older or newer torch: the public call instead
    _engine_run_backward = None

from .block import AbstractReversibleBlock
from .call import Call, Trace, verify_input, warn_full_width
from .contents import StepContents, step_contents
from .errors import DOUBLE_BACKWARD, ReversibilityError
from .exact import ExactStep
from .fingerprint import differs, fingerprint
from .leaves import check_tracked
from .overlap import Overlap
from .purity import unobserved
from .sharding import Sharding, accumulate, gathered
from .state import BufferWatch, RngState, Written, buffers_preserved

__all__ = ["Trace", "reversible_forward"]

Grads = list[Tensor | None]
#: Whether autograd.grad takes gradient edges as outputs (torch 2.5 on); see _grad's callers.
EDGE_OUTPUTS = torch.__version__ >= (2, 5)
_UNTRACKED = (
    "Make each one an nn.Parameter of a module inside {what}, pass it to the stack call as a "
    "keyword argument, or detach it if it should not train."
)


class _Step:
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
        self.below: _Step | None = None  # the step before this one (NOTE [overlapped rebuilds])
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
        if call.exact:
            compact = call.exact == "compact"
            self.exact = ExactStep.record(block, self.index, inp, h, out, compact)
            if self.exact.correction.mostly_full_width:
                warn_full_width(block, self.block_index, self.index, self.exact.nbytes, inp)
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
        inp, d_inp, d_sources, d_targets = self._recompute_and_differentiate(
            sources, d_out, want_inp, want_sources, targets, seeds, kwargs, rebuilt
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
            tape.check_recomputed()  # the one read of the device per stack backward

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

    def _recompute_and_differentiate(
        self,
        sources: list[Tensor],
        d_out: Tensor | None,
        want_inp: bool,
        want_sources: list[bool],
        targets: list[Tensor],
        seeds: list[Tensor | None],
        kwargs: dict[str, Any],
        rebuilt: Tensor | None,
    ) -> tuple[Tensor, Tensor | None, Grads, Grads]:
        """The rebuilt input (``rebuilt`` where the overlap already rebuilt it), and the
        gradients of the input, of the wanted sources (seeded with ``seeds[:n]``) and of
        ``targets`` (seeded with ``seeds[n:]``)."""
        block, index = self.block, self.index
        differentiate = d_out is not None and (want_inp or any(want_sources) or bool(targets))
        if rebuilt is not None and not differentiate:
            return rebuilt, None, [None] * len(sources), [None] * len(targets)
        # Buffers are restored only after autograd.grad: batch norm's graph saves its running
        # statistics, and restoring them earlier would trip autograd's version check.
        with buffers_preserved(self.written):
            inp, h, leaves, views, targets = self._recompute(
                sources, want_sources, targets, kwargs, differentiate, rebuilt
            )
            if d_out is None or not differentiate:
                return inp, None, [None] * len(sources), [None] * len(targets)
            with torch.no_grad():
                vjp = block.update_vjp(inp, h, d_out, index)
            wanted = [s for s, w in zip(leaves, want_sources) if w]
            consumed = [v for v, w in zip(views, want_sources) if w] + targets
            # NOTE [autocast replay] covers the recomputation only: autograd runs backward
            # outside autocast, and under it the backward's own matrix products would be cast.
            if vjp is not None:
                d_inp, d_h = vjp
                # As autograd casts a gradient to its input's dtype (a bf16 branch output
                # under autocast updating a float32 stream): differentiating the branch from a
                # float32 gradient would round differently from plain autograd.
                d_h = d_h.to(h.dtype)
                # The branch is differentiated from its output's gradient edge, so that the
                # output itself is freed first (autograd keeps it only where a backward
                # formula reads it): one stream-sized tensor less at the step's peak.
                roots = []
                if h.requires_grad:
                    roots = [(get_gradient_edge(h) if EDGE_OUTPUTS else h, d_h)]
                del h
                grads = _grad(roots, consumed, seeds, wanted + targets)
            else:
                with torch.enable_grad(), self.call.autocast.replayed():
                    inp_ = inp.detach().requires_grad_(want_inp)
                    out_ = block.update(inp_, h, index)
                inputs = ([inp_] if want_inp else []) + wanted + targets
                grads = _grad([(out_, d_out)], consumed, seeds, inputs)
                d_inp = grads.pop(0) if want_inp else None
        if callable(d_inp):  # deferred by update_vjp until the branch is differentiated
            with torch.no_grad():
                d_inp = d_inp() if want_inp else None
        d_sources = [grads.pop(0) if w else None for w in want_sources]
        return inp, d_inp if want_inp else None, d_sources, grads

    def _recompute(
        self,
        sources: list[Tensor],
        want_sources: list[bool],
        targets: list[Tensor],
        kwargs: dict[str, Any],
        grad: bool,
        rebuilt: Tensor | None,
    ) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor]]:
        """The branch output (with a graph if ``grad``) and the rebuilt input (``rebuilt``
        if given), under the forward's autocast, RNG and modes; the source leaves, the views
        the branch read, and the tensors to differentiate for ``targets``."""
        block, index = self.block, self.index
        replay = nullcontext() if self.rng is None else self.rng.replayed()
        with self.call.autocast.replayed():
            with torch.set_grad_enabled(grad), replay, self.call.modes.replayed():
                leaves = [s.detach().requires_grad_(w) for s, w in zip(sources, want_sources)]
                # The branch sees non-leaf views: module hooks that watch their inputs'
                # gradients (torch's ModuleTracker, FlopCounterMode) reject leaves here. An
                # alias (``s[...]``), not ``view_as``, which may renumber the strides of size-1
                # dimensions: kernels pick their algorithm from strides (a channels-last batch
                # of one), and the recomputation must round as its forward did.
                views = [s[...] if w else s for s, w in zip(leaves, want_sources)]
                h, targets = self._recompute_branch(views, kwargs, targets)
                self.verify_recomputed(h)
                # A pure step's forward saw no mode, so none is replayed here either (NOTE
                # [function modes]): its recomputation is the same pure computation.
                if grad and not self.pure:
                    # NOTE [closed-over tensors]: a gradient can only leave a step through its
                    # node's inputs; any other trainable tensor the branch reaches is an error
                    # rather than a gradient silently lost.
                    check_tracked([h], [*leaves, *targets], block.branch_name(index), _UNTRACKED)
            if rebuilt is not None:
                return rebuilt, h, leaves, views, targets
            with torch.no_grad():
                # NOTE [in-place revert]: the tape's value of the target stream has no other
                # reader, and it is always the engine's own tensor: the caller holds copies of
                # the outputs, and every earlier value was rebuilt here. For the same reason
                # the tape's reference is the output's last one but the top step's (which
                # _Outputs saved): replacing it with the input frees the output before the
                # branch is differentiated, where exact reversal rebuilt out of place.
                tape = self.call.tape
                out = tape.get(self.target)
                if self.exact is None:
                    inp = block.revert_(out, h, index).to(self.dtype)
                else:
                    inp = self.exact.rebuild(block, index, out, h)
                tape.values[self.target] = inp
        return inp, h, leaves, views, targets

    def verify_recomputed(self, h: Tensor) -> None:
        """Note whether ``h`` differs from the branch output the forward computed, for the
        stack's backward to raise when it ends (NOTE [recomputation checksum])."""
        if self.checksum is None:
            return
        mismatch = differs(self.checksum, h, bool(self.call.exact))
        self.call.tape.mismatches.append((self.block.branch_name(self.index), mismatch))

    def _recompute_branch(
        self, sources: list[Tensor], kwargs: dict[str, Any], targets: list[Tensor]
    ) -> tuple[Tensor, list[Tensor]]:
        """The branch's output with grad, and the tensors to differentiate for ``targets``."""
        branch = self.block.branch(self.index)
        if not any(t._backward_hooks for t in targets):  # hooks added after the forward count
            return branch(*sources, **kwargs), targets
        # NOTE [hooks once]: autograd.grad runs a parameter's tensor hooks when it captures its
        # gradient, and the outer backward runs them again on what this node returns. A hooked
        # parameter is therefore swapped for a detached alias during the recomputation, and its
        # gradient is read off the alias.
        # Gathered FSDP2 parameters are no node inputs: their hooks run here, once.
        skip = {id(p) for p in gathered(self.sharded)}
        hooked = {
            id(p): (name, p.detach().requires_grad_())
            for name, p in branch.named_parameters()
            if p.requires_grad and p._backward_hooks and id(p) not in skip
        }
        h = functional_call(branch, dict(hooked.values()), tuple(sources), kwargs)
        return h, [hooked[id(t)][1] if id(t) in hooked else t for t in targets]


def _grad(
    roots: list[tuple[Tensor | GradientEdge, Tensor]],
    consumed: list[Tensor],
    seeds: list[Tensor | None],
    inputs: list[Tensor],
) -> Grads:
    """Gradients of ``inputs`` from ``(output, grad_output)`` pairs, each tensor in
    ``consumed`` starting from its seed (NOTE [gradient order]); ``allow_unused``.

    A seed enters through an alias of its tensor made after everything else, so autograd, which
    runs the latest node first, adds it before any other contribution, as plain autograd would.

    NOTE [engine call]: for plain tensors ``torch.autograd.grad`` validates and converts its
    arguments in Python (shape checks, ``__torch_function__`` dispatch) and then calls
    ``_engine_run_backward``. Every step's backward calls it once with arguments that are
    right by construction, and at small sizes that wrapper costs as much as the rest of the
    step's Python, so the engine calls the inner function itself when torch has it and no
    argument overrides torch functions.
    """
    with torch.enable_grad():
        roots = [(t, g) for t, g in roots if isinstance(t, GradientEdge) or t.requires_grad]
        roots += [(t.view_as(t), g) for t, g in zip(consumed, seeds) if g is not None]
    if not inputs or not roots:
        return [None] * len(inputs)
    outputs, grad_outputs = tuple(t for t, _ in roots), tuple(g for _, g in roots)
    if _engine_run_backward is None or has_torch_function((*outputs, *grad_outputs, *inputs)):
        return list(torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True))
    return list(
        _engine_run_backward(
            outputs, grad_outputs, False, False, tuple(inputs), True, accumulate_grad=False
        )
    )


class _StepFunction(torch.autograd.Function):
    """One step as one autograd node. Inputs: the target stream, the source streams, the
    step's trainable parameters and the call's tensor kwargs (so that the engine hands their
    gradients to autograd, ``autograd.grad``, DDP's and users' hooks, rather than writing
    ``.grad`` itself), when it is not among those, the previous step's output, and for a step
    whose only trainable parameters are FSDP2's, the call's anchor (NOTE [sharded units])."""

    @staticmethod
    def forward(ctx: Any, step: _Step, inp: Tensor, *rest: Tensor) -> Tensor:
        ctx.step = step
        ctx.set_materialize_grads(False)
        n_sources = len(step.sources)
        leaves = rest[n_sources : len(rest) - step.trailing]
        out = step.forward(inp, rest[:n_sources], leaves)
        # NOTE [version checks]: saved (nothing is copied) only so that autograd's version
        # check catches what plain autograd's would: an in-place change, between forward and
        # backward, of a parameter, a kwarg, a frozen parameter or a buffer the branch read but
        # did not write, any of which would make the recomputation differ.
        ctx.save_for_backward(*leaves, *step.watched)
        return out

    @staticmethod
    def backward(ctx: Any, _: None) -> Any:
        # The output's gradient is on the tape (NOTE [gradient order]); autograd passes None.
        if torch.is_grad_enabled():
            raise ReversibilityError(DOUBLE_BACKWARD)
        step: _Step = ctx.step
        leaves = ctx.saved_tensors[: len(ctx.saved_tensors) - len(step.watched)]
        d_inp, d_sources, leaf_grads = step.backward(leaves, ctx.needs_input_grad[1:])
        return (None, d_inp, *d_sources, *leaf_grads, *([None] * step.trailing))


class _Outputs(torch.autograd.Function):
    """The last node: keeps the final streams for backward and gives the caller copies.

    NOTE [outputs]: with copies the caller may modify the outputs in place without corrupting
    what the backward rebuilds everything from, and because this node takes every final stream,
    using any one output runs the backward of every step. Their gradients start the tape's
    running sums (NOTE [gradient order]); only a stream no step read gets its own back here.
    Every backward through this node starts the tape afresh from the saved streams, so a graph
    kept with ``retain_graph=True`` can be backpropagated again, wholly or in part.
    """

    @staticmethod
    def forward(ctx: Any, call: Call, *streams: Tensor) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)  # an unused output passes None, as in plain autograd
        ctx.call = call
        ctx.save_for_backward(*streams)
        return tuple(s.clone() for s in streams)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> Any:
        call: Call = ctx.call
        call.tape.start(ctx.saved_tensors, grads, keep=_keeps_graph())
        if call.overlap is not None:
            call.overlap.reset()
        return (None, *(g if through else None for g, through in zip(grads, call.passthrough)))


def _keeps_graph() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``); True when this
    torch cannot tell, which only costs a copy of the final streams."""
    get = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if get is None else bool(get())


def _compile_disabled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compiler.disable(fn)``, applied at the first call made once Dynamo is loaded:
    the decorator imports Dynamo (a second of start-up), and nothing can compile before it is
    loaded, so until then ``fn`` runs as it is."""
    disabled: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return call


# NOTE [compile] (opaque.py): under torch.compile a stack call reaches the engine as one custom
# operator. Where this torch cannot define it, Dynamo must not trace the engine: it breaks the
# graph here instead.
@_compile_disabled
def reversible_forward(
    blocks: Sequence[AbstractReversibleBlock],
    streams: Sequence[Tensor],
    kwargs: dict[str, Any],
    trace: Trace | None = None,
    verify: float | None = None,
    exact: bool | Literal["compact"] = False,
    overlap: bool = False,
    check: bool = True,
) -> tuple[Tensor, ...]:
    """Run ``blocks`` on ``streams`` keeping no activations; backward recomputes them.

    ``trace``, if given, receives each block's input streams, as computed and as rebuilt.
    ``verify``, if given, keeps the input streams and warns in backward when they are rebuilt
    with a larger relative error. ``exact`` makes every step's inverse bit-exact at the cost of
    a few bits per element per step (NOTE [exact reversal]). ``overlap`` rebuilds each step's
    input one step ahead of its gradients, on a second CUDA stream (NOTE [overlapped
    rebuilds]). ``check`` keeps a checksum of every branch output and raises in backward if
    the recomputation differs (always on with ``exact``: NOTE [recomputation checksum]).
    """
    call = Call(len(streams), streams[0].device, kwargs, trace, exact, check)
    if verify is not None:
        call.verify = (verify, tuple(s.detach() for s in streams))
    call.sharding = Sharding.find(blocks)
    if overlap:
        call.overlap = Overlap.start(call, streams[0].device)
    values = list(streams)
    unread = [True] * len(streams)  # whether stream j still holds its input, unread
    read_leaves: set[int] = set()
    below: _Step | None = None
    previous: Tensor | None = None
    for block_index, block in enumerate(blocks):
        if trace is not None:
            trace.forward[block_index] = tuple(v.clone() for v in values)
        for step, contents in _steps(block, block_index, call):
            touched = (step.target, *step.sources)
            step.returns = tuple(unread[j] for j in touched)
            for j in touched:
                unread[j] = False
            step.returns_leaf = tuple(k not in read_leaves for k in step.leaf_keys)
            read_leaves.update(step.leaf_keys)
            step.below, below = below, step
            values[step.target] = previous = _apply(step, contents, values, previous)
    call.passthrough = unread
    return _Outputs.apply(call, *values)


def _steps(
    block: AbstractReversibleBlock, block_index: int, call: Call
) -> list[tuple[_Step, StepContents]]:
    """The block's steps in this call (NOTE [sharded units] for the parameters of FSDP2's)."""
    sharding = call.sharding
    if sharding is None:
        contents = step_contents(block)
    else:
        contents = step_contents(block, sharding.managed(block_index))
        sharding.set_readers(block_index, [c.sharded for c in contents])
    steps = [_Step(block, block_index, index, call, c) for index, c in enumerate(contents)]
    for step, c in zip(steps, contents):
        step.leaf_keys = tuple(id(t) for t in (*c.params, *call.tensors, *c.sharded))
    return list(zip(steps, contents))


def _apply(
    step: _Step, contents: StepContents, values: list[Tensor], previous: Tensor | None
) -> Tensor:
    """Run ``step`` as an autograd node on the current stream ``values``; ``previous``: the
    output of the step before it."""
    call = step.call
    inputs = [values[step.target], *(values[j] for j in step.sources)]
    # The previous step's output orders the backward (see Tape) and tells whether an earlier
    # step will run backward at all.
    step.lowest = previous is None or not previous.requires_grad
    step.sequenced = previous is not None and all(previous is not t for t in inputs)
    extra = [previous] if step.sequenced else []
    if any(p.sharded_param.requires_grad for p in step.sharded):
        if call.anchor is None:
            call.anchor = torch.empty(0, device=inputs[0].device, requires_grad=True)
        extra.append(call.anchor)
    step.trailing = len(extra)
    sharding = call.sharding
    if sharding is not None:
        sharding.before_forward(step.block_index, step.index)
    out = _StepFunction.apply(step, *inputs, *contents.params, *call.tensors, *extra)
    if sharding is not None:
        sharding.after_forward(step.block_index, step.index)
    return out
