"""Reversible Runge-Kutta (McCallum & Foster 2024): orders, stability, the adjoint against
backpropagation through the same solver (bitwise under exact reversal), adaptive steps and
memory."""

import math

import pytest
import torch
from torch import nn

from torchrev.bench import training_step_peak
from torchrev.ode import (
    AdaptiveSteps,
    ButcherTableau,
    ReversibleHeun,
    ReversibleRK,
    cdeint,
    natural_cubic_coeffs,
    odeint,
    sdeint,
)
from torchrev.ode.cubic import CubicSpline

F64 = torch.float64
T = torch.tensor([0.0, 2.0], dtype=F64)


def growth(t, y):
    """y' = cos(t) y: y(t) = exp(sin t) from 1."""
    return torch.cos(t) * y


def observed_order(method, dts):
    errors = []
    for dt in dts:
        y = odeint(growth, torch.ones(1, dtype=F64), T, method=method, dt=dt)[-1]
        errors.append(abs(y.item() - math.exp(math.sin(2.0))))
    return math.log(errors[0] / errors[-1]) / math.log(dts[0] / dts[-1])


KUTTA3 = ButcherTableau(
    a=((), (0.5,), (-1.0, 2.0)), b=(1 / 6, 2 / 3, 1 / 6), c=(0.0, 0.5, 1.0), order=3
)


@pytest.mark.parametrize(
    ("tableau", "lam", "dts"),
    [
        ("euler", 0.5, (0.01, 0.005)),
        ("midpoint", 0.5, (0.02, 0.01)),
        ("ralston3", 0.5, (0.02, 0.01)),
        ("rk4", 0.5, (0.04, 0.02)),
        ("midpoint", 0.999, (0.02, 0.01)),
        ("rk4", 0.999, (0.1, 0.05)),
        (KUTTA3, 0.5, (0.02, 0.01)),
    ],
)
def test_observed_orders(tableau, lam, dts):
    # With lam near 1 the coupling (1 - lam) / h per unit time changes with h, which blurs the
    # slope where N (1 - lam) is near 1 (documented); these windows are clear of that.
    method = ReversibleRK(tableau, lam=lam, adjoint=False)
    slope = observed_order(method, dts)
    assert abs(slope - method.tableau.order) <= 0.2


def oscillator(a, omega):
    matrix = torch.tensor([[-a, omega], [-omega, -a]], dtype=F64)
    return lambda t, y: y @ matrix.T


@pytest.mark.parametrize(
    ("field", "dt", "lam"),
    [
        (oscillator(0.5, 20.0), 0.1, 0.9),  # h * eigenvalue = -0.05 +- 2i
        (lambda t, y: -50.0 * y, 0.01, 0.5),  # h * eigenvalue = -0.5
    ],
)
def test_stable_where_reversible_heun_is_not(field, dt, lam):
    y0, t = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 20.0], dtype=F64)
    y = odeint(field, y0, t, method=ReversibleRK("rk4", lam=lam, adjoint=False), dt=dt)[-1]
    assert y.abs().max() < 1e-2  # decays from 1 (the true solution to below 1e-4)
    try:
        heun = odeint(field, y0, t, method=ReversibleHeun(adjoint=False), dt=dt)[-1]
    except FloatingPointError:  # it overflowed
        return
    assert heun.abs().max() > 1e3


class Field(nn.Module):
    def __init__(self, dim=3, dtype=F64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, dim)).to(dtype)

    def forward(self, t, y):
        return self.net(y) * torch.cos(t) - y


def gradients(method, dtype=F64, adaptive_tol=None, time_grad=False, dt=0.05):
    torch.manual_seed(0)
    f = Field(dtype=dtype)
    y0 = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=dtype, requires_grad=time_grad)
    kwargs = {"dt": dt} if adaptive_tol is None else {"rtol": adaptive_tol, "atol": 1e-6}
    ys = odeint(f, y0, t, method=method, **kwargs)
    weights = torch.linspace(-1, 1, ys.numel(), dtype=dtype).view(ys.shape)
    inputs = [y0, *f.parameters(), *([t] if time_grad else [])]
    return torch.autograd.grad((ys * weights).sum(), inputs)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("tableau", ["euler", "midpoint", "ralston3", "rk4"])
