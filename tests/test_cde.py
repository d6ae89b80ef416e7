"""Neural CDEs: the interpolations of irregular data, cdeint's exact solutions, its adjoint
against backpropagation (float64, 1e-8, dL/dt included), memory, and torchcde on the same
problem where it is installed."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers import assert_close_tensors
from tests.test_ode import memory_peak
from tests.test_ode_conventions import finite_difference
from torchrev.ode import (
    CubicSpline,
    LinearInterpolation,
    cdeint,
    hermite_cubic_coeffs,
    linear_interpolation_coeffs,
    natural_cubic_coeffs,
)

F64 = torch.float64
COEFFS = {
    "natural": natural_cubic_coeffs,
    "hermite": hermite_cubic_coeffs,
    "linear": linear_interpolation_coeffs,
}
TORCHCDE_NAMES = {
    "natural": "natural_cubic_coeffs",
    "hermite": "hermite_cubic_coefficients_with_backward_differences",
    "linear": "linear_interpolation_coeffs",
}


def irregular_data(batch=4, length=12, channels=2, seed=0):
    """Irregular times and data with missing values: interior gaps, a channel missing at the
    start, one at the end, one never observed."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.cumsum(torch.rand(length, dtype=F64, generator=gen) + 0.1, 0)
    x = torch.randn(batch, length, channels, dtype=F64, generator=gen).cumsum(1)
    x[torch.rand(x.shape, generator=gen) < 0.3] = float("nan")
    x[0, :, 0] = float("nan")
    x[1, :4, 1] = float("nan")
    x[2, -3:, 0] = float("nan")
    return t, x


def path_of(kind, x, t):
    return (LinearInterpolation if kind == "linear" else CubicSpline)(COEFFS[kind](x, t), t)


