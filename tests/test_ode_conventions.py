"""torchdiffeq's and torchsde's conventions: gradients for t, reverse time, a single time,
pytree states, parameters found in closures, scalar and general noise, and the errors for what
the solvers cannot take. Compared with the peers on the same grids where they are installed."""

import math

import pytest
import torch
from torch import nn

from tests.helpers import assert_close_tensors
from tests.test_ode import EXACT, F64, Field, GeneralDiffusion, Oscillator, brownian_path, gradients
from torchrev.ode import ReversibleHeun, odeint, sdeint
from torchrev.ode._params import parameters_of

# Times off the multiples of dt, so that a small change of t keeps every step count.
TIMES = {"forwards": [0.0, 0.3033, 0.7071, 1.0], "backwards": [1.0, 0.6047, 0.2011]}


def loss_of(solve, weights):
    return lambda t: (solve(t) * weights).sum()


def finite_difference(loss, t, eps=1e-6):
    grads = []
    for k in range(len(t)):
        step = torch.zeros_like(t)
        step[k] = eps
        with torch.no_grad():
            grads.append((loss(t + step) - loss(t - step)) / (2 * eps))
    return torch.stack(grads)


def test_grid_times_as_floats_and_as_functions_of_t_agree():
    """The adjoint steps on the float grid, backpropagation on the tensor one: same values."""
    from torchrev.ode.grid import Grid

    for times in TIMES.values():
        t = torch.tensor(times, dtype=F64, requires_grad=True)
        grid = Grid.build(t, 0.013)
        times_t, steps_t = grid.differentiable().tensors
        assert times_t.tolist() == list(grid.times) and steps_t.tolist() == list(grid.steps)
        assert grid.times[grid.outputs[1]] == times[1] and len(grid.steps) == grid.outputs[-1]


@pytest.mark.parametrize("direction", ["forwards", "backwards"])
@pytest.mark.parametrize("method", ["reversible_heun", "rk4", "euler"])
def test_time_gradients_match_finite_differences(method, direction):
    f = Field().to(F64)
    y0 = torch.randn(4, 3, dtype=F64)
    t = torch.tensor(TIMES[direction], dtype=F64, requires_grad=True)
    weights = torch.randn(len(t), 4, 3, dtype=F64)
    loss = loss_of(lambda t: odeint(f, y0, t, dt=0.02, method=method), weights)
    (got,) = torch.autograd.grad(loss(t), [t])
    assert_close_tensors([got], [finite_difference(loss, t.detach())], 1e-7)


def test_time_gradients_approach_torchdiffeq_continuous_adjoint():
    """As dt shrinks, the discrete dL/dt tends to the continuous one, which torchdiffeq's
    adjoint computes (dopri5, tight tolerances)."""
    tde = pytest.importorskip("torchdiffeq")
    f = Field().to(F64)
    y0 = torch.randn(4, 3, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.2], dtype=F64, requires_grad=True)
    inputs = [y0, t, *f.parameters()]
    want = gradients(lambda: tde.odeint_adjoint(f, y0, t, rtol=1e-10, atol=1e-12), y0, inputs[1:])
    errors = []
    for dt in (0.02, 0.01):
        got = gradients(lambda dt=dt: odeint(f, y0, t, dt=dt), y0, inputs[1:])
        errors.append(max((a - b).abs().max().item() for a, b in zip(got, want)))
    assert errors[1] < 1e-4 and 3.5 < errors[0] / errors[1] < 4.5  # second order


def test_backwards_in_time_exact_solution_and_order():
    """From the exact state at t = 2 back to t = 0: the start again, at order 2."""
    t = torch.tensor([2.0, 0.0], dtype=F64)
    start = torch.tensor([1.0, 0.0], dtype=F64)
    errors = [
        (odeint(Oscillator(), EXACT, t, dt=dt)[-1] - start).abs().max().item()
        for dt in (0.02, 0.01)
    ]
    assert errors[1] < 1e-4 and 1.9 < math.log2(errors[0] / errors[1]) < 2.1


