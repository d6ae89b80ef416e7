"""The reversible engine: no-grad forward, one recomputation per half-step in backward.

A stack of couplings is one chain of half-steps over a single sequence of stream values,

    z[-1] = x1,  z[0] = x2,  z[k+1] = update_k(z[k-1], branch_k(z[k])),

where step ``2i`` is block ``i``'s ``f`` half and step ``2i + 1`` its ``g`` half, so block ``i``
maps ``(z[2i-1], z[2i])`` to ``(z[2i+1], z[2i+2])``. Each step is one autograd node
(:class:`_StepFunction`) that stores none of its inputs. In backward, step ``k`` reads its
output ``z[k+1]`` and its condition ``z[k]``, recomputes ``branch_k(z[k])`` with grad (the only
recomputation), rebuilds ``z[k-1] = update_k^{-1}(z[k+1], branch_k(z[k]))`` and hands it down
through a per-call :class:`_Tape`. Autograd itself sums the gradients that reach each ``z``
from its two consumers and accumulates each half's parameter gradients before the next half
is recomputed, so at any moment only one branch's activations and gradients are alive.
A training step costs about four forwards against plain autograd's three.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .coupling import AbstractCoupling
from .errors import DOUBLE_BACKWARD, SECOND_BACKWARD, ReversibilityError
from .state import AutocastState, BufferWatch, RngState, buffers_preserved

Grads = list[Tensor | None]


@dataclass
class Trace:
    """Stream values ``z[j]`` of one call, as computed forward and as rebuilt in backward."""

    forward: dict[int, Tensor] = field(default_factory=dict)
    rebuilt: dict[int, Tensor] = field(default_factory=dict)


class _Tape:
    """The stream values ``z[j]`` a backward still needs, keyed by ``j``.

    NOTE [tape]: ``z[j]`` enters the tape when it becomes known (at the end of the forward for
    the two outputs; otherwise when step ``j + 1`` rebuilds it) and leaves it when its last
    reader is done: step ``j - 1``, which reads it as output, or step ``j`` when no step
    ``j - 1`` will run. A missing value in backward therefore means this forward was already
    backpropagated, which is an error, not a reason to recompute.
    """

    def __init__(self) -> None:
        self._values: dict[int, Tensor] = {}

    def put(self, j: int, value: Tensor) -> None:
        self._values[j] = value

    def get(self, j: int, release: bool) -> Tensor:
        value = self._values.pop(j, None) if release else self._values.get(j)
        if value is None:
            raise ReversibilityError(SECOND_BACKWARD)
        return value


class _Call:
    """What the steps of one stack call share: the tape, the replay state, the kwargs."""

    def __init__(
        self, n_steps: int, device: torch.device, kwargs: dict[str, Any], trace: Trace | None
    ) -> None:
        self.n_steps = n_steps
        self.tape = _Tape()
        self.trace = trace  # diagnostics only
        self.device = device
        self.autocast = AutocastState.capture(device)
        self.rng = RngState.capture(device)  # the state the next branch starts from
        self.tensor_names = tuple(k for k, v in kwargs.items() if isinstance(v, Tensor))
        self.static_kwargs = {k: v for k, v in kwargs.items() if not isinstance(v, Tensor)}

    def kwargs(self, tensors: Sequence[Tensor]) -> dict[str, Any]:
        return {**self.static_kwargs, **dict(zip(self.tensor_names, tensors))}


class _Step:
    """Half-step ``k`` of one call: what its forward recorded for its backward."""

    def __init__(
        self,
        coupling: AbstractCoupling,
        k: int,
        call: _Call,
        params: list[Tensor],
        owners: tuple[nn.Module, ...],
    ) -> None:
        self.coupling = coupling
        self.k = k
        self.half = k % 2
        self.call = call
        self.n_params = len(params)
        self.hooked = any(p._backward_hooks for p in params)  # only branch parameters can be
        self.owners = owners
        self.rng: RngState | None = None
        self.written: tuple[Tensor, ...] = ()

    @property
    def last(self) -> bool:
        return self.k == self.call.n_steps - 1

    def forward(self, inp: Tensor, cond: Tensor, leaves: Sequence[Tensor]) -> Tensor:
        coupling, call = self.coupling, self.call
        kwargs = call.kwargs(leaves[self.n_params :])
        before = call.rng
        watch = BufferWatch.start(self.owners)
        h = coupling.run_branch(self.half, cond, inp, kwargs)
        after = RngState.capture(call.device)
        # Keep the state only if the branch drew random numbers (dropout); most do not.
        self.rng = None if after.same_as(before) else before
        call.rng = after
        self.written = watch.written()
        out = coupling.update(inp, h, self.half)
        if call.trace is not None:
            call.trace.forward[self.k + 1] = out.clone()
        return out

    def backward(
        self, d_out: Tensor, leaves: Sequence[Tensor], needs: Sequence[bool]
    ) -> tuple[Tensor | None, Tensor | None, Grads]:
        """Rebuild ``z[k-1]`` and return the gradients for ``(z[k-1], z[k], *leaves)``."""
        k, tape = self.k, self.call.tape
        want_inp, want_cond = needs[0], needs[1]
        out = tape.get(k + 1, release=True)
        # z[k] has a later reader, step k - 1, exactly when it requires grad (and k > 0).
        cond = tape.get(k, release=k == 0 or not want_cond)
        # Differentiable kwargs enter the recomputation as fresh leaves, so that hooks on the
        # caller's tensors run once, in the outer backward, and nowhere else.
        params = list(leaves[: self.n_params])
        extras = [t.detach().requires_grad_(t.requires_grad) for t in leaves[self.n_params :]]
        targets = [leaf for leaf, need in zip(params + extras, needs[2:]) if need]
        with self.call.autocast.replayed():
            inp, d_inp, d_cond, grads = self._recompute_and_differentiate(
                out, cond, d_out, want_inp, want_cond, targets, self.call.kwargs(extras)
            )
        if k >= 1 and (want_inp or want_cond):
            tape.put(k - 1, inp)
        if self.call.trace is not None:
            self.call.trace.rebuilt[k - 1] = inp.clone()
        summed = iter(grads)
        return d_inp, d_cond, [next(summed) if need else None for need in needs[2:]]

    def _recompute_and_differentiate(
        self,
        out: Tensor,
        cond: Tensor,
        d_out: Tensor,
        want_inp: bool,
        want_cond: bool,
        targets: list[Tensor],
        kwargs: dict[str, Any],
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Grads]:
        coupling, half = self.coupling, self.half
        # Buffers are restored only after autograd.grad: batch norm's graph saves its running
        # statistics, and restoring them earlier would trip autograd's version check.
        with buffers_preserved(self.written):
            with torch.enable_grad(), nullcontext() if self.rng is None else self.rng.replayed():
                cond_ = cond.detach().requires_grad_(want_cond)
                # The branch sees a non-leaf view: module hooks that watch their inputs'
                # gradients (torch's ModuleTracker, FlopCounterMode) reject leaves here.
                h, targets = self._recompute_branch(
                    cond_.view_as(cond_) if want_cond else cond_, kwargs, targets
                )
            with torch.no_grad():
                # NOTE [in-place revert]: z[k+1] has no reader after this step (see _Tape), and
                # it is always the engine's own tensor: the caller holds copies of the outputs.
                inp = coupling.revert_(out, h, half)
                vjp = coupling.update_vjp(inp, h, d_out, half)
            wanted = [cond_] if want_cond else []
            if vjp is not None:
                d_inp, d_h = vjp
                grads = _grad(h, wanted + targets, d_h)
            else:
                with torch.enable_grad():
                    inp_ = inp.detach().requires_grad_(want_inp)
                    out_ = coupling.update(inp_, h, half)
                grads = _grad(out_, ([inp_] if want_inp else []) + wanted + targets, d_out)
                d_inp = grads.pop(0) if want_inp else None
        d_cond = grads.pop(0) if want_cond else None
        return inp, d_inp if want_inp else None, d_cond, grads

    def _recompute_branch(
        self, cond: Tensor, kwargs: dict[str, Any], targets: list[Tensor]
    ) -> tuple[Tensor, list[Tensor]]:
        """``branch(cond)`` with grad, and the tensors to differentiate for ``targets``."""
        branch = self.coupling.branch(self.half)
        if not self.hooked:
            return branch(cond, **kwargs), targets
        hooked = {
            id(p): (name, p.detach().requires_grad_())
            for name, p in branch.named_parameters()
            if p.requires_grad and p._backward_hooks
        }
        # NOTE [hooks once]: autograd.grad runs a parameter's tensor hooks when it captures its
        # gradient, and the outer backward runs them again on what this node returns. A hooked
        # parameter is therefore swapped for a detached alias during the recomputation, and its
        # gradient is read off the alias.
        h = functional_call(branch, dict(hooked.values()), (cond,), kwargs)
        return h, [hooked[id(t)][1] if id(t) in hooked else t for t in targets]


def _grad(output: Tensor, inputs: list[Tensor], grad_output: Tensor) -> Grads:
    if not inputs or not output.requires_grad:
        return [None] * len(inputs)
    return list(torch.autograd.grad(output, inputs, grad_output, allow_unused=True))


class _StepFunction(torch.autograd.Function):
    """One half-step as one autograd node. Inputs: the updated stream, the condition stream,
    the step's trainable parameters and the call's tensor kwargs, so the engine hands their
    gradients to autograd (``autograd.grad``, DDP's and users' hooks) rather than writing
    ``.grad`` itself. The last step also outputs the condition stream, so that any use of
    either final output runs the whole chain."""

    @staticmethod
    def forward(ctx: Any, step: _Step, inp: Tensor, cond: Tensor, *leaves: Tensor) -> Any:
        ctx.step = step
        # Saved only so that autograd's version check catches an in-place change of a
        # parameter or kwarg between forward and backward; nothing is copied.
        ctx.save_for_backward(*leaves)
        out = step.forward(inp, cond, leaves)
        if not step.last:
            return out
        # NOTE [outputs]: the caller gets copies of the final streams, so it may modify them
        # in place without corrupting what the backward rebuilds everything from.
        step.call.tape.put(step.k, cond)
        step.call.tape.put(step.k + 1, out)
        return cond.clone(), out.clone()

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:
        if torch.is_grad_enabled():
            raise ReversibilityError(DOUBLE_BACKWARD)
        step: _Step = ctx.step
        d_inp, d_cond, leaf_grads = step.backward(
            grads[-1], ctx.saved_tensors, ctx.needs_input_grad[1:]
        )
        if step.last and ctx.needs_input_grad[2]:
            d_cond = grads[0] if d_cond is None else d_cond + grads[0]
        return (None, d_inp, d_cond, *leaf_grads)


def reversible_forward(
    couplings: Sequence[AbstractCoupling],
    x1: Tensor,
    x2: Tensor,
    kwargs: dict[str, Any],
    trace: Trace | None = None,
) -> tuple[Tensor, Tensor]:
    """Run ``couplings`` on ``(x1, x2)`` keeping no activations; backward recomputes them.

    ``trace``, if given, receives every stream value ``z[j]`` as computed and as rebuilt (block
    ``i``'s inputs are ``z[2i - 1]`` and ``z[2i]``).
    """
    call = _Call(2 * len(couplings), x1.device, kwargs, trace)
    if trace is not None:
        trace.forward.update({-1: x1, 0: x2})
    tensors = [kwargs[name] for name in call.tensor_names]
    previous, current = x1, x2
    for index, coupling in enumerate(couplings):
        for half, (params, owners) in enumerate(_step_contents(coupling)):
            step = _Step(coupling, 2 * index + half, call, params, owners)
            result = _StepFunction.apply(step, previous, current, *params, *tensors)
            previous, current = (current, result) if not step.last else result
    return previous, current


def _step_contents(coupling: AbstractCoupling) -> list[tuple[list[Tensor], tuple[nn.Module, ...]]]:
    """Per half: the trainable parameters it may use and the submodules holding buffers.

    A half may use its branch's parameters and the coupling's own (those outside f and g, used
    by ``update``); it never uses those that only the other branch has. One walk per branch:
    this runs on every call, and a parameter's ``requires_grad`` may change between calls.
    """
    modules = (coupling.f, coupling.g)
    walks = [list(branch.modules()) for branch in modules]
    own = [p for p in coupling._parameters.values() if p is not None]
    for child in coupling.children():
        if child is not coupling.f and child is not coupling.g:
            own.extend(child.parameters())
    if any(p.requires_grad and p._backward_hooks for p in own):
        raise ReversibilityError(
            f"a parameter of {type(coupling).__name__} outside f and g has a tensor hook "
            f"(register_hook); the reversible backward would run it twice. Register the hook "
            f"with register_post_accumulate_grad_hook, or on a parameter of f or g."
        )
    contents = []
    for walk in walks:
        params = {id(p): p for m in walk for p in m._parameters.values() if p is not None}
        params.update((id(p), p) for p in own)
        trainable = [p for p in params.values() if p.requires_grad]
        contents.append((trainable, tuple(m for m in walk if m._buffers)))
    return contents
