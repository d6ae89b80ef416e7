"""Invariant 9: reversible Heun's order, exact reverse, and adjoint == backprop; the solvers."""

import math

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from tests.helpers import assert_close_tensors
from torchrev import ReversibilityError
from torchrev.bench import training_step_peak
from torchrev.ode import ReversibleHeun, odeint, sdeint
from torchrev.ode._heun import Problem, forward_step, initial_state, reverse_step
from torchrev.ode.grid import Grid

F64 = torch.float64


class Oscillator(nn.Module):
    """x'' = -x as a first-order system: exact solution (cos t, -sin t) from (1, 0)."""

    def forward(self, t, y):
        return torch.stack((y[..., 1], -y[..., 0]), dim=-1)


def observed_order(method, problem, exact, dts):
    errors = []
    for dt in dts:
        y = odeint(
            problem,
            torch.tensor([1.0, 0.0], dtype=F64),
            torch.tensor([0.0, 2.0], dtype=F64),
            method=method,
            dt=dt,
        )[-1]
        errors.append((y - exact).abs().max().item())
    return math.log(errors[0] / errors[-1]) / math.log(dts[0] / dts[-1])


EXACT = torch.tensor([math.cos(2.0), -math.sin(2.0)], dtype=F64)


@pytest.mark.parametrize(
    ("method", "order"), [("reversible_heun", 2), ("euler", 1), ("midpoint", 2), ("rk4", 4)]
)
def test_observed_ode_order(method, order):
    slope = observed_order(method, Oscillator(), EXACT, [0.02, 0.01, 0.005])
    assert order - 0.1 <= slope <= order + 0.1


def test_linear_decay_is_second_order():
    t = torch.tensor([0.0, 1.0], dtype=F64)
    errors = [
        (odeint(lambda t, y: -y, torch.ones(1, dtype=F64), t, dt=dt)[-1] - math.exp(-1)).abs()
        for dt in (0.02, 0.01)
    ]
    assert 1.9 <= math.log2(errors[0].item() / errors[1].item()) <= 2.1


def brownian_path(paths, steps, horizon, seed=0):
    h = horizon / steps
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(steps, paths, generator=gen, dtype=F64) * math.sqrt(h)
    w = torch.cat((torch.zeros(1, paths, dtype=F64), w.cumsum(0)))
    return (lambda t0, t1, n: w[round(t1 / h)] - w[round(t0 / h)]), w


@pytest.mark.parametrize(("noise", "low", "high"), [("diagonal", 0.5, 1.1), ("additive", 0.9, 1.1)])
def test_sde_strong_order(noise, low, high):
    """Diagonal noise is commutative, where reversible Heun does better than its general 0.5."""
    bm, w = brownian_path(1000, 1024, 1.0)
    y0, t = torch.ones(1000, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    if noise == "diagonal":  # Stratonovich geometric Brownian motion, exact solution
        f, g = (lambda t, y: 0.5 * y), (lambda t, y: 0.8 * y)
        exact = torch.exp(0.5 + 0.8 * w[-1])
    else:
        f, g = (lambda t, y: -torch.sin(y)), (lambda t, y: 0.8 * torch.ones_like(y))
        exact = sdeint(f, g, y0, t, dt=1 / 1024, brownian=bm, noise=noise)[-1]
    errors = [
        (sdeint(f, g, y0, t, dt=dt, brownian=bm, noise=noise)[-1] - exact).abs().mean().item()
        for dt in (1 / 16, 1 / 64)
    ]
    assert low <= math.log(errors[0] / errors[1]) / math.log(4) <= high


def test_algebraic_reverse_recovers_the_start_over_10000_steps():
    grid = Grid.build(torch.tensor([0.0, 10.0]), dt=1e-3)
    problem = Problem(Oscillator(), None, grid)
    y0 = torch.tensor([[1.0, 0.0], [0.3, -0.7]], dtype=F64)
    problem, state = initial_state(problem, y0)
    with torch.no_grad():
        for n in range(len(grid.steps)):
            state = forward_step(problem, state, n)
        for n in reversed(range(len(grid.steps))):
            state, _ = reverse_step(problem, state, n)
    assert len(grid.steps) == 10_000
    assert (state.y - y0).abs().max().item() < 1e-12


class Field(nn.Module):
    def __init__(self, width=3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, 16), nn.Tanh(), nn.Linear(16, width))
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return self.net(y) * torch.cos(t)