@pytest.mark.parametrize("method", ["euler", "midpoint"])
@pytest.mark.parametrize("times", [[0.0, 1.0], [1.0, 0.0]])
def test_same_grid_as_torchdiffeq(method, times):
    """torchdiffeq's fixed-grid euler and midpoint take the same steps (when dt divides the
    span), forwards and backwards in time, and the same tuple states."""
    tde = pytest.importorskip("torchdiffeq")
    f = Field().to(F64)
    y0 = torch.randn(4, 3, dtype=F64)
    t = torch.tensor(times, dtype=F64)
    want = tde.odeint(f, y0, t, method=method, options={"step_size": 0.05})
    torch.testing.assert_close(odeint(f, y0, t, method=method, dt=0.05), want, rtol=1e-12, atol=0)
    pair = (y0[:, :1], y0[:, 1:])

    def split(t, y):
        return tuple(f(t, torch.cat(y, -1)).split([1, 2], -1))

    got = odeint(split, pair, t, method=method, options={"step_size": 0.05})
    want = tde.odeint(split, pair, t, method=method, options={"step_size": 0.05})
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_a_single_time_returns_y0():
    f = Field().to(F64)
    y0 = torch.randn(4, 3, dtype=F64, requires_grad=True)
    t = torch.tensor([0.5], dtype=F64)
    ys = odeint(f, y0, t)
    assert ys.shape == (1, 4, 3) and torch.equal(ys[0], y0) and f.calls == 0
    (grad,) = torch.autograd.grad(ys.sum(), [y0])
    assert torch.equal(grad, torch.ones_like(y0))
    zs = sdeint(f, lambda t, y: y, (y0, y0[:, :1]), t, dt=0.1)
    assert [z.shape for z in zs] == [(1, 4, 3), (1, 4, 1)]


class Pendulum(nn.Module):
    """A dict state {"x", "v"} with a trainable damping."""

    def __init__(self):
        super().__init__()
        self.damping = nn.Parameter(torch.tensor(0.3, dtype=F64))

    def forward(self, t, state):
        return {"x": state["v"], "v": -torch.sin(state["x"]) - self.damping * state["v"]}


def test_pytree_states_equal_the_concatenated_solve_with_exact_gradients():
    field = Pendulum()
    x0 = torch.randn(5, 2, dtype=F64, requires_grad=True)
    v0 = torch.randn(5, 2, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.5], dtype=F64)
    tree = odeint(field, {"x": x0, "v": v0}, t, dt=0.05)
    flat = odeint(
        lambda t, y: torch.cat(list(field(t, dict(zip("xv", y.chunk(2, -1)))).values()), -1),
        torch.cat((x0, v0), -1),
        t,
        dt=0.05,
    )
    torch.testing.assert_close(torch.cat((tree["x"], tree["v"]), -1), flat, rtol=1e-13, atol=0)
    inputs = [x0, v0, field.damping]
    results = []
    for method in ("reversible_heun", ReversibleHeun(adjoint=False)):
        ys = odeint(field, {"x": x0, "v": v0}, t, dt=0.05, method=method)
        loss = (ys["x"] * torch.arange(10, dtype=F64).view(5, 2)).sum() + ys["v"].square().sum()
        results.append(torch.autograd.grad(loss, inputs))
    assert_close_tensors(results[0], results[1], 1e-8)