@pytest.mark.parametrize("kind", list(COEFFS))
def test_coefficients_equal_torchcdes(kind):
    torchcde = pytest.importorskip("torchcde")
    t, x = irregular_data()
    want = getattr(torchcde, TORCHCDE_NAMES[kind])(x, t)
    torch.testing.assert_close(COEFFS[kind](x, t), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", list(COEFFS))
def test_paths_pass_through_the_observations_with_their_derivative(kind):
    t, x = irregular_data()
    path = path_of(kind, x, t)
    observed = ~torch.isnan(x)
    for j in range(len(t)):
        value = path.evaluate(t[j])
        assert (value - x[:, j])[observed[:, j]].abs().max() < 1e-12
    assert torch.equal(path.evaluate(t[0])[0, 0], torch.zeros((), dtype=F64))  # never observed
    s = (t[4] + t[5]) / 2
    slope = (path.evaluate(s + 1e-6) - path.evaluate(s - 1e-6)) / 2e-6
    torch.testing.assert_close(path.derivative(s), slope, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(path.interval, t[[0, -1]])


def second_derivatives(coeffs):
    """At the start of each piece (2c) and at its end (2c + 6d h): (..., pieces, channels)."""
    channels = coeffs.size(-1) // 4
    return coeffs[..., 2 * channels : 3 * channels], coeffs[..., 3 * channels :]


def test_natural_spline_is_twice_differentiable_with_free_ends():
    t, x = irregular_data()
    x = x[1:]  # the never-observed channel has no spline to speak of
    coeffs = natural_cubic_coeffs(x, t)
    two_c, three_d = second_derivatives(coeffs)
    h = t.diff().view(-1, 1)
    at_end = two_c + 2 * three_d * h
    scale = two_c.abs().max()
    assert (at_end[..., :-1, :] - two_c[..., 1:, :]).abs().max() < 1e-10 * scale  # C2
    first_seen = (~torch.isnan(x)).all(-1)  # the spline starts at the first observation
    assert two_c[..., 0, :][first_seen[..., 0]].abs().max() < 1e-10 * scale
    assert at_end[..., -1, :][first_seen[..., -1]].abs().max() < 1e-10 * scale


def test_hermite_is_causal():
    """Changing the last observation changes only the last piece."""
    t, x = irregular_data()
    x = torch.nan_to_num(x)
    moved = x.clone()
    moved[:, -1] += 1.0
    a, b = hermite_cubic_coeffs(x, t), hermite_cubic_coeffs(moved, t)
    assert torch.equal(a[..., :-1, :], b[..., :-1, :]) and not torch.equal(a, b)


def exp_problem(length=9):
    """dz = z dX for a scalar path: z(t) = z0 exp(X(t) - X(t0)), an exact solution."""
    t = torch.linspace(0, 2, length, dtype=F64)
    x = torch.sin(2 * t).view(1, -1, 1)
    path = CubicSpline(natural_cubic_coeffs(x, t), t)
    exact = torch.exp(path.evaluate(t[-1]) - path.evaluate(t[0]))
    return path, exact


@pytest.mark.parametrize(("method", "order"), [("reversible_heun", 2), ("rk4", 4), ("euler", 1)])
def test_exact_solution_and_order(method, order):
    path, exact = exp_problem()
    z0 = torch.ones(1, 1, dtype=F64)

    def error(dt):
        zs = cdeint(path, lambda t, z: z.unsqueeze(-1), z0, path.interval, dt=dt, method=method)
        return (zs[:, -1] - exact).abs().item()

    errors = [error(0.02), error(0.01)]
    assert order - 0.15 <= math.log2(errors[0] / errors[1]) <= order + 0.15


class Func(nn.Module):
    """f(t, z): a (hidden, input) matrix; counts its calls."""

    def __init__(self, hidden=4, inputs=3):
        super().__init__()
        self.hidden, self.inputs, self.calls = hidden, inputs, 0
        self.net = nn.Sequential(nn.Linear(hidden, 16), nn.Tanh(), nn.Linear(16, hidden * inputs))

    def forward(self, t, z):
        self.calls += 1
        return self.net(z).view(*z.shape, self.inputs) * torch.cos(t)


def cde_setup(batch=5, length=10):
    gen = torch.Generator().manual_seed(1)
    t = torch.linspace(0, 3, length, dtype=F64)
    x = torch.randn(batch, length, 3, dtype=F64, generator=gen).cumsum(1)
    x[torch.rand(x.shape, generator=gen) < 0.25] = float("nan")
    return t, x, Func().to(F64), torch.randn(batch, 4, dtype=F64, generator=gen)


def test_adjoint_equals_backprop_for_z0_func_the_data_and_t():
    """Gradients for everything: z0, func's parameters, the data behind the spline (through a
    trainable scale, so its coefficients are computed from trainable tensors) and t."""
    t_data, x, func, z0 = cde_setup()
    z0.requires_grad_()
    scale = torch.tensor([1.0, 0.5, -0.3], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.137, 2.9], dtype=F64, requires_grad=True)
    weights = torch.randn(5, 3, 4, dtype=F64)
    inputs = [z0, scale, t, *func.parameters()]
    results = []
    observed = ~torch.isnan(x)
    for adjoint in (True, False):
        data = torch.where(observed, torch.nan_to_num(x) * scale, float("nan"))  # no 0 * NaN
        path = CubicSpline(natural_cubic_coeffs(data, t_data), t_data)
        zs = cdeint(path, func, z0, t, adjoint=adjoint, dt=0.05)
        assert zs.shape == (5, 3, 4)  # torchcde's layout: time second to last
        results.append(torch.autograd.grad((zs * weights).sum(), inputs))
    assert_close_tensors(results[0], results[1], 1e-8)
    path = CubicSpline(natural_cubic_coeffs(x, t_data), t_data)

    def loss(t):
        return (cdeint(path, func, z0, t, dt=0.05) * weights).sum()

    (d_t,) = torch.autograd.grad(loss(t), [t])
    assert_close_tensors([d_t], [finite_difference(loss, t.detach())], 1e-7)


def test_one_func_evaluation_per_step_and_flat_memory():
    t_data, x, func, z0 = cde_setup(batch=32)
    path = CubicSpline(natural_cubic_coeffs(x, t_data), t_data)
    t = path.interval
    cdeint(path, func, z0, t, dt=0.03)  # the default needs no grad: just count
    assert func.calls == 100 + 1
    params = list(func.parameters())

    def solve(dt, adjoint=True):
        return cdeint(path, func, z0, t, adjoint=adjoint, dt=dt)

    assert memory_peak(solve, 20, params) == memory_peak(solve, 80, params)  # 60, 240 steps
    backprop = lambda dt: solve(dt, adjoint=False)  # noqa: E731
    assert memory_peak(backprop, 80, params) > 3 * memory_peak(backprop, 20, params)


def test_default_step_is_the_smallest_observation_gap():
    t_data, x, func, z0 = cde_setup()
    t_data = t_data.clone()
    t_data[3] = t_data[2] + 0.05  # the smallest gap
    path = CubicSpline(natural_cubic_coeffs(x, t_data), t_data)
    cdeint(path, func, z0, path.interval)
    assert func.calls == math.ceil(3 / 0.05 - 1e-9) + 1


def test_same_problem_as_torchcde():
    """torchcde's own spline drives both; torchcde's reversible Heun (torchsde backend) takes
    the same steps, so solutions and gradients agree to rounding; its default adaptive solver
    agrees to the discretisation error."""
    torchcde = pytest.importorskip("torchcde")
    t_data, x, func, z0 = cde_setup()
    z0.requires_grad_()
    path = torchcde.CubicSpline(torchcde.natural_cubic_coeffs(x, t_data), t_data)
    t = torch.tensor([0.0, 1.5, 3.0], dtype=F64)  # multiples of dt: torchsde stops there
    inputs = [z0, *func.parameters()]
    weights = torch.randn(5, 3, 4, dtype=F64)

    def run(solve):
        zs = solve()
        return [zs, *torch.autograd.grad((zs * weights).sum(), inputs)]

    mine = run(lambda: cdeint(path, func, z0, t, dt=0.05))
    theirs = run(
        lambda: torchcde.cdeint(
            path, func, z0, t, adjoint=False, backend="torchsde", method="reversible_heun", dt=0.05
        )
    )
    assert_close_tensors(mine, theirs, 1e-10)
    accurate = torchcde.cdeint(path, func, z0, t, adjoint=False, rtol=1e-9, atol=1e-11)
    fine = cdeint(path, func, z0, t, dt=0.005)
    assert (fine - accurate).abs().max() < 1e-4 < (mine[0] - accurate).abs().max()


class ProdFunc(Func):
    """torchcde's ``prod`` hook: f(t, z) dX/dt without building the matrix for cdeint."""

    def prod(self, t, z, dx):
        return torch.einsum("...hi,...i->...h", self(t, z), dx)


def test_func_prod_hook_gives_the_same_solution():
    t_data, x, func, z0 = cde_setup()
    path = CubicSpline(natural_cubic_coeffs(x, t_data), t_data)
    prod = ProdFunc().to(F64)
    prod.load_state_dict(func.state_dict())
    want = cdeint(path, func, z0, path.interval, dt=0.1)
    torch.testing.assert_close(cdeint(path, prod, z0, path.interval, dt=0.1), want)


def bad_calls():
    t_data, x, func, z0 = cde_setup()
    path = CubicSpline(natural_cubic_coeffs(x, t_data), t_data)
    t = path.interval
    return {
        "no path": (lambda: cdeint(x, func, z0, t), TypeError, "natural_cubic_coeffs"),
        "func of the wrong shape": (
            lambda: cdeint(path, lambda t, z: z, z0, t),
            ValueError,
            r"\(5, 4, 3\)",
        ),
        "batch mismatch": (lambda: cdeint(path, func, z0[:2], t), ValueError, "batch dimensions"),
        "adaptive options": (lambda: cdeint(path, func, z0, t, rtol=1e-4), TypeError, "pass dt "),
        "integer data": (lambda: natural_cubic_coeffs(x.long()), ValueError, "floating-point"),
        "times of another length": (
            lambda: natural_cubic_coeffs(x, t_data[:-1]),
            ValueError,
            "10 observation times",
        ),
        "unsorted times": (
            lambda: linear_interpolation_coeffs(x, t_data.flip(0)),
            ValueError,
            "strictly increasing",
        ),
        "coefficients of another layout": (
            lambda: CubicSpline(x[..., :3]),
            ValueError,
            "4 \\* channels",
        ),
    }


@pytest.mark.parametrize("case", list(bad_calls()))
def test_inputs_cdeint_cannot_take_say_what_to_pass(case):
    call, error, message = bad_calls()[case]
    with pytest.raises(error, match=message):
        call()


def test_irregular_series_example_runs(tmp_path):
    example = Path(__file__).parent.parent / "examples" / "neural_cde_irregular.py"
    spec = importlib.util.spec_from_file_location("neural_cde_irregular", example)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--epochs", "1", "--train", "64", "--out", str(tmp_path)])
    assert (tmp_path / "neural_cde_irregular.png").stat().st_size > 0
