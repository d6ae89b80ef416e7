"""A step's backward: its branch recomputed under the forward's state, then differentiated.

The recomputation is the engine's only one (NOTE [in-place revert] for how it also rebuilds the
step's input), its output is checked against the forward's (NOTE [recomputation checksum]),
and the branch is differentiated from its output's gradient edge with one call into autograd's
engine (:func:`.grad.engine_grad`).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.graph import get_gradient_edge
from torch.func import functional_call

from .exact import rebuild
from .fingerprint import mismatch_report
from .grad import EDGE_OUTPUTS, Grads, engine_grad
from .leaves import check_tracked
from .sharding import gathered
from .state import buffers_preserved

if TYPE_CHECKING:
    from .step import Step

_UNTRACKED = (
    "Make each one an nn.Parameter of a module inside {what}, pass it to the stack call as a "
    "keyword argument, or detach it if it should not train."
)


def recompute_and_differentiate(
    step: Step,
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
    block, index = step.block, step.index
    differentiate = d_out is not None and (want_inp or any(want_sources) or bool(targets))
    if rebuilt is not None and not differentiate:
        return rebuilt, None, [None] * len(sources), [None] * len(targets)
    # Buffers are restored only after autograd.grad: batch norm's graph saves its running
    # statistics, and restoring them earlier would trip autograd's version check.
    with buffers_preserved(step.written):
        inp, h, leaves, views, targets = _recompute(
            step, sources, want_sources, targets, kwargs, differentiate, rebuilt
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
            grads = engine_grad(roots, consumed, seeds, wanted + targets)
        else:
            with torch.enable_grad(), step.call.autocast.replayed():
                inp_ = inp.detach().requires_grad_(want_inp)
                out_ = block.update(inp_, h, index)
            inputs = ([inp_] if want_inp else []) + wanted + targets
            grads = engine_grad([(out_, d_out)], consumed, seeds, inputs)
            d_inp = grads.pop(0) if want_inp else None
    if callable(d_inp):  # deferred by update_vjp until the branch is differentiated
        with torch.no_grad():
            d_inp = d_inp() if want_inp else None
    d_sources = [grads.pop(0) if w else None for w in want_sources]
    return inp, d_inp if want_inp else None, d_sources, grads


def _recompute(
    step: Step,
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
    block, index = step.block, step.index
    replay = nullcontext() if step.rng is None else step.rng.replayed()
    with step.call.autocast.replayed():
        with torch.set_grad_enabled(grad), replay, step.call.modes.replayed():
            leaves = [s.detach().requires_grad_(w) for s, w in zip(sources, want_sources)]
            # The branch sees non-leaf views: module hooks that watch their inputs'
            # gradients (torch's ModuleTracker, FlopCounterMode) reject leaves here. An
            # alias (``s[...]``), not ``view_as``, which may renumber the strides of size-1
            # dimensions: kernels pick their algorithm from strides (a channels-last batch
            # of one), and the recomputation must round as its forward did.
            views = [s[...] if w else s for s, w in zip(leaves, want_sources)]
            h, targets = _recompute_branch(step, views, kwargs, targets)
            _verify_recomputed(step, h)
            # A pure step's forward saw no mode, so none is replayed here either (NOTE
            # [function modes]): its recomputation is the same pure computation.
            if grad and not step.pure:
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
            tape = step.call.tape
            out = tape.get(step.target)
            inp = rebuild(step, out, h, in_place=True)
            tape.values[step.target] = inp
    return inp, h, leaves, views, targets


def _verify_recomputed(step: Step, h: Tensor) -> None:
    """Note whether ``h`` differs from the branch output the forward computed, for the
    stack's backward to raise when it ends (NOTE [recomputation checksum])."""
    if step.checksum is not None:
        name = step.block.branch_name(step.index)
        step.call.tape.report(*mismatch_report(name, step.checksum, h, bool(step.call.exact)))


def _recompute_branch(
    step: Step, sources: list[Tensor], kwargs: dict[str, Any], targets: list[Tensor]
) -> tuple[Tensor, list[Tensor]]:
    """The branch's output with grad, and the tensors to differentiate for ``targets``."""
    branch = step.block.branch(step.index)
    if not any(t._backward_hooks for t in targets):  # hooks added after the forward count
        return branch(*sources, **kwargs), targets
    # NOTE [hooks once]: autograd.grad runs a parameter's tensor hooks when it captures its
    # gradient, and the outer backward runs them again on what this node returns. A hooked
    # parameter is therefore swapped for a detached alias during the recomputation, and its
    # gradient is read off the alias.
    # Gathered FSDP2 parameters are no node inputs: their hooks run here, once.
    skip = {id(p) for p in gathered(step.sharded)}
    hooked = {
        id(p): (name, p.detach().requires_grad_())
        for name, p in branch.named_parameters()
        if p.requires_grad and p._backward_hooks and id(p) not in skip
    }
    h = functional_call(branch, dict(hooked.values()), tuple(sources), kwargs)
    return h, [hooked[id(t)][1] if id(t) in hooked else t for t in targets]
