"""The forward loop of a reversible Runge-Kutta solve, on a fixed grid or with adaptive steps.

The same loop serves backpropagation (``detach=False``) and the reversible adjoint's forward
(``detach=True``, each step's graph dropped as soon as it is taken), so both take the same
steps with the same operations (NOTE [one op order] in :mod:`._rk_scheme`). An adaptive solve
returns the grid of its accepted steps, which the adjoint walks back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._base import FiniteWatch, Time, check_brownian
from ._rk_scheme import Step, Terms, forward_step, increment
from .adaptive import AdaptiveSteps, Controller, error_ratio, first_step
from .grid import Grid
from .tableau import ButcherTableau

Brownian = Callable[[float, float, int], Tensor]
#: Called after each accepted step with its index, its inputs (y_n, z_n) and the Step.
Record = Callable[[int, Tensor, Tensor, Step], None]


@dataclass(frozen=True, eq=False)
class RKProblem:
    """What a solve needs: the method, the terms, and either a fixed ``grid`` or the requested
    ``targets`` (the requested times) with ``adaptive`` settings; Brownian increments for an SDE."""

    tableau: ButcherTableau
    lam: float
    terms: Terms
    grid: Grid | None
    targets: tuple[float, ...]
    adaptive: AdaptiveSteps | None = None
    brownian: Brownian | None = None

    def increment(self, t0: float, t1: float, n: int) -> Tensor | None:
        if self.brownian is None:
            return None
        want = self.terms.noise.increment_shape  # type: ignore[union-attr]
        return check_brownian(self.brownian(t0, t1, n), want, n)

    def step_times(self, n: int, grid: Grid) -> tuple[Time, Time, Time]:
        return grid.time(n), grid.time(n + 1), grid.step(n)


def march(
    problem: RKProblem, y0: Tensor, detach: bool, record: Record | None = None
) -> tuple[list[Tensor], Grid, Tensor]:
    """The solution at the output times, the grid of the steps taken and the final
    auxiliary state ``z``."""
    if problem.adaptive is not None:
        return _march_adaptive(problem, problem.adaptive, y0, detach, record)
    grid = problem.grid if detach else problem.grid.differentiable()  # type: ignore[union-attr]
    y, z, ys = y0, y0, [y0]
    outputs, watch = set(grid.outputs), FiniteWatch(y0)
    for n in range(len(grid.steps)):
        dw = problem.increment(grid.times[n], grid.times[n + 1], n)
        step = forward_step(
            problem.tableau, problem.terms, problem.lam, problem.step_times(n, grid), dw, y, z, n
        )
        y, z = _take(step, n, y, z, detach, record)
        watch.see(y, z)
        if n + 1 in outputs:
            ys.append(y)
    watch.check()
    return ys, grid, z


def _take(
    step: Step, n: int, y: Tensor, z: Tensor, detach: bool, record: Record | None
) -> tuple[Tensor, Tensor]:
    if detach:
        step = Step(step.y.detach(), step.z.detach(), step.p1.detach(), step.p2.detach())
    if record is not None:
        record(n, y, z, step)
    return step.y, step.z


def _march_adaptive(
    problem: RKProblem, steps: AdaptiveSteps, y0: Tensor, detach: bool, record: Record | None
) -> tuple[list[Tensor], Grid, Tensor]:
    """Steps chosen by the controller (:mod:`.adaptive`), clipped to land on every requested
    time; rejected steps leave no trace but their cost."""
    tableau, terms, lam = problem.tableau, problem.terms, problem.lam
    targets = problem.targets
    sign = 1.0 if targets[-1] > targets[0] else -1.0
    controller = Controller(steps, tableau.error_order)  # type: ignore[arg-type]
    with torch.no_grad():
        f0 = terms.control(targets[0], y0, 1.0, None, 0)
    h = first_step(f0, y0, tableau.order, targets[-1] - targets[0], steps)
    y, z, ys = y0, y0, [y0]
    times, sizes, outputs, intervals = [targets[0]], [], [0], []
    tried = 0
    for k, target in enumerate(targets[1:]):
        while times[-1] != target:
            tried += 1
            if tried > steps.max_steps:
                raise RuntimeError(
                    f"the adaptive solve took more than max_steps={steps.max_steps} steps (at "
                    f"t = {times[-1]:.6g} of {targets[-1]:.6g}); raise max_steps, loosen "
                    f"rtol/atol, or check whether the problem is stiff (then fixed small steps, "
                    f"or a smaller lam, may do better)."
                )
            t0, n = times[-1], len(sizes)
            clipped = abs(target - t0) <= h * (1 + 1e-10)
            t1 = target if clipped else t0 + sign * h
            dt = t1 - t0
            dw = problem.increment(t0, t1, n)
            p1, error = increment(tableau, terms, t0, dt, dw, z, n, error=True)
            ratio = error_ratio(error, z, p1.detach(), steps)  # type: ignore[arg-type]
            accepted = ratio <= 1.0
            h = controller.next_size(abs(dt), ratio, accepted)
            if not accepted:
                continue
            step = forward_step(tableau, terms, lam, (t0, t1, dt), dw, y, z, n, p1=p1)
            y, z = _take(step, n, y, z, detach, record)
            times.append(t1)
            sizes.append(dt)
            intervals.append(k)
        outputs.append(len(sizes))
        ys.append(y)
    return ys, Grid(tuple(times), tuple(sizes), tuple(outputs), tuple(intervals)), z
