"""The reversible adjoint of a reversible Runge-Kutta solve: backpropagation's gradients in
memory that does not grow with the steps (but for exact reversal's few bits per step).

The backward walks the steps in reverse. Step :math:`n` first evaluates
:math:`\\Psi_{-h}(t_{n+1}, y_{n+1})` with grad, rebuilds :math:`z_n`, evaluates
:math:`\\Psi_h(t_n, z_n)` with grad and rebuilds :math:`y_n` (:mod:`._rk_scheme`); the two
evaluations are the forward step's own, so one more pass of the step's stages (what the
forward cost) gives both the states and the vector-Jacobian products.

NOTE [bitwise adjoint]: autograd runs a graph's nodes in decreasing creation order, and
accumulates each tensor's gradient in that order, first contribution first. The walk builds
each step's two halves as the forward built them (the same functions, NOTE [one op order])
and hands autograd the gradients accumulated so far as the cotangent of a view created after
them (``x.view_as(x)``), so that they are added first, as they are in backpropagation through
the whole solve; the parameters' totals are carried the same way. With exact reversal the
rebuilt states are the forward's bits, and the gradients for ``y0`` and the parameters then
equal backpropagation through the same solver bit for bit (``tests/test_ode_rk.py``). Without
it the rebuilt states are off by rounding amplified by about :math:`1/\\lambda` per step.

NOTE [exact reversal of a step]: the forward records, per step, the integer corrections that
turn the rebuilt :math:`z_n` and :math:`y_n` into the forward's bits
(:class:`torchrev._core.exact.Correction`, a few bits per element) and checksums of the two
increments, which the backward compares before using a correction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .._core.errors import ReversibilityError
from .._core.exact import Correction
from .._core.fingerprint import checksum
from .._core.leaves import check_tracked
from .._core.state import AutocastState, FunctionModes
from ._base import as_time
from ._rk_march import RKProblem, march
from ._rk_scheme import Step, Terms, combine_y, increment, rebuild_y, rebuild_z
from ._rk_scheme import reverse_increments as psi_back
from .adjoint import _FIX, alias_fields, take_once
from .grid import Grid


@dataclass(frozen=True)
class ExactRecord:
    """What step ``n`` stores to be undone bit for bit."""

    z: Correction
    y: Correction
    sums: tuple[Tensor, Tensor]  # checksums of Psi_h(t_n, z_n) and Psi_{-h}(t_{n+1}, y_{n+1})


def record_exact(lam: float, y: Tensor, z: Tensor, step: Step) -> ExactRecord:
    """After the forward step, the corrections the backward's rebuild will need."""
    z_rebuilt = rebuild_z(step.z, step.p2)
    cz = Correction.between(z, z_rebuilt)
    cy = Correction.between(y, rebuild_y(lam, step.y, z, step.p1))
    return ExactRecord(cz, cy, (checksum(step.p1), checksum(step.p2)))


class RKAdjoint(torch.autograd.Function):
    """The whole reversible Runge-Kutta solve as one node."""

    @staticmethod
    def forward(
        ctx: Any,
        problem: RKProblem,
        exact: bool,
        params: Sequence[Tensor],
        y0: Tensor,
        t: Tensor | None,
        *_: Tensor,
    ) -> Tensor:
        fields = (problem.terms.f, problem.terms.g)
        depends = any(getattr(x, "values_depend_on_grad_mode", False) for x in fields)
        (f, g), aliases = alias_fields(fields, params)
        problem = replace(problem, terms=Terms(f, g, problem.terms.noise))  # type: ignore[arg-type]
        _check_fields(problem, y0, aliases)
        records: list[ExactRecord] = []

        def keep(n: int, y: Tensor, z: Tensor, step: Step) -> None:
            records.append(record_exact(problem.lam, y, z, step))

        # NOTE [grad mode of the forward]: the backward evaluates with grad. A field whose
        # values depend on grad mode (torchrev's CDE field picks other kernels without it)
        # says so with ``values_depend_on_grad_mode = True`` and is evaluated with grad here
        # too, so that the rebuild sees the same bits; every other field runs without (about
        # a quarter faster), the checksums of exact reversal catching one that does differ.
        with torch.set_grad_enabled(depends):
            ys, grid, z = march(problem, y0.detach(), detach=True, record=keep if exact else None)
        ctx.problem, ctx.grid, ctx.params = problem, grid, aliases
        ctx.records = records if exact else None
        ctx.final = (ys[-1], z)
        ctx.autocast = AutocastState.capture(y0.device)
        ctx.modes = FunctionModes.capture()
        return torch.stack(ys)

    @staticmethod
    def backward(ctx: Any, d_ys: Tensor) -> Any:
        final = take_once(ctx, "final", "reversible Runge-Kutta")
        with ctx.autocast.replayed(), ctx.modes.replayed():
            walk = _Walk(ctx.problem, ctx.grid, ctx.params, ctx.records, ctx.needs_input_grad[4])
            d_y0 = walk.run(*final, d_ys)
        d_t = None if walk.d_t is None else walk.d_t.to(ctx.grid.source)
        return (None, None, None, d_y0, d_t, *walk.totals)