def test_exact_adjoint_equals_backprop_bitwise(tableau, dtype):
    got = gradients(ReversibleRK(tableau), dtype)
    want = gradients(ReversibleRK(tableau, adjoint=False), dtype)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("tableau", ["bosh3", "dopri5"])
def test_adaptive_adjoint_equals_backprop_bitwise(tableau):
    got = gradients(f"reversible_{tableau}", adaptive_tol=1e-5)
    want = gradients(ReversibleRK(tableau, adjoint=False), adaptive_tol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_float_reversal_within_1e_10_and_exact_needed_for_small_lam():
    for lam, bound in ((0.999, 1e-10), (0.5, None)):
        want = gradients(ReversibleRK("rk4", lam=lam, adjoint=False), dt=0.02)
        got = gradients(ReversibleRK("rk4", lam=lam, exact=False), dt=0.02)
        error = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, want))
        if bound is not None:
            assert error < bound
        else:  # dividing by 0.5 doubles the rounding error at every step (50 of them)
            assert error > 1e-8
        exact = gradients(ReversibleRK("rk4", lam=lam, exact=True), dt=0.02)
        assert all(torch.equal(a, b) for a, b in zip(exact, want))


def test_time_gradients_match_backprop():
    got = gradients(ReversibleRK("midpoint"), time_grad=True)
    want = gradients(ReversibleRK("midpoint", adjoint=False), time_grad=True)
    torch.testing.assert_close(got[-1], want[-1], rtol=1e-10, atol=1e-12)


def test_adaptive_steps_meet_the_tolerance_and_hit_every_output():
    t = torch.tensor([0.0, 0.7, 2.0], dtype=F64)
    y0 = torch.ones(1, dtype=F64)
    counts, errors = [], []
    for rtol in (1e-4, 1e-7):
        calls = []

        def f(t, y, calls=calls):
            calls.append(float(t))
            return growth(t, y)

        ys = odeint(f, y0, t, method="reversible_dopri5", rtol=rtol, atol=rtol * 1e-2)
        exact = torch.exp(torch.sin(t)).unsqueeze(-1)
        errors.append(float((ys - exact).abs().max()))
        counts.append(len(calls))
        assert 0.7 in calls  # a step boundary lands on each requested time
    assert errors[0] < 1e-3 and errors[1] < 1e-6 and errors[1] < errors[0]
    assert counts[1] > counts[0]
    with pytest.raises(RuntimeError, match="max_steps"):
        odeint(growth, y0, t, method="reversible_rk4", rtol=1e-12, options={"max_steps": 5})


def test_pid_controller_solves_as_accurately():
    settings = AdaptiveSteps.pid(rtol=1e-6, atol=1e-9)
    y = odeint(growth, torch.ones(1, dtype=F64), T, method=ReversibleRK("bosh3", adaptive=settings))
    assert abs(y[-1].item() - math.exp(math.sin(2.0))) < 1e-4


def test_memory_is_flat_in_the_steps_and_exact_adds_a_few_bits():
    f = Field(8, torch.float32)
    y0, t = torch.randn(16, 8), torch.tensor([0.0, 1.0])

    def peak(method, steps):
        def step():
            odeint(f, y0, t, method=method, dt=1 / steps).square().sum().backward()

        return training_step_peak(step, f.parameters())

    floats = ReversibleRK("rk4", exact=False)
    assert peak(floats, 10) == peak(floats, 40)
    exact, direct = ReversibleRK("rk4"), ReversibleRK("rk4", adjoint=False)
    per_step_exact = (peak(exact, 40) - peak(exact, 10)) / 30
    per_step_direct = (peak(direct, 40) - peak(direct, 10)) / 30
    # The corrections of y and z: a few bits per element each, against a whole graph.
    assert 0 < per_step_exact <= 16 * y0.numel() / 8
    assert per_step_direct > 50 * per_step_exact


