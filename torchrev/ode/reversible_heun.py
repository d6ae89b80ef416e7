"""Reversible Heun (Kidger et al. 2021): exact gradients in memory constant in the steps.

State :math:`(y_n, \\hat y_n)` and cached :math:`f_n = f(t_n, \\hat y_n)`,
:math:`g_n = g(t_n, \\hat y_n)`, with :math:`\\hat y_0 = y_0`:

.. math::
    \\hat y_{n+1} = 2 y_n - \\hat y_n + f_n \\Delta t + g_n \\Delta W_n, \\qquad
    y_{n+1} = y_n + (f_n + f_{n+1}) \\tfrac{\\Delta t}{2} + (g_n + g_{n+1}) \\tfrac{\\Delta W_n}{2}

and, algebraically, backwards:

.. math::
    \\hat y_n = 2 y_{n+1} - \\hat y_{n+1} - f_{n+1} \\Delta t - g_{n+1} \\Delta W_n, \\qquad
    y_n = y_{n+1} - (f_n + f_{n+1}) \\tfrac{\\Delta t}{2} - (g_n + g_{n+1}) \\tfrac{\\Delta W_n}{2}.

One evaluation of ``f`` (and ``g``) per step; ODE order 2, SDE strong order 0.5 (1 with additive
noise), Stratonovich. The trade-off: stable only for :math:`|\\mathrm{Im}(h\\lambda)| < 1` on the
imaginary axis, so stiff or strongly damped problems want another method.

The backward pass (:class:`_ReversibleAdjoint`) walks the steps in reverse, rebuilding each state
with the reverse formula from the final one. The field's evaluation at :math:`\\hat y_n` that the
rebuild needs is made with grad and serves the vector-Jacobian product of the next reverse step,
so the whole backward costs one evaluation and one VJP per step (direct backpropagation: one VJP),
keeps one step's graph alive, and gives the gradients of backpropagation through the same steps
up to floating-point rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .._core.errors import DOUBLE_BACKWARD, ReversibilityError
from .._core.leaves import check_tracked
from .._core.state import AutocastState, FunctionModes
from ._base import AbstractSolver, FiniteWatch, Grid, VectorField, evaluate

Brownian = Callable[[float, float, int], Tensor]


@dataclass(frozen=True)
class HeunState:
    """Everything a step needs: the solution, the auxiliary state and the cached fields."""

    y: Tensor
    yh: Tensor
    f: Tensor
    g: Tensor | None


@dataclass(frozen=True)
class Problem:
    """A drift, an optional diffusion with its Brownian increments, and the time grid."""

    f: VectorField
    g: VectorField | None
    grid: Grid
    brownian: Brownian | None

    def fields(self, n: int, yh: Tensor) -> tuple[Tensor, Tensor | None]:
        t = self.grid.times[n]
        g = None if self.g is None else evaluate(self.g, t, yh, n, name="g")
        return evaluate(self.f, t, yh, n), g

    def increment(self, n: int) -> Tensor | None:
        if self.brownian is None:
            return None
        t = self.grid.times
        return self.brownian(t[n], t[n + 1], n)


def initial_state(problem: Problem, y0: Tensor) -> HeunState:
    f, g = problem.fields(0, y0)
    return HeunState(y0, y0, f, g)


def forward_step(problem: Problem, state: HeunState, n: int) -> HeunState:
    """Step ``n``: from the state at ``t_n`` to the state at ``t_{n+1}``."""
    dt, dw = problem.grid.steps[n], problem.increment(n)
    yh = 2 * state.y - state.yh + state.f * dt
    if dw is not None:
        yh = yh + state.g * dw  # type: ignore[operator]
    f, g = problem.fields(n + 1, yh)
    y = state.y + (state.f + f) * (dt / 2)
    if dw is not None:
        y = y + (state.g + g) * (dw / 2)  # type: ignore[operator]
    return HeunState(y, yh, f, g)


def reverse_step(
    problem: Problem,
    state: HeunState,
    n: int,
    with_grad: bool = False,
    dw: Tensor | None = None,
) -> tuple[HeunState, Tensor]:
    """The state at ``t_n`` rebuilt from the one at ``t_{n+1}``; also the leaf ``yh`` at which
    the returned fields were evaluated (with grad if ``with_grad``). ``dw`` is step ``n``'s
    Brownian increment when the caller already drew it."""
    dt = problem.grid.steps[n]
    if dw is None:
        dw = problem.increment(n)
    with torch.no_grad():
        yh = torch.sub(2 * state.y, state.yh).sub_(state.f, alpha=dt)
        if dw is not None:
            yh = yh.sub_(state.g * dw)  # type: ignore[operator]
    leaf = yh.requires_grad_(with_grad)
    with torch.set_grad_enabled(with_grad):
        f, g = problem.fields(n, leaf)
    with torch.no_grad():
        y = state.y.sub(f, alpha=dt / 2).sub_(state.f, alpha=dt / 2)
        if dw is not None:
            y = y.sub_((g + state.g) * (dw / 2))  # type: ignore[operator]
    return HeunState(y, yh, f, g), leaf


def integrate(problem: Problem, y0: Tensor) -> tuple[Tensor, HeunState]:
    """The solution at the output times, stacked, and the final state."""
    state = initial_state(problem, y0)
    outputs, ys = set(problem.grid.outputs), [y0]
    watch = FiniteWatch(y0)
    for n in range(len(problem.grid.steps)):
        state = forward_step(problem, state, n)
        watch.see(state.f, n)
        if state.g is not None:
            watch.see(state.g, n)
        if n + 1 in outputs:
            ys.append(state.y)
    watch.check()
    return torch.stack(ys), state


def solve_direct(problem: Problem, y0: Tensor) -> Tensor:
    """The solution at the output times, differentiated by autograd through every step."""
    return integrate(problem, y0)[0]


class _ReversibleAdjoint(torch.autograd.Function):
    """The whole solve as one node: nothing stored but the final state."""

    @staticmethod
    def forward(ctx: Any, problem: Problem, params: Sequence[Tensor], y0: Tensor, *leaves: Tensor):
        with torch.no_grad():
            ys, state = integrate(problem, y0)
        ctx.problem, ctx.params, ctx.state = problem, params, state
        # The reverse walk re-evaluates the fields: under the forward's autocast settings and
        # torch function modes (NOTE [autocast replay], NOTE [function modes]), or it would
        # rebuild the states from different field values.
        ctx.autocast = AutocastState.capture(y0.device)
        ctx.modes = FunctionModes.capture()
        return ys

    @staticmethod
    def backward(ctx: Any, d_ys: Tensor) -> Any:
        if torch.is_grad_enabled():
            raise ReversibilityError(DOUBLE_BACKWARD)
        problem, params, state = ctx.problem, ctx.params, ctx.state
        if state is None:
            raise ReversibilityError(
                "backward ran twice through the same reversible Heun solve; solve again."
            )
        ctx.state = None
        problem, aliases = _hooks_once(problem, params)
        with ctx.autocast.replayed(), ctx.modes.replayed():
            grads = _adjoint(problem, aliases, state, d_ys)
        return (None, None, *grads)


def _hooks_once(problem: Problem, params: Sequence[Tensor]) -> tuple[Problem, list[Tensor]]:
    """NOTE [hooks once]: the adjoint takes one partial gradient per step with autograd.grad,
    which would run a parameter's tensor hooks (register_hook) on every partial, before
    autograd runs them once more on the total this node returns. Fields that are modules are
    therefore evaluated with detached aliases of their hooked parameters, and the partials
    are read off the aliases. Returns the problem to walk and the tensors to differentiate."""
    aliases = {id(p): p.detach().requires_grad_() for p in params if p._backward_hooks}
    if not aliases:
        return problem, list(params)
    reached: set[int] = set()

    def aliased(field: VectorField | None) -> VectorField | None:
        if not isinstance(field, nn.Module):
            return field
        swap = {n: aliases[id(p)] for n, p in field.named_parameters() if id(p) in aliases}
        reached.update(id(p) for p in field.parameters() if id(p) in aliases)
        return lambda t, y: functional_call(field, swap, (t, y))

    swapped = Problem(aliased(problem.f), aliased(problem.g), problem.grid, problem.brownian)
    if reached != aliases.keys():
        raise ReversibilityError(
            "a tensor in adjoint_params has a tensor hook (register_hook) and is not a "
            "parameter of an nn.Module field, so the reversible adjoint would run the hook once "
            "per step. Register it with register_post_accumulate_grad_hook instead, make the "
            "field an nn.Module that owns the tensor, or solve with ReversibleHeun(adjoint=False)."
        )
    return swapped, [aliases.get(id(p), p) for p in params]


def _adjoint(
    problem: Problem, params: Sequence[Tensor], final: HeunState, d_ys: Tensor
) -> list[Tensor | None]:
    """Gradients for ``(y0, *params)`` by the reverse walk described in the module docstring."""
    steps, outputs = problem.grid.steps, problem.grid.outputs
    output_at = {n: k for k, n in enumerate(outputs)}
    n_steps = len(steps)
    # The fields at the final state, re-evaluated with grad: the only extra evaluation.
    leaf = final.yh.detach().requires_grad_()
    with torch.enable_grad():
        f, g = problem.fields(n_steps, leaf)
    # Gradients leave the adjoint for y0 and the listed parameters only: refuse any other.
    check_tracked(
        [f] if g is None else [f, g],
        [leaf, *params],
        "the vector field",
        "List every tensor the fields should train in adjoint_params (it replaces the "
        "parameters of f and g when given), or detach those that should not train.",
    )
    state = HeunState(final.y, final.yh, f, g)
    a_y = d_ys[output_at[n_steps]].clone()
    # b is the adjoint of yh_{n+1} including what flows through f_{n+1} and g_{n+1}; the
    # adjoint of yh_n is then -b (yh_n enters yh_{n+1} negated and nowhere else).
    b = torch.zeros_like(a_y)
    a_f = torch.zeros_like(a_y)
    a_g = torch.zeros_like(a_y) if g is not None else None
    totals: list[Tensor | None] = [None] * len(params)
    for n in reversed(range(n_steps)):
        dt, dw = steps[n], problem.increment(n)
        # f_{n+1} and g_{n+1} also feed y_{n+1}: add that to their adjoints.
        a_f = a_f.add(a_y, alpha=dt / 2)
        if dw is not None:
            a_g = a_g + a_y * (dw / 2)  # type: ignore[operator]
        b = _vjp(state, leaf, params, a_f, a_g, totals).sub_(b)
        state, leaf = reverse_step(problem, state, n, with_grad=True, dw=dw)
        # Step n's inputs: y_n enters y_{n+1} once and yh_{n+1} twice; f_n and g_n both.
        a_f = torch.add(a_y, b, alpha=2.0).mul_(dt / 2)
        if dw is not None:
            a_g = torch.add(a_y, b, alpha=2.0).mul_(dw / 2)
        a_y = a_y.add(b, alpha=2.0)
        if n in output_at:
            a_y = a_y + d_ys[output_at[n]]
    # y0 is also yh_0, the point where f_0 and g_0 were evaluated.
    a_y0 = (a_y - b).add_(_vjp(state, leaf, params, a_f, a_g, totals))
    return [a_y0, *totals]


def _vjp(
    state: HeunState,
    leaf: Tensor,
    params: Sequence[Tensor],
    a_f: Tensor,
    a_g: Tensor | None,
    totals: list[Tensor | None],
) -> Tensor:
    """Backpropagate ``(a_f, a_g)`` through the fields evaluated at ``leaf``; parameter
    gradients are added to ``totals``, the gradient for ``leaf`` is returned."""
    outputs, cotangents = [state.f], [a_f]
    if state.g is not None and a_g is not None:
        outputs.append(state.g)
        cotangents.append(a_g)
    live = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    if not live:
        return torch.zeros_like(leaf)
    grads = torch.autograd.grad(
        [o for o, _ in live], [leaf, *params], [c for _, c in live], allow_unused=True
    )
    for i, grad in enumerate(grads[1:]):
        if grad is not None:
            totals[i] = grad if totals[i] is None else totals[i] + grad
    return grads[0] if grads[0] is not None else torch.zeros_like(leaf)


class ReversibleHeun(AbstractSolver):
    """The reversible Heun method; its default gradient is the memory-free reversible adjoint.

    ``adjoint=False`` backpropagates through the steps instead, storing them (the reference the
    tests compare the adjoint against).
    """

    evaluations = 1

    def __init__(self, adjoint: bool = True) -> None:
        self.adjoint = adjoint

    def step(self, f: VectorField, t: float, dt: float, y: Tensor, n: int) -> Tensor:
        raise NotImplementedError(
            "reversible Heun carries an auxiliary state between steps; call solve() (or "
            "torchrev.ode.odeint), not step()"
        )

    def solve(self, f: VectorField, y0: Tensor, grid: Grid) -> Tensor:
        return self.solve_problem(Problem(f, None, grid, None), y0, parameters_of(f))

    def solve_problem(self, problem: Problem, y0: Tensor, params: Sequence[Tensor]) -> Tensor:
        trainable = [p for p in params if p.requires_grad]
        needs_grad = torch.is_grad_enabled() and (y0.requires_grad or bool(trainable))
        if not self.adjoint or not needs_grad:
            return solve_direct(problem, y0)
        return _ReversibleAdjoint.apply(problem, trainable, y0, *trainable)


def parameters_of(*fields: Any) -> list[Tensor]:
    """The parameters of the fields that are modules, each once."""
    seen: dict[int, Tensor] = {}
    for field in fields:
        if isinstance(field, torch.nn.Module):
            seen.update((id(p), p) for p in field.parameters())
    return list(seen.values())
