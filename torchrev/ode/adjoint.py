"""The reversible adjoint: exact gradients of a reversible Heun solve in memory constant in the
number of steps.

The backward pass walks the steps in reverse, rebuilding each state with the scheme's reverse
formula (:mod:`._heun`) from the final one. The fields' evaluation at :math:`\\hat y_n` that the
rebuild needs is made with grad and serves the vector-Jacobian product of the next reverse
step, so the whole backward costs one evaluation and one VJP per step (direct backpropagation:
one VJP), keeps one step's graph alive, and gives the gradients of backpropagation through the
same steps up to floating-point rounding.

Gradients with respect to ``t`` come from the same walk at no extra evaluation: each rebuilt
evaluation takes its time :math:`T_n` as a leaf, so the VJP also returns
:math:`\\partial L/\\partial T_n`, and each step size :math:`h_n` enters linearly, so
:math:`\\partial L/\\partial h_n = \\langle \\bar{\\hat y}_{n+1}, f_n\\rangle +
\\langle \\bar y_{n+1}, (f_n + f_{n+1})/2 \\rangle` from adjoints the walk already holds. The
grid maps both to :math:`dL/dt` (:mod:`.grid`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .._core.errors import DOUBLE_BACKWARD, ReversibilityError
from .._core.leaves import check_tracked
from .._core.state import AutocastState, FunctionModes
from ._base import VectorField
from ._heun import HeunState, Problem, initial_state, integrate, reverse_step

_FIX = (
    "torchrev finds the parameters of f and g, of the modules they close over and the tensors "
    "requiring grad they reach; list every tensor the fields should train in adjoint_params "
    "(it replaces what torchrev finds), compute derived tensors inside the field, or detach "
    "those that should not train."
)


def check_fields(state: HeunState, known: Sequence[Tensor]) -> None:
    """Raise if the fields in ``state`` depend on a trainable tensor the adjoint cannot return
    a gradient for (one not among ``known``)."""
    check_tracked([state.f] if state.g is None else [state.f, state.g], known, "the field", _FIX)


class ReversibleAdjoint(torch.autograd.Function):
    """The whole solve as one node: nothing stored but the final state."""

    @staticmethod
    def forward(
        ctx: Any, problem: Problem, params: Sequence[Tensor], y0: Tensor, t: Tensor | None, *_
    ) -> Tensor:
        problem, aliases = _alias(problem, params)
        # The first evaluation is made with grad, to check that the fields train nothing this
        # node cannot return a gradient for: the error comes here, at the call, not in backward.
        start = y0.detach().requires_grad_()
        with torch.enable_grad():
            problem, state = initial_state(problem, start)
        check_fields(state, [start, *aliases])
        g0 = None if state.g is None else state.g.detach()
        with torch.no_grad():
            ys, final = integrate(problem, HeunState(y0, y0, state.f.detach(), g0))
        ctx.problem, ctx.params, ctx.state = problem, aliases, final
        # The reverse walk re-evaluates the fields: under the forward's autocast settings and
        # torch function modes (NOTE [autocast replay], NOTE [function modes]), or it would
        # rebuild the states from different field values.
        ctx.autocast = AutocastState.capture(y0.device)
        ctx.modes = FunctionModes.capture()
        return ys

    @staticmethod
    def backward(ctx: Any, d_ys: Tensor) -> Any:
        state = take_once(ctx, "state", "reversible Heun")
        with ctx.autocast.replayed(), ctx.modes.replayed():
            walk = _ReverseWalk(ctx.problem, ctx.params, ctx.needs_input_grad[3], d_ys.device)
            d_y0 = walk.run(state, d_ys)
        d_t = None if walk.d_t is None else walk.d_t.to(ctx.problem.grid.source)
        return (None, None, d_y0, d_t, *walk.totals)


def take_once(ctx: Any, name: str, solver: str) -> Any:
    """``ctx.<name>``, which a backward may use once (it is cleared); raises under a double
    backward and on a second backward through the same solve."""
    if torch.is_grad_enabled():
        raise ReversibilityError(DOUBLE_BACKWARD)
    value = getattr(ctx, name)
    if value is None:
        raise ReversibilityError(
            f"backward ran twice through the same {solver} solve; solve again."
        )
    setattr(ctx, name, None)
    return value


def _alias(problem: Problem, params: Sequence[Tensor]) -> tuple[Problem, list[Tensor]]:
    """The problem with its fields aliased by :func:`alias_fields`, and the tensors to
    differentiate."""
    (f, g), aliases = alias_fields((problem.f, problem.g), params)
    if f is problem.f and g is problem.g:
        return problem, aliases
    swapped = Problem(
        f,  # type: ignore[arg-type]
        g,
        problem.grid,
        problem.noise,
        problem.brownian,
        problem.seed,
    )
    return swapped, aliases


def alias_fields(
    fields: Sequence[VectorField | None], params: Sequence[Tensor]
) -> tuple[list[VectorField | None], list[Tensor]]:
    """NOTE [hooks once]: the adjoint takes one partial gradient per step with autograd.grad,
    which would run a parameter's tensor hooks (register_hook) on every partial, before
    autograd runs them once more on the total this node returns. And a tensor computed from
    others (a non-leaf, such as the coefficients of a spline built by a network) would lead
    each partial into the graph that made it, freed after the first. Fields that are modules
    are therefore evaluated with detached aliases of such parameters and buffers, and the
    partials are read off the aliases. Returns the fields to evaluate (the same objects when
    nothing needs an alias) and the tensors to differentiate."""
    aliases = {
        id(p): p.detach().requires_grad_()
        for p in params
        if p._backward_hooks or p.grad_fn is not None
    }
    if not aliases:
        return list(fields), list(params)
    reached: set[int] = set()

    def aliased(field: VectorField | None) -> VectorField | None:
        if not isinstance(field, nn.Module):
            return field
        named = itertools.chain(field.named_parameters(), field.named_buffers())
        swap = {name: aliases[id(p)] for name, p in named if id(p) in aliases}
        reached.update(id(p) for p in itertools.chain(field.parameters(), field.buffers()))
        return (lambda t, y: functional_call(field, swap, (t, y))) if swap else field

    swapped = [aliased(field) for field in fields]
    missing = [p for p in params if id(p) in aliases and id(p) not in reached]
    if any(p._backward_hooks for p in missing):
        raise ReversibilityError(
            "a tensor in adjoint_params has a tensor hook (register_hook) and is not a "
            "parameter of an nn.Module field, so the reversible adjoint would run the hook once "
            "per step. Register it with register_post_accumulate_grad_hook instead, make the "
            "field an nn.Module that owns the tensor, or solve with adjoint=False."
        )
    if missing:
        shapes = ", ".join(str(tuple(p.shape)) for p in missing)
        raise ReversibilityError(
            f"the field uses {len(missing)} tensor(s) computed from trainable ones (not leaves; "
            f"shapes {shapes}) that no nn.Module field owns. Compute them inside the field from "
            f"the leaf tensors, or make the field an nn.Module that holds them as parameters or "
            f"buffers; then the adjoint can pass their gradients on."
        )
    return swapped, [aliases.get(id(p), p) for p in params]


class _ReverseWalk:
    """Gradients for ``y0``, ``t`` and the parameters by the reverse walk described in the
    module docstring; ``totals`` and ``d_t`` collect them."""

    def __init__(
        self, problem: Problem, params: Sequence[Tensor], with_time: bool, device: torch.device
    ) -> None:
        self.problem, self.params = problem, list(params)
        self.totals: list[Tensor | None] = [None] * len(params)
        n_times = len(problem.grid.outputs)
        self.d_t = torch.zeros(n_times, dtype=torch.float64, device=device) if with_time else None

    def _time(self, n: int) -> Tensor | None:
        """Grid time ``n`` as a leaf, when ``t`` needs a gradient."""
        if self.d_t is None:
            return None
        t = self.problem.grid.times[n]
        return torch.tensor(t, dtype=torch.float64, device=self.d_t.device, requires_grad=True)

    def run(self, final: HeunState, d_ys: Tensor) -> Tensor:
        """The gradient for ``y0``; those for ``t`` and the parameters are left in ``d_t`` and
        ``totals``."""
        problem, noise = self.problem, self.problem.noise
        steps, outputs = problem.grid.steps, problem.grid.outputs
        output_at = {n: k for k, n in enumerate(outputs)}
        # The fields at the final state, re-evaluated with grad: the only extra evaluation.
        leaf, time = final.yh.detach().requires_grad_(), self._time(len(steps))
        with torch.enable_grad():
            f, g = problem.fields(len(steps), leaf, time)
        state = HeunState(final.y, final.yh, f, g)
        check_fields(state, [leaf, *self.params, *([time] if time is not None else [])])
        a_y = d_ys[output_at[len(steps)]].clone()
        # b is the adjoint of yh_{n+1} including what flows through f_{n+1} and g_{n+1}; the
        # adjoint of yh_n is then -b (yh_n enters yh_{n+1} negated and nowhere else).
        b, a_f = torch.zeros_like(a_y), torch.zeros_like(a_y)
        a_g = None if g is None else torch.zeros_like(g)
        for n in reversed(range(len(steps))):
            dt, dw = steps[n], problem.increment(n)
            # f_{n+1} and g_{n+1} also feed y_{n+1}: add that to their adjoints.
            a_f = a_f.add(a_y, alpha=dt / 2)
            if dw is not None:
                a_g = a_g + noise.cotangent(a_y, dw / 2)  # type: ignore[union-attr, operator]
            b = self._vjp(state, leaf, time, n + 1, a_f, a_g).sub_(b)
            f_next = state.f
            time = self._time(n)
            state, leaf = reverse_step(problem, state, n, with_grad=True, dw=dw, time=time)
            if self.d_t is not None:
                self._step_gradient(n, b, a_y, state.f, f_next)
            # Step n's inputs: y_n enters y_{n+1} once and yh_{n+1} twice; f_n and g_n both.
            a_y = a_y.add(b, alpha=2.0)
            a_f = a_y.mul(dt / 2)
            if dw is not None:
                a_g = noise.cotangent(a_y, dw / 2)  # type: ignore[union-attr]
            if n in output_at:
                a_y = a_y + d_ys[output_at[n]]
        # y0 is also yh_0, the point where f_0 and g_0 were evaluated.
        return (a_y - b).add_(self._vjp(state, leaf, time, 0, a_f, a_g))

    def _step_gradient(self, n: int, b: Tensor, a_y: Tensor, f: Tensor, f_next: Tensor) -> None:
        """dL/dh_n: h_n multiplies f_n in yh_{n+1} (adjoint b) and f_n + f_{n+1} in y_{n+1}."""
        with torch.no_grad():
            grad = (b * f).sum() + 0.5 * (a_y * (f + f_next)).sum()
        self.problem.grid.add_step_gradient(self.d_t, n, grad.double())  # type: ignore[arg-type]

    def _vjp(
        self,
        state: HeunState,
        leaf: Tensor,
        time: Tensor | None,
        n: int,
        a_f: Tensor,
        a_g: Tensor | None,
    ) -> Tensor:
        """Backpropagate ``(a_f, a_g)`` through the fields evaluated at ``leaf`` and ``time``
        (grid time ``n``); parameter and time gradients are added to ``totals`` and ``d_t``,
        the gradient for ``leaf`` is returned."""
        outputs, cotangents = [state.f], [a_f]
        if state.g is not None and a_g is not None:
            outputs.append(state.g)
            cotangents.append(a_g)
        live = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
        if not live:
            return torch.zeros_like(leaf)
        times = [] if time is None else [time]
        grads = torch.autograd.grad(
            [o for o, _ in live],
            [leaf, *times, *self.params],
            [c for _, c in live],
            allow_unused=True,
        )
        if time is not None and grads[1] is not None:
            self.problem.grid.add_time_gradient(self.d_t, n, grads[1])  # type: ignore[arg-type]
        for i, grad in enumerate(grads[1 + len(times) :]):
            if grad is not None:  # the first partial is copied: autograd.grad may hand back a
                total = self.totals[i]  # cotangent itself, which the walk still uses
                self.totals[i] = grad.clone() if total is None else total.add_(grad)
        return grads[0] if grads[0] is not None else torch.zeros_like(leaf)
