"""Invariant 1: every coupling inverts its forward to rounding; its shortcuts are exact."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchrev
from tests.helpers import F64, coupling_params, mlp, relative_error, stack_of

COUPLINGS = coupling_params()
IDS = [cls.__name__ for cls, _ in COUPLINGS]


@pytest.mark.parametrize(("cls", "options"), COUPLINGS, ids=IDS)
@pytest.mark.parametrize(("dtype", "rtol"), [(F64, 1e-12), (torch.float32, 1e-5)])
def test_inverse_of_forward_is_identity(cls, options, dtype, rtol):
    stack = stack_of(cls, 6, width=8, dtype=dtype, **options)
    x1, x2 = torch.randn(2, 16, 8, dtype=dtype)
    with torch.no_grad():
        r1, r2 = stack.inverse(*stack(x1, x2))
    assert relative_error(r1, x1) < rtol and relative_error(r2, x2) < rtol


@settings(max_examples=25, deadline=None)
@given(index=st.integers(0, len(COUPLINGS) - 1), batch=st.integers(1, 5), seed=st.integers(0, 999))
def test_single_coupling_round_trip_float64(index, batch, seed):
    torch.manual_seed(seed)
    cls, options = COUPLINGS[index]
    coupling = stack_of(cls, 1, width=3, **options)[0]
    x1, x2 = torch.randn(2, batch, 3, dtype=F64)
    with torch.no_grad():
        r1, r2 = coupling.inverse(*coupling(x1, x2))
    assert relative_error(r1, x1) < 1e-13 and relative_error(r2, x2) < 1e-13


WITH_VJP = [
    (c, o) for c, o in COUPLINGS if c.update_vjp is not torchrev.AbstractCoupling.update_vjp
]


@pytest.mark.parametrize(("cls", "options"), WITH_VJP, ids=[c.__name__ for c, _ in WITH_VJP])
@pytest.mark.parametrize("half", [0, 1])
def test_update_vjp_matches_autograd(cls, options, half):
    coupling = stack_of(cls, 1, width=4, **options)[0]
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    h = torch.randn(coupling.branch_shape(x, half), dtype=F64, requires_grad=True)
    d_y = torch.randn(3, 4, dtype=F64)
    vjp = coupling.update_vjp(x.detach(), h.detach(), d_y, half)
    vjp = [v() if callable(v) else v for v in vjp]  # dL/dx may come deferred
    want = torch.autograd.grad(coupling.update(x, h, half), (x, h), d_y)
    for got, expected in zip(vjp, want):
        torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)


def test_scaled_coupling_is_the_meft_recurrence():
    f, g = mlp(4).to(F64), mlp(4).to(F64)
    coupling = torchrev.ScaledCoupling(f, g, lam=0.1, beta=0.5)
    x1, x2 = torch.randn(2, 3, 4, dtype=F64)
    y1, y2 = coupling(x1, x2)
    torch.testing.assert_close(y1, 0.1 * x1 + f(x2))
    torch.testing.assert_close(y2, 0.5 * x2 + g(y1))


def test_momentum_coupling_is_momentumnet():
    f = mlp(4).to(F64)
    coupling = torchrev.MomentumCoupling(f, gamma=0.8)
    v, x = torch.randn(2, 3, 4, dtype=F64)
    v_new, x_new = coupling(v, x)
    torch.testing.assert_close(v_new, 0.8 * v + 0.2 * f(x))
    torch.testing.assert_close(x_new, x + v_new)


def test_affine_scale_is_bounded():
    coupling = torchrev.AffineCoupling(mlp(2, 2), mlp(2, 2), bound=1.5, dim=-1)
    x = torch.ones(1, 2)
    h = torch.tensor([[1e3, -1e3, 0.0, 0.0]])
    y = coupling.update(x, h, 0)
    torch.testing.assert_close(y, torch.tensor([[1.5, -1.5]]).exp())


@pytest.mark.parametrize(("cls", "options"), COUPLINGS, ids=IDS)
@pytest.mark.parametrize("half", [0, 1])
def test_in_place_revert_equals_revert(cls, options, half):
    coupling = stack_of(cls, 1, width=4, **options)[0]
    y = torch.randn(3, 4, dtype=F64)
    h = torch.randn(coupling.branch_shape(y, half), dtype=F64)
    torch.testing.assert_close(coupling.revert_(y.clone(), h, half), coupling.revert(y, h, half))