def test_pytree_states_of_scalars_and_mixed_shapes():
    # Issue 28: 0-dimensional leaves (time and leaf shape both empty after the split) once
    # failed in the unflattening with "reshape() missing 1 required positional arguments".
    y0 = torch.tensor(1.0, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    a, b = odeint(lambda t, y: (-y[0], -2 * y[1]), (y0, y0), t, dt=0.01)
    assert a.shape == b.shape == (3,)
    flat = odeint(lambda t, y: -y * torch.tensor([1.0, 2.0], dtype=F64), y0.expand(2), t, dt=0.01)
    torch.testing.assert_close(torch.stack((a, b), -1), flat, rtol=1e-14, atol=0)
    (grad,) = torch.autograd.grad((a[-1] + b[-1]), [y0])
    torch.testing.assert_close(grad, flat[-1].sum() / y0, rtol=1e-10, atol=0)
    mixed = {"s": y0, "v": torch.ones(2, 3, dtype=F64)}
    out = odeint(lambda t, y: {"s": -y["s"], "v": -y["v"]}, mixed, t, dt=0.01)
    assert out["s"].shape == (3,) and out["v"].shape == (3, 2, 3)
    torch.testing.assert_close(out["s"][-1], out["v"][-1, 0, 0] * y0, rtol=1e-14, atol=0)
    single = odeint(lambda t, y: (-y[0],), (y0,), t[:1])
    assert single[0].shape == (1,)


def test_pytree_field_returning_another_structure():
    with pytest.raises(ValueError, match="must return the state's structure"):
        odeint(lambda t, y: (y[0],), (torch.ones(2), torch.ones(3)), torch.tensor([0.0, 1.0]))


field_in_globals = nn.Linear(2, 2)


def test_parameters_found_in_globals_closures_methods_and_partials():
    import functools

    inner = nn.Linear(2, 2)

    class Wrapper:
        def __init__(self):
            self.layers = [nn.Linear(2, 2)]

        def __call__(self, t, y):
            return self.layers[0](y)

    wrapper = Wrapper()
    cases = {
        "global": (lambda t, y: field_in_globals(y), field_in_globals),
        "closure": (lambda t, y: inner(y), inner),
        "object": (wrapper, wrapper.layers[0]),
        "bound method": (wrapper.__call__, wrapper.layers[0]),
        "partial": (functools.partial(lambda t, y, m: m(y), m=inner), inner),
    }
    for name, (f, module) in cases.items():
        assert {id(p) for p in parameters_of(f)} == {id(p) for p in module.parameters()}, name


def test_readme_style_closure_trains_with_the_adjoint():
    """The README's ``f = lambda t, y: field(y)`` without adjoint_params: flat memory."""
    from tests.test_ode import memory_peak

    field = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 2))
    y0, t = torch.randn(16, 2), torch.tensor([0.0, 1.0])

    def solve(dt):
        return odeint(lambda t, y: field(y), y0, t, dt=dt)

    params = list(field.parameters())
    assert memory_peak(solve, 50, params) == memory_peak(solve, 200, params)


def test_general_noise_of_a_diagonal_matrix_is_diagonal_noise():
    f = Field().to(F64)
    y0 = torch.randn(4, 3, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    bm = brownian_path(12, 20, 1.0)[0]

    def diagonal(t, y):
        return 0.5 * torch.cos(y)

    brownian = lambda t0, t1, n: bm(t0, t1, n).view(4, 3)  # noqa: E731
    want = sdeint(f, diagonal, y0, t, dt=0.05, brownian=brownian)
    got = sdeint(
        f,
        lambda t, y: torch.diag_embed(diagonal(t, y)),
        y0,
        t,
        dt=0.05,
        noise="general",
        brownian=brownian,
    )
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)


