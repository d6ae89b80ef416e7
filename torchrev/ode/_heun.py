"""The reversible Heun scheme: its state, one step forwards and the algebraic step back.

State :math:`(y_n, \\hat y_n)` and cached :math:`f_n = f(T_n, \\hat y_n)`,
:math:`g_n = g(T_n, \\hat y_n)`, with :math:`\\hat y_0 = y_0`, step :math:`h_n` and Brownian
increment :math:`\\Delta W_n` (:math:`g \\Delta W` as the noise type says, :mod:`.noise`):

.. math::
    \\hat y_{n+1} = 2 y_n - \\hat y_n + f_n h_n + g_n \\Delta W_n, \\qquad
    y_{n+1} = y_n + (f_n + f_{n+1}) \\tfrac{h_n}{2} + (g_n + g_{n+1}) \\tfrac{\\Delta W_n}{2}

and, algebraically, backwards:

.. math::
    \\hat y_n = 2 y_{n+1} - \\hat y_{n+1} - f_{n+1} h_n - g_{n+1} \\Delta W_n, \\qquad
    y_n = y_{n+1} - (f_n + f_{n+1}) \\tfrac{h_n}{2} - (g_n + g_{n+1}) \\tfrac{\\Delta W_n}{2}.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._base import FiniteWatch, Time, VectorField, as_time, check_brownian, evaluate
from .brownian import BrownianIncrements
from .grid import Grid
from .noise import Noise

Brownian = Callable[[float, float, int], Tensor]


@dataclass(frozen=True)
class HeunState:
    """Everything a step needs: the solution, the auxiliary state and the cached fields."""

    y: Tensor
    yh: Tensor
    f: Tensor
    g: Tensor | None


@dataclass(frozen=True, eq=False)
class Problem:
    """A drift, an optional diffusion with its noise type and Brownian increments (drawn from
    ``seed`` unless ``brownian`` is given), and the time grid."""

    f: VectorField
    g: VectorField | None
    grid: Grid
    noise: Noise | None = None
    brownian: Brownian | None = None
    seed: int = 0

    def fields(self, n: int, yh: Tensor, time: Time | None = None) -> tuple[Tensor, Tensor | None]:
        """The drift and diffusion at ``yh`` and the grid's time ``n`` (or ``time``)."""
        t = self.grid.time(n) if time is None else time
        f = evaluate(self.f, t, yh, n)
        if self.g is None:
            return f, None
        return f, evaluate(self.g, t, yh, n, name="g", shape=self.noise.g_shape)  # type: ignore[union-attr]

    def resolved(self, g0: Tensor, y0: Tensor) -> Problem:
        """This problem with its noise shape read off ``g(t0, y0)`` and its increments set."""
        noise = (self.noise or Noise("diagonal")).resolve(g0, y0)
        brownian = self.brownian or BrownianIncrements(
            self.seed, noise.increment_shape, y0.dtype, y0.device
        )
        return dataclasses.replace(self, noise=noise, brownian=brownian)

    def increment(self, n: int) -> Tensor | None:
        if self.brownian is None:
            return None
        t = self.grid.times
        want = self.noise.increment_shape  # type: ignore[union-attr]
        return check_brownian(self.brownian(t[n], t[n + 1], n), want, n)


def initial_state(problem: Problem, y0: Tensor) -> tuple[Problem, HeunState]:
    """The state at ``t0`` (one evaluation of each field) and the problem with its noise
    shape resolved from the diffusion's first output."""
    t0 = problem.grid.time(0)
    f = evaluate(problem.f, t0, y0, 0)
    if problem.g is None:
        return problem, HeunState(y0, y0, f, None)
    g = problem.g(as_time(t0, y0), y0)
    return problem.resolved(g, y0), HeunState(y0, y0, f, g)


def forward_step(problem: Problem, state: HeunState, n: int) -> HeunState:
    """Step ``n``: from the state at ``t_n`` to the state at ``t_{n+1}``."""
    dt, dw = problem.grid.step(n), problem.increment(n)
    yh = _add(2 * state.y - state.yh, state.f, dt)
    if dw is not None:
        yh = yh + problem.noise.prod(state.g, dw)  # type: ignore[union-attr, arg-type]
    f, g = problem.fields(n + 1, yh)
    y = _add(state.y, state.f + f, dt / 2)
    if dw is not None:
        y = y + problem.noise.prod(state.g + g, dw / 2)  # type: ignore[union-attr, operator]
    return HeunState(y, yh, f, g)


def _add(x: Tensor, y: Tensor, a: Time) -> Tensor:
    """``x + a y``: one operation when ``a`` is a number, not a tensor carrying a gradient."""
    return x + y * a if isinstance(a, Tensor) else x.add(y, alpha=a)


def reverse_step(
    problem: Problem,
    state: HeunState,
    n: int,
    with_grad: bool = False,
    dw: Tensor | None = None,
    time: Tensor | None = None,
) -> tuple[HeunState, Tensor]:
    """The state at ``t_n`` rebuilt from the one at ``t_{n+1}``; also the leaf ``yh`` at which
    the returned fields were evaluated (with grad if ``with_grad``, at ``time`` if given).
    ``dw`` is step ``n``'s Brownian increment when the caller already drew it."""
    dt = problem.grid.steps[n]
    if dw is None:
        dw = problem.increment(n)
    noise = problem.noise
    with torch.no_grad():
        yh = torch.sub(2 * state.y, state.yh).sub_(state.f, alpha=dt)
        if dw is not None:
            yh = yh.sub_(noise.prod(state.g, dw))  # type: ignore[union-attr, arg-type]
    leaf = yh.requires_grad_(with_grad)
    with torch.set_grad_enabled(with_grad):
        f, g = problem.fields(n, leaf, time)
    with torch.no_grad():
        y = state.y.sub(f, alpha=dt / 2).sub_(state.f, alpha=dt / 2)
        if dw is not None:
            y = y.sub_(noise.prod(g + state.g, dw / 2))  # type: ignore[union-attr, operator]
    return HeunState(y, yh, f, g), leaf


def integrate(problem: Problem, state: HeunState) -> tuple[Tensor, HeunState]:
    """From the initial ``state``: the solution at the output times, stacked, and the final
    state."""
    outputs, ys = set(problem.grid.outputs), [state.y]
    watch = FiniteWatch(state.y)
    for n in range(len(problem.grid.steps)):
        state = forward_step(problem, state, n)
        watch.see(*([state.f] if state.g is None else [state.f, state.g]))
        if n + 1 in outputs:
            ys.append(state.y)
    watch.check()
    return torch.stack(ys), state


def solve_direct(problem: Problem, y0: Tensor) -> Tensor:
    """The solution at the output times, differentiated by autograd through every step
    (and through the step times when ``t`` requires grad)."""
    problem = dataclasses.replace(problem, grid=problem.grid.differentiable())
    problem, state = initial_state(problem, y0)
    return integrate(problem, state)[0]