class Diffusion(nn.Module):
    def __init__(self, width=3):
        super().__init__()
        self.scale = nn.Parameter(torch.full((width,), 0.3))

    def forward(self, t, y):
        return self.scale * torch.sin(y)


def gradients(solve, y0, params):
    ys = solve()
    weights = torch.randn(ys.shape, generator=torch.Generator().manual_seed(5), dtype=ys.dtype)
    return list(torch.autograd.grad((ys * weights).sum(), [y0, *params]))


class GeneralDiffusion(nn.Module):
    """g of shape (*state, m): an m-dimensional Brownian motion (torchsde's general noise)."""

    def __init__(self, width=3, m=2):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(width, m) * 0.3)

    def forward(self, t, y):
        return torch.sin(y).unsqueeze(-1) * self.mix


@pytest.mark.parametrize("times", [[0.0, 0.3, 0.7, 1.0], [1.0, 0.55, 0.2]])
def test_adjoint_equals_backprop_including_time_gradients(times):
    """dL/dt too, forwards and backwards in time (float64, 1e-8)."""
    f = Field().to(F64)
    y0 = torch.randn(5, 3, dtype=F64, requires_grad=True)
    t = torch.tensor(times, dtype=F64, requires_grad=True)
    results = [
        gradients(lambda m=m: odeint(f, y0, t, dt=0.01, method=m), y0, [t, *f.parameters()])
        for m in (ReversibleHeun(adjoint=False), "reversible_heun")
    ]
    assert_close_tensors(results[1], results[0], 1e-8)
    assert results[1][1].abs().min() > 1e-3  # every time gets a gradient


@pytest.mark.parametrize(
    ("noise", "diffusion"),
    [
        ("diagonal", Diffusion),
        ("general", GeneralDiffusion),
        ("scalar", lambda: GeneralDiffusion(m=1)),
    ],
)
def test_sde_adjoint_equals_backprop(noise, diffusion):
    f, g = Field().to(F64), diffusion().to(F64)
    y0 = torch.randn(5, 3, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=F64)
    params = [*f.parameters(), *g.parameters()]
    results = [
        gradients(
            lambda m=m: sdeint(f, g, y0, t, dt=0.01, seed=7, noise=noise, method=m), y0, params
        )
        for m in (ReversibleHeun(adjoint=False), "reversible_heun")
    ]
    assert_close_tensors(results[1], results[0], 1e-8)