def test_scalar_noise_strong_order():
    """Geometric Brownian motion driven by one Brownian motion per path: y0 exp(a t + b W)."""
    bm, w = brownian_path(1000, 1024, 1.0)
    y0, t = torch.ones(1000, 2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    scales = torch.tensor([0.8, -0.5], dtype=F64)
    exact = torch.exp(0.5 + w[-1].unsqueeze(-1) * scales)

    def g(t, y):
        return (y * scales).unsqueeze(-1)

    def solve(dt):
        return sdeint(
            lambda t, y: 0.5 * y,
            g,
            y0,
            t,
            dt=dt,
            noise="scalar",
            brownian=lambda t0, t1, n: bm(t0, t1, n).unsqueeze(-1),
        )[-1]

    errors = [(solve(dt) - exact).abs().mean().item() for dt in (1 / 16, 1 / 64)]
    assert 0.5 <= math.log(errors[0] / errors[1]) / math.log(4) <= 1.1


@pytest.mark.parametrize("noise", ["general", "diagonal"])
def test_same_solution_as_torchsde_on_the_same_brownian_path(noise):
    torchsde = pytest.importorskip("torchsde")
    f = Field().to(F64)
    g = GeneralDiffusion(3, m=2).to(F64) if noise == "general" else (lambda t, y: 0.3 * y)
    y0 = torch.randn(4, 3, dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)

    class SDE(nn.Module):
        noise_type, sde_type = noise, "stratonovich"

        def f(self, t, y):
            return f(t, y)

        def g(self, t, y):
            return g(t, y)

    size = (4, 2) if noise == "general" else (4, 3)
    bm = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=size, dtype=F64, entropy=3)
    # dt = 1/16: both grids' times are exact in binary, so both query W at the same times.
    want = torchsde.sdeint(SDE(), y0, t, method="reversible_heun", dt=1 / 16, bm=bm)
    got = sdeint(f, g, y0, t, dt=1 / 16, noise=noise, brownian=lambda t0, t1, n: bm(t0, t1))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def bad_calls():
    f, y0, t = (lambda t, y: -y), torch.ones(2, 3), torch.tensor([0.0, 1.0])
    g_general = lambda t, y: y.unsqueeze(-1)  # noqa: E731
    return {
        "integer t": (lambda: odeint(f, y0, torch.tensor([0, 1])), TypeError, "t.to"),
        "list t": (lambda: odeint(f, y0, [0.0, 1.0]), TypeError, "torch.tensor"),
        "integer y0": (lambda: odeint(f, torch.ones(2, dtype=torch.long), t), TypeError, "float"),
        "mixed pytree": (
            lambda: odeint(f, (y0, y0.double()), t),
            TypeError,
            "share one dtype",
        ),
        "diagonal g of a matrix": (
            lambda: sdeint(f, g_general, y0, t, dt=0.1),
            ValueError,
            "noise='general'",
        ),
        "general g of the state's shape": (
            lambda: sdeint(f, f, y0, t, dt=0.1, noise="general"),
            ValueError,
            r"shape \(2, 3, 'm'\)",
        ),
        "scalar g with two channels": (
            lambda: sdeint(
                f, lambda t, y: y.unsqueeze(-1).expand(2, 3, 2), y0, t, dt=0.1, noise="scalar"
            ),
            ValueError,
            r"\(2, 3, 1\)",
        ),
        "brownian of the wrong shape": (
            lambda: sdeint(f, f, y0, t, dt=0.1, brownian=lambda t0, t1, n: torch.zeros(3)),
            ValueError,
            r"of shape \(2, 3\)",
        ),
        "t requiring grad for an SDE": (
            lambda: sdeint(f, f, y0, t.clone().requires_grad_(), dt=0.1),
            ValueError,
            "t.detach",
        ),
        "tolerances": (lambda: odeint(f, y0, t, rtol=1e-5), TypeError, "reversible_dopri5"),
        "other options": (lambda: odeint(f, y0, t, tol=1e-5), TypeError, "pass dt="),
        "adjoint_params of modules": (
            lambda: odeint(f, y0, t, adjoint_params=[nn.Linear(2, 2)]),
            TypeError,
            "parameters",
        ),
        "general noise of a tuple": (
            lambda: sdeint(f, g_general, (y0, y0), t, dt=0.1, noise="general"),
            ValueError,
            "tensor state",
        ),
    }


@pytest.mark.parametrize("case", list(bad_calls()))
def test_inputs_the_solvers_cannot_take_say_what_to_pass(case):
    call, error, message = bad_calls()[case]
    with pytest.raises(error, match=message):
        call()