@pytest.mark.parametrize("adaptive", [None, AdaptiveSteps(rtol=1e-3, atol=1e-4)])
def test_sde_adjoint_equals_backprop_bitwise(adaptive):
    # adaptive: rejected steps query the Brownian interval on intervals never used again
    torch.manual_seed(1)
    f, g = Field(), Field()
    y0 = torch.randn(4, 3, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.35, 1.0], dtype=F64)
    results = []
    tableau = "midpoint" if adaptive is None else "bosh3"
    for adjoint in (True, False):
        method = ReversibleRK(tableau, adjoint=adjoint, adaptive=adaptive)
        ys = sdeint(f, lambda t, y: 0.1 * g(t, y), y0, t, dt=0.05, method=method, seed=3)
        results.append(torch.autograd.grad(ys.square().sum(), [y0, *f.parameters()]))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_cde_adjoint_equals_backprop_bitwise():
    torch.manual_seed(2)
    times = torch.linspace(0, 1, 9, dtype=F64)
    x = torch.randn(3, 9, 2, dtype=F64)
    path = CubicSpline(natural_cubic_coeffs(x, times), times)
    func = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Unflatten(-1, (4, 2)))
    func = func.to(F64)
    z0 = torch.randn(3, 4, dtype=F64, requires_grad=True)
    results = []
    for adjoint in (True, False):
        zs = cdeint(path, lambda t, z: func(z), z0, times, adjoint, method="reversible_rk4")
        results.append(torch.autograd.grad(zs.square().sum(), [z0, *func.parameters()]))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_bad_settings_say_what_to_pass():
    with pytest.raises(ValueError, match="lam must lie"):
        ReversibleRK("rk4", lam=0.0)
    with pytest.raises(ValueError, match="unknown tableau"):
        ReversibleRK("rk5")
    with pytest.raises(ValueError, match="embedded error"):
        ReversibleRK("euler", adaptive=AdaptiveSteps())
    with pytest.raises(ValueError, match="sum of row"):
        ButcherTableau(a=((), (0.5,)), b=(0.0, 1.0), c=(0.0, 0.4), order=2)
    with pytest.raises(ValueError, match=r"t\.detach"):
        odeint(
            growth,
            torch.ones(1, dtype=F64),
            T.clone().requires_grad_(),
            method="reversible_rk4",
            rtol=1e-5,
        )


def test_pytree_states_of_scalars():
    y0 = torch.tensor(1.0, dtype=F64, requires_grad=True)
    w = torch.tensor(0.5, dtype=F64, requires_grad=True)
    results = []
    for adjoint in (True, False):
        a, b = odeint(
            lambda t, y: (-w * y[0], w * y[0] - y[1]),
            (y0, 2 * y0),
            T,
            dt=0.1,
            method=ReversibleRK("rk4", adjoint=adjoint),
        )
        assert a.shape == b.shape == (2,)
        results.append(torch.autograd.grad(a[-1] + b[-1], [y0, w]))
    assert all(torch.equal(x, y) for x, y in zip(*results))


def test_tensor_hooks_run_once_and_non_leaf_parameters_get_their_gradient():
    # The aliasing of NOTE [hooks once] (adjoint.py), shared with reversible Heun.
    results, calls = [], []
    for adjoint in (True, False):
        torch.manual_seed(0)
        f = Field()
        f.net[0].weight.register_hook(lambda grad, a=adjoint: calls.append(a) or grad)
        y0 = torch.randn(4, 3, dtype=F64)
        ys = odeint(f, y0, T, dt=0.1, method=ReversibleRK("ralston3", adjoint=adjoint))
        results.append(torch.autograd.grad(ys.square().sum(), list(f.parameters())))
    assert calls == [True, False]
    assert all(torch.equal(a, b) for a, b in zip(*results))