class DoubledTanh(TorchFunctionMode):
    """Rewrites the field's tanh: the adjoint must re-evaluate the field under it too."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return 2 * out if func is torch.tanh else out


def test_adjoint_replays_the_forward_torch_function_modes():
    torch.manual_seed(0)
    f = Field().to(F64)
    y0 = torch.randn(5, 3, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    results = []
    with DoubledTanh():
        for method in (ReversibleHeun(adjoint=False), "reversible_heun"):
            run = lambda m=method: odeint(f, y0, t, dt=0.05, method=m)  # noqa: E731
            results.append(gradients(run, y0, list(f.parameters())))
    assert_close_tensors(results[1], results[0], 1e-8)


class AutocastRecorder(Field):
    """Records whether CPU autocast was on at each evaluation."""

    def __init__(self):
        super().__init__()
        self.autocast = []

    def forward(self, t, y):
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        return super().forward(t, y)


def test_adjoint_replays_the_forward_autocast():
    # The backward runs outside the autocast block, as in a usual training loop; the reverse
    # walk must still evaluate the field as the forward did. (Under bf16 the adjoint is only
    # about 1e-2 from backprop either way: a rebuilt state that differs in its last float32
    # bit can round to a different bf16 value, so the reversal is not exact.)
    f = AutocastRecorder()
    with torch.autocast("cpu", torch.bfloat16):
        ys = odeint(f, torch.randn(5, 3), torch.tensor([0.0, 1.0]), dt=0.1)
    assert ys.dtype == torch.float32 and all(f.autocast)
    forward_calls = len(f.autocast)
    ys.sum().backward()
    assert len(f.autocast) == 2 * forward_calls and all(f.autocast)


@pytest.mark.parametrize("time_grad", [False, True])
def test_one_field_evaluation_per_step(time_grad):
    f = Field().to(F64)
    y0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    ys = odeint(f, y0, torch.tensor([0.0, 1.0], dtype=F64, requires_grad=time_grad), dt=0.01)
    assert f.calls == 100 + 1  # one per step, plus f(t0, y0)
    ys.sum().backward()
    assert f.calls == 2 * (100 + 1)  # backward: one per step, plus the final state's


def memory_peak(solve, steps, params):
    return training_step_peak(lambda: solve(1 / steps).square().sum().backward(), params)


@pytest.mark.parametrize("case", ["module", "closure, t grad", "general noise"])
def test_adjoint_memory_does_not_grow_with_steps(case):
    f, g = Field(16), GeneralDiffusion(16, m=4)
    y0 = torch.randn(64, 16)
    t = torch.tensor([0.0, 1.0], requires_grad=case == "closure, t grad")
    field = (lambda t, y: f.net(y)) if case == "closure, t grad" else f  # no adjoint_params

    def solve(dt, method="reversible_heun"):
        if case == "general noise":
            return sdeint(f, g, y0, t, dt=dt, noise="general", method=method)
        return odeint(field, y0, t, dt=dt, method=method)

    params = [*f.parameters(), *g.parameters()]
    assert memory_peak(solve, 50, params) == memory_peak(solve, 200, params)
    direct = ReversibleHeun(adjoint=False)
    assert memory_peak(lambda dt: solve(dt, direct), 200, params) > 3 * memory_peak(
        lambda dt: solve(dt, direct), 50, params
    )


def test_closure_fields_with_adjoint_params():
    w = torch.tensor(0.7, dtype=F64, requires_grad=True)
    y0 = torch.ones(3, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    (g,) = torch.autograd.grad(
        odeint(lambda t, y: -w * y, y0, t, dt=0.01, adjoint_params=[w])[-1].sum(), [w]
    )
    (want,) = torch.autograd.grad(
        odeint(lambda t, y: -w * y, y0, t, dt=0.01, method=ReversibleHeun(adjoint=False))[-1].sum(),
        [w],
    )
    torch.testing.assert_close(g, want, rtol=1e-10, atol=0)


def test_closure_tensors_are_found_without_adjoint_params():
    """A field closing over a trainable tensor or a module: found, and exact gradients."""
    w = torch.tensor(0.7, dtype=F64, requires_grad=True)
    net = nn.Linear(3, 3).to(F64)
    y0 = torch.ones(3, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    field = lambda t, y: net(y) * w  # noqa: E731
    got, want = (
        gradients(lambda m=m: odeint(field, y0, t, dt=0.1, method=m), y0, [w, *net.parameters()])
        for m in ("reversible_heun", ReversibleHeun(adjoint=False))
    )
    assert_close_tensors(got, want, 1e-10)


class Holder:
    w = torch.tensor(0.7, dtype=F64, requires_grad=True)  # a class attribute: not walked


def test_unfound_trainable_tensors_raise_at_the_call():
    """What the walk misses or adjoint_params leaves out: an error naming the fix, at once."""
    y0 = torch.ones(3, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ReversibilityError, match="adjoint_params"):
        odeint(lambda t, y: -Holder.w * y, y0, t, dt=0.1)
    net, w = nn.Linear(3, 3).to(F64), torch.tensor(0.7, dtype=F64, requires_grad=True)
    with pytest.raises(ReversibilityError, match=r"2 tensor\(s\)"):  # net's weight and bias
        odeint(lambda t, y: net(y) * w, y0, t, dt=0.1, adjoint_params=[w])
    w2 = 2 * w  # computed outside the field: its graph cannot serve every step
    with pytest.raises(ReversibilityError, match="computed from trainable ones"):
        odeint(lambda t, y: -w2 * y, y0, t, dt=0.1)


def test_parameter_hooks_run_once_on_the_total():
    """A hook that rescales the gradient must see the total, as under backpropagation."""
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    y0 = torch.randn(4, 3, dtype=F64)
    grads, calls = {}, {}
    for name, method in (("adjoint", "reversible_heun"), ("direct", ReversibleHeun(adjoint=False))):
        torch.manual_seed(0)
        field = Field().to(F64)
        calls[name] = 0

        def hook(grad, name=name):
            calls[name] += 1
            return 2 * grad

        field.net[0].weight.register_hook(hook)
        odeint(field, y0, t, dt=0.05, method=method).square().sum().backward()
        grads[name] = field.net[0].weight.grad
    assert calls == {"adjoint": 1, "direct": 1}
    torch.testing.assert_close(grads["adjoint"], grads["direct"], rtol=1e-10, atol=0)


def test_hooked_closure_tensors_are_refused():
    w = torch.tensor(0.7, dtype=F64, requires_grad=True)
    w.register_hook(lambda grad: grad)
    y0 = torch.ones(3, dtype=F64, requires_grad=True)
    with pytest.raises(ReversibilityError, match="register_post_accumulate_grad_hook"):
        odeint(lambda t, y: -w * y, y0, torch.tensor([0.0, 1.0]), dt=0.1, adjoint_params=[w])


@pytest.mark.parametrize(
    ("t", "dt", "message"),
    [
        ([0.0, 1.0, 0.5], 0.1, "strictly increasing, or strictly decreasing"),
        ([0.0, 0.0], 0.1, "strictly increasing"),
        ([[0.0, 1.0]], 0.1, "1-D"),
        ([0.0, 1.0], -0.1, "positive step"),
        ([0.0, float("nan")], 0.1, "finite"),
    ],
)
def test_bad_time_grids(t, dt, message):
    with pytest.raises(ValueError, match=message):
        odeint(lambda t, y: -y, torch.ones(2), torch.tensor(t), dt=dt)


def test_field_changing_the_state_shape():
    with pytest.raises(ValueError, match=r"at step 0 .* States may not change shape"):
        odeint(lambda t, y: y[:1], torch.ones(2), torch.tensor([0.0, 1.0]), dt=0.1)


@pytest.mark.parametrize("method", ["reversible_heun", "rk4"])
def test_non_finite_field_names_the_step(method):
    def blows_up(t, y):
        return y * torch.where(t > 0.55, torch.tensor(float("inf")), torch.tensor(1.0))

    with pytest.raises(FloatingPointError, match="at step 5"):
        odeint(blows_up, torch.ones(2), torch.tensor([0.0, 1.0]), dt=0.1, method=method)


def test_unknown_methods_and_noise():
    y0, t = torch.ones(2), torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match="unknown method 'dopri5'"):
        odeint(lambda t, y: -y, y0, t, method="dopri5")
    with pytest.raises(ValueError, match="reversible methods only"):
        sdeint(lambda t, y: -y, lambda t, y: y, y0, t, dt=0.1, method="euler")
    with pytest.raises(ValueError, match="noise must be"):
        sdeint(lambda t, y: -y, lambda t, y: y, y0, t, dt=0.1, noise="multiplicative")


def test_second_backward_through_an_adjoint_solve():
    f = Field().to(F64)
    ys = odeint(f, torch.ones(1, 3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), dt=0.1)
    loss = ys.sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_non_finite_diffusion_names_the_step():
    def g(t, y):
        return y * torch.where(t > 0.55, torch.tensor(float("nan")), torch.tensor(1.0))

    with pytest.raises(FloatingPointError, match="at step 5"):
        sdeint(lambda t, y: -y, g, torch.ones(2), torch.tensor([0.0, 1.0]), dt=0.1)
