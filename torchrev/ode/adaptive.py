"""Adaptive step sizes: an embedded error estimate and a PID controller.

A step of size :math:`h` is accepted when its scaled error

.. math:: r = \\sqrt{\\tfrac{1}{N} \\sum_i \\big(e_i / (\\mathrm{atol} +
    \\mathrm{rtol}\\, \\max(|z_i|, |z_i + \\Psi_i|))\\big)^2} \\le 1,

with :math:`e` the tableau's embedded estimate (:mod:`.tableau`) on the step
:math:`\\Psi_h(t_n, z_n)` the reversible scheme takes. The next size is

.. math:: h' = h\\, \\mathrm{safety}\\, r_n^{-\\beta_1 / k}\\, r_{n-1}^{-\\beta_2 / k}\\,
    r_{n-2}^{-\\beta_3 / k}, \\quad k = \\text{error order} + 1,

:math:`\\beta_1 = p + i + d`, :math:`\\beta_2 = -(p + 2d)`, :math:`\\beta_3 = d` from the
proportional, integral and derivative coefficients (an I controller is ``icoeff=1`` alone),
clipped to ``[factor_min, factor_max]``. The trade-off: each step's error is read on the
host (one synchronisation per step), and a rejected step costs its stages for nothing. The
accepted times are kept (one float per step), so the reverse pass walks the same grid and
the step sizes, chosen from values, carry no gradient (as a fixed grid's step counts do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class AdaptiveSteps:
    """Tolerances, the step budget and the controller of an adaptive solve."""

    rtol: float = 1e-6
    atol: float = 1e-8
    max_steps: int = 100_000
    pcoeff: float = 0.0
    icoeff: float = 1.0
    dcoeff: float = 0.0
    safety: float = 0.9
    factor_min: float = 0.2
    factor_max: float = 10.0
    first_step: float | None = None

    def __post_init__(self) -> None:
        if not (self.rtol >= 0 and self.atol >= 0 and self.rtol + self.atol > 0):
            raise ValueError(
                f"rtol and atol must be non-negative and not both 0, got rtol={self.rtol}, "
                f"atol={self.atol}; for example rtol=1e-6, atol=1e-8."
            )
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, got {self.max_steps}.")

    @classmethod
    def pid(cls, rtol: float = 1e-6, atol: float = 1e-8, **kwargs: float) -> AdaptiveSteps:
        """A PID controller, p = 0.3, i = 0.3, d = 0.1 (smoother step sequences than the I
        controller's, which reacts to each step's error alone)."""
        return cls(rtol, atol, pcoeff=0.3, icoeff=0.3, dcoeff=0.1, **kwargs)  # type: ignore[arg-type]


def error_ratio(error: Tensor, z: Tensor, psi: Tensor, steps: AdaptiveSteps) -> float:
    """The scaled RMS error :math:`r` of the module docstring (inf if not finite)."""
    with torch.no_grad():
        scale = torch.maximum(z.abs(), (z + psi).abs()).mul_(steps.rtol).add_(steps.atol)
        ratio = float(error.div(scale).square().mean().sqrt())
    return ratio if math.isfinite(ratio) else math.inf


@dataclass
class Controller:
    """The step-size sequence of one solve: ``propose`` the next size after a step's error
    ratio; keeps the last two accepted ratios for the P and D terms."""

    steps: AdaptiveSteps
    order: int
    history: list[float] = field(default_factory=lambda: [1.0, 1.0])

    def next_size(self, h: float, ratio: float, accepted: bool) -> float:
        s, k = self.steps, self.order + 1
        r = max(ratio, 1e-10)
        if not accepted or math.isinf(ratio):
            factor = s.factor_min if math.isinf(ratio) else s.safety * r ** (-1 / k)
            return h * min(1.0, max(s.factor_min, factor))
        b1 = s.pcoeff + s.icoeff + s.dcoeff
        b2, b3 = -(s.pcoeff + 2 * s.dcoeff), s.dcoeff
        r1, r2 = self.history
        factor = s.safety * r ** (-b1 / k) * r1 ** (-b2 / k) * r2 ** (-b3 / k)
        self.history = [r, r1]
        return h * min(s.factor_max, max(s.factor_min, factor))


def first_step(f0: Tensor, y0: Tensor, order: int, span: float, steps: AdaptiveSteps) -> float:
    """An initial step size (Hairer, Norsett & Wanner's first guess): ``0.01 |y0| / |f0|``
    in the tolerances' norm, at most the span; ``steps.first_step`` if given."""
    if steps.first_step is not None:
        return min(abs(steps.first_step), abs(span))
    with torch.no_grad():
        scale = y0.abs().mul(steps.rtol).add_(steps.atol)
        d0 = float(y0.div(scale).square().mean().sqrt())
        d1 = float(f0.div(scale).square().mean().sqrt())
    h = 1e-6 if d0 < 1e-5 or d1 < 1e-5 or not math.isfinite(d1) else 0.01 * d0 / d1
    return min(h, abs(span))
