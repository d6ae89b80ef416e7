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
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from .block import AbstractReversibleBlock
from .call import Call, Trace
from .contents import StepContents, step_contents
from .errors import DOUBLE_BACKWARD, ReversibilityError
from .overlap import Overlap
from .recover import settle_planned
from .sharding import Sharding
from .staged import Staged
from .step import Step

__all__ = ["Trace", "reversible_forward"]


class StepFunction(torch.autograd.Function):
    """One step as one autograd node. Inputs: the target stream, the source streams, the
    step's trainable parameters and the call's tensor kwargs (so that the engine hands their
    gradients to autograd, ``autograd.grad``, DDP's and users' hooks, rather than writing
    ``.grad`` itself), when it is not among those, the previous step's output, and for a step
    whose only trainable parameters are FSDP2's, the call's anchor (NOTE [sharded units])."""

    @staticmethod
    def forward(ctx: Any, step: Step, inp: Tensor, *rest: Tensor) -> Tensor:
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
        step: Step = ctx.step
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
        if call.planned:
            settle_planned(call)  # NOTE [planned capacities]
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
    if call.ahead:  # to replay a step whose planned correction overflowed (recover.py)
        call.inputs = tuple(s.detach() for s in streams)
    call.sharding = Sharding.find(blocks)
    if overlap:
        call.overlap = Overlap.start(call, streams[0].device)
    values = list(streams)
    unread = [True] * len(streams)  # whether stream j still holds its input, unread
    read_leaves: set[int] = set()
    below: Step | None = None
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
    if call.planned:  # NOTE [staged reads]
        stats = [ref().exact.correction.stats for ref in call.planned]  # type: ignore[union-attr]
        call.staged = Staged(torch.cat(stats))
    return _Outputs.apply(call, *values)


def _steps(
    block: AbstractReversibleBlock, block_index: int, call: Call
) -> list[tuple[Step, StepContents]]:
    """The block's steps in this call (NOTE [sharded units] for the parameters of FSDP2's)."""
    sharding = call.sharding
    if sharding is None:
        contents = step_contents(block)
    else:
        contents = step_contents(block, sharding.managed(block_index))
        sharding.set_readers(block_index, [c.sharded for c in contents])
    steps = [Step(block, block_index, index, call, c) for index, c in enumerate(contents)]
    for step, c in zip(steps, contents):
        step.leaf_keys = tuple(id(t) for t in (*c.params, *call.tensors, *c.sharded))
    return list(zip(steps, contents))


def _apply(
    step: Step, contents: StepContents, values: list[Tensor], previous: Tensor | None
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
    if call.ahead:
        call.steps.append(weakref.ref(step))
    sharding = call.sharding
    if sharding is not None:
        sharding.before_forward(step.block_index, step.index)
    out = StepFunction.apply(step, *inputs, *contents.params, *call.tensors, *extra)
    if sharding is not None:
        sharding.after_forward(step.block_index, step.index)
    return out