def _check_fields(problem: RKProblem, y0: Tensor, known: Sequence[Tensor]) -> None:
    """Evaluate the fields once with grad and raise if they train a tensor the adjoint cannot
    return a gradient for: the error comes at the call, not in backward."""
    start = y0.detach().requires_grad_()
    terms, t0 = problem.terms, problem.targets[0]
    with torch.enable_grad():
        outs = [terms.f(as_time(t0, start), start)]
        if terms.g is not None:
            outs.append(terms.g(as_time(t0, start), start))
    check_tracked(outs, [start, *known], "the field", _FIX)


class _Walk:
    """The reverse walk of NOTE [bitwise adjoint]; ``totals`` and ``d_t`` collect the
    gradients for the parameters and ``t``."""

    def __init__(
        self,
        problem: RKProblem,
        grid: Grid,
        params: Sequence[Tensor],
        records: list[ExactRecord] | None,
        with_time: bool,
    ) -> None:
        self.problem, self.grid, self.params, self.records = problem, grid, list(params), records
        self.totals: list[Tensor | None] = [None] * len(self.params)
        self.d_t = torch.zeros(len(grid.outputs), dtype=torch.float64) if with_time else None

    def run(self, y: Tensor, z: Tensor, d_ys: Tensor) -> Tensor:
        grid = self.grid
        at = {n: k for k, n in enumerate(grid.outputs)}
        a_y, a_z = d_ys[at[len(grid.steps)]], None
        for n in reversed(range(len(grid.steps))):
            y, z, a_y, a_z = self._step(n, y, z, a_y, a_z, d_ys[at[n]] if n in at else None)
            if n > 0 and n in at:
                a_y = d_ys[at[n]] + a_y
        return a_y

    def _times(self, n: int) -> tuple[Any, Any, Any]:
        """Step ``n``'s (t_n, t_{n+1}, h_n): floats, or leaves when ``t`` needs a gradient."""
        grid = self.grid
        values = (grid.times[n], grid.times[n + 1], grid.steps[n])
        if self.d_t is None:
            return values
        return tuple(torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values)

    def _step(
        self, n: int, y1: Tensor, z1: Tensor, a_y: Tensor, a_z: Tensor | None, d0: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Reverse step ``n``: the state at ``t_n`` and the adjoints of ``y_n`` (excluding the
        output's own cotangent but at step 0) and ``z_n``."""
        problem, lam = self.problem, self.problem.lam
        times = self._times(n)
        dw = problem.increment(self.grid.times[n], self.grid.times[n + 1], n)
        leaf = y1.detach().requires_grad_()
        with torch.enable_grad():
            p2 = psi_back(problem.tableau, problem.terms, times, dw, leaf, n)
        if a_z is not None:  # the final z feeds nothing: its half of the step has no gradient
            grads = self._vjp([p2], [torch.neg(a_z)], leaf, a_y, [times[1], times[2]])
            a_y = grads[0]
            self._time_grads(n, grads[1:])
        z0 = self._exact(rebuild_z(z1, p2.detach()), n, "z", p2)
        first = n == 0
        z_leaf = z0.requires_grad_()
        with torch.enable_grad():
            p1 = increment(problem.tableau, problem.terms, times[0], times[2], dw, z_leaf, n)[0]
        y0 = self._exact(rebuild_y(lam, y1, z0.detach(), p1.detach()), n, "y", p1)
        y_leaf = z_leaf if first else y0.requires_grad_()
        with torch.enable_grad():
            outs = [combine_y(lam, y_leaf, z_leaf, p1)]
            cots = [a_y]
            if a_z is not None:
                outs.append(z_leaf - p2.detach())
                cots.append(a_z)
        inputs = [y_leaf] if first else [y_leaf, z_leaf]
        grads = self._vjp(outs, cots, inputs, d0 if first else None, [times[0], times[2]])
        self._time_grads(n, grads[len(inputs) :], first_half=True)
        if first:
            return y0, z0, grads[0], None
        return y0, z0.detach(), grads[0], grads[1]

    def _exact(self, rebuilt: Tensor, n: int, which: str, psi: Tensor) -> Tensor:
        """Apply step ``n``'s correction for ``which`` state, after checking the increment it
        was rebuilt from against the forward's (NOTE [exact reversal of a step])."""
        if self.records is None:
            return rebuilt
        record = self.records[n]
        index = 0 if which == "y" else 1
        if not torch.equal(checksum(psi.detach()), record.sums[index]):
            raise ReversibilityError(
                f"the vector field returned different values in backward than in forward at "
                f"step {n}, so the state cannot be rebuilt exactly and the gradients would be "
                f"wrong. Make the field deterministic (torch.use_deterministic_algorithms(True)"
                f", no random draws); if it computes differently with and without grad, set "
                f"its attribute values_depend_on_grad_mode = True."
            )
        correction = record.y if which == "y" else record.z
        self.records[n] = replace(record, **{which: None})  # type: ignore[arg-type]
        return correction.apply_(rebuilt)

    def _vjp(
        self,
        outs: list[Tensor],
        cots: list[Tensor],
        inputs: Tensor | list[Tensor],
        first: Tensor | None,
        times: list[Any],
    ) -> list[Tensor | None]:
        """Backpropagate ``cots`` through ``outs`` to ``inputs``, the parameters and the time
        leaves, with the gradients so far entering first (NOTE [bitwise adjoint]): ``first``
        for the (single) input, the parameters' totals."""
        inputs = [inputs] if isinstance(inputs, Tensor) else inputs
        outs, cots = list(outs), list(cots)
        with torch.enable_grad():
            if first is not None:
                outs.append(inputs[0].view_as(inputs[0]))
                cots.append(first)
            for p, total in zip(self.params, self.totals):
                if total is not None:
                    outs.append(p.view_as(p))
                    cots.append(total)
        leaves = [x for x in times if isinstance(x, Tensor)]
        live = [(o, c) for o, c in zip(outs, cots) if o.requires_grad]
        grads = torch.autograd.grad(
            [o for o, _ in live],
            [*inputs, *leaves, *self.params],
            [c for _, c in live],
            allow_unused=True,
        )
        for i, grad in enumerate(grads[len(inputs) + len(leaves) :]):
            if grad is not None:
                self.totals[i] = grad
        ins = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, inputs)]
        return [*ins, *grads[len(inputs) : len(inputs) + len(leaves)]]

    def _time_grads(self, n: int, grads: Sequence[Tensor | None], first_half: bool = False) -> None:
        """Map the gradients of step ``n``'s time leaves (``t_{n+1}`` or ``t_n``, then
        ``h_n``) onto ``t``."""
        if self.d_t is None:
            return
        point, size = grads
        if point is not None:
            self.grid.add_time_gradient(self.d_t, n if first_half else n + 1, point.double())
        if size is not None:
            self.grid.add_step_gradient(self.d_t, n, size.double())
